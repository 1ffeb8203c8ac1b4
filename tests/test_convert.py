"""fastgen.convert / fastgen.unconvert on plain torch models: what is fused, that the numbers stay
within kernel tolerance, that state dicts load both ways, and what is left alone (and said)."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastgen
from fastgen.conversion import FusedAway
from fastgen.nn import BatchNormAct2d, GroupNormAct, UpsampleConv2d
from tolerances import assert_close, assert_within_eager_error


def sequential():
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Upsample(scale_factor=2),
                         nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.LeakyReLU(0.2),
                         nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), nn.Conv2d(6, 3, 1),
                         nn.GroupNorm(3, 3), nn.Hardswish())


class Functional(nn.Module):
    """Calls the upsampling and the activations as functions in its own forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.norm = nn.GroupNorm(3, 6)
        self.bn = nn.BatchNorm2d(6)
        self.unused = nn.Linear(2, 2)  # in the state dict, never called
        self.register_buffer("offset", torch.tensor(0.5))

    def forward(self, x, scale: float = 1.0):
        y = F.silu(self.norm(self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))))
        return F.leaky_relu(self.bn(y), 0.1) * scale + self.offset


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(2, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return F.silu(self.norm(x))
        return x


def random_state(model: nn.Module) -> nn.Module:
    """Parameters and running statistics away from their initial values."""
    with torch.no_grad():
        for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            t.copy_(torch.rand_like(t) + 0.5 if t.ndim <= 1 else torch.randn_like(t) / t[0].numel() ** 0.5)
    return model


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_sequential_runs_are_fused_and_compute_the_same(training):
    model = random_state(sequential()).train(training)
    converted = fastgen.convert(model)
    assert [type(m) for m in converted] == [nn.Conv2d, GroupNormAct, FusedAway, FusedAway, UpsampleConv2d,
                                           BatchNormAct2d, FusedAway, nn.Upsample, nn.Conv2d, nn.GroupNorm,
                                           nn.Hardswish]
    report = converted.fastgen_report
    assert [path for path, _ in report.fused] == ["1", "4", "5"]
    assert {path for path, _ in report.left} == {"8", "9"}  # align_corners=True; Hardswish: not in the table
    x = torch.randn(2, 4, 5, 7)
    reference = copy.deepcopy(model).double()
    want = reference(x.double())  # in training, the running statistics move once on each side
    assert_close(converted(x), want, torch.float32, scale=4.0)
    assert_close(converted[5].running_mean, reference[5].running_mean, torch.float32)
    assert_close(converted[5].running_var, reference[5].running_var, torch.float32)


def test_state_dicts_load_both_ways_and_unconvert_restores():
    model = random_state(sequential()).eval()
    converted = fastgen.convert(model)
    assert list(converted.state_dict()) == list(model.state_dict())
    other = random_state(sequential()).eval()
    converted.load_state_dict(other.state_dict())
    x = torch.randn(1, 4, 6, 6)
    assert_close(converted(x), other.double()(x.double()), torch.float32, scale=4.0)
    back = fastgen.unconvert(converted)
    assert [type(m) for m in back] == [type(m) for m in sequential()]
    assert "fastgen_report" not in vars(back)
    back.load_state_dict(model.state_dict())
    torch.testing.assert_close(back(x), model(x))


def test_unconvert_keeps_what_changed_since():
    converted = fastgen.convert(random_state(sequential()).eval()).double()
    back = fastgen.unconvert(converted, inplace=True)
    assert all(p.dtype == torch.float64 for p in back.parameters())
    assert back[5].running_mean.dtype == torch.float64 and back[5].running_mean is converted[5].running_mean


def test_convert_copies_unless_inplace_and_is_idempotent():
    model = sequential()
    converted = fastgen.convert(model)
    assert type(model[1]) is nn.GroupNorm and converted is not model
    again = fastgen.convert(converted)
    assert [type(m) for m in again] == [type(m) for m in converted] and again.fastgen_report.fused == []
    same = fastgen.convert(model, inplace=True)
    assert same is model and type(model[1]) is GroupNormAct


def test_gradients_match():
    """Against the float64 model, within 3x the unconverted float32 model's error (the flash rule)."""
    model = random_state(sequential()).train()
    x = torch.randn(2, 4, 5, 5, requires_grad=True)

    def gradients(m, inp):
        return torch.autograd.grad(m(inp).square().sum(), [inp, *m.parameters()])

    got = gradients(fastgen.convert(model), x)
    eager = gradients(copy.deepcopy(model), x)
    want = gradients(copy.deepcopy(model).double(), x.detach().double().requires_grad_(True))
    assert_within_eager_error(got, eager, want)


def test_forward_functions_are_rewritten_by_fx():
    model = random_state(Functional()).eval()
    converted = fastgen.convert(model)
    assert isinstance(converted, Functional)  # still the user's class, forward rewritten
    assert type(converted.conv) is UpsampleConv2d and type(converted.norm) is GroupNormAct
    assert type(converted.bn) is BatchNormAct2d and converted.bn.negative_slope == 0.1
    assert "interpolate" not in converted.fastgen_forward_source
    assert list(converted.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 4, 3, 5)
    assert_close(converted(x, 2.0), copy.deepcopy(model).double()(x.double(), 2.0), torch.float32, scale=4.0)
    clone = copy.deepcopy(converted)
    assert list(clone.state_dict()) == list(model.state_dict())
    back = fastgen.unconvert(converted)
    assert type(back) is Functional and type(back.conv) is nn.Conv2d and type(back.bn) is nn.BatchNorm2d


def test_what_cannot_be_fused_is_left_and_said():
    model = Untraceable()
    converted = fastgen.convert(model)
    assert type(converted.norm) is nn.GroupNorm
    (path, why), = converted.fastgen_report.left
    assert path == "" and "not traceable by torch.fx" in why
    shared = nn.Sequential(nn.GroupNorm(2, 4), nn.ELU(alpha=0.5))  # not the table's elu
    assert type(fastgen.convert(shared)[0]) is nn.GroupNorm


def test_a_converted_sequential_pickles():
    converted = fastgen.convert(sequential())
    restored = pickle.loads(pickle.dumps(converted))
    assert [type(m) for m in restored] == [type(m) for m in converted]


def test_bad_argument():
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        fastgen.convert(lambda x: x)
