"""The convert conformance suite: fastgen.convert never changes what a model computes.

MODELS is the spec: one row per model pattern (generator blocks as their authors write them, and the
traps), with how many times each fastgen op must run in a forward (counted as it runs, not read from the
report) and what must be said about what is left. `conform` holds
every row to the promise: the converted model (converted in training mode and in eval mode) against
the original with the same weights, in float64 (the fused kernels compute float64 to ~1e-12, so any
change of what is computed shows) and in float32 (the flash rule against float64): outputs,
gradients of the inputs and of every parameter, and the buffers a forward updates; after .eval(),
.train(), .double() and load_state_dict; with hooks on every layer (each fires as often, and a hook
that changes a layer's output changes the converted model's output the same way); pickled and
copied; and unconverted (the original classes, bit for bit the original's results)."""

import copy
import pickle
import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastgen
from fastgen.dispatch import auto_choices
from tolerances import assert_within_eager_error

F64 = dict(atol=1e-9, rtol=1e-9)


# --------------------------------------------------------------------------------------------
# model patterns, written as their authors write them

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


class CycleGANResnetBlock(nn.Module):
    """pix2pix / CycleGAN's ResnetBlock (junyanz/pytorch-CycleGAN-and-pix2pix): reflection padding,
    conv, InstanceNorm2d, ReLU(True), dropout, conv, InstanceNorm2d, plus the input."""

    def __init__(self, dim=8, use_dropout=True):
        super().__init__()
        block = [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim), nn.ReLU(True)]
        if use_dropout:
            block += [nn.Dropout(0.5)]
        block += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim)]
        self.conv_block = nn.Sequential(*block)

    def forward(self, x):
        return x + self.conv_block(x)


def cyclegan_generator():
    """The ResnetGenerator's shape at a small width: stem, two downsamplings, resnet blocks, two
    transposed-conv upsamplings (InstanceNorm2d(affine=True) + ReLU each), tanh."""
    layers = [nn.ReflectionPad2d(3), nn.Conv2d(3, 4, 7), nn.InstanceNorm2d(4, affine=True), nn.ReLU(True),
              nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.InstanceNorm2d(8, affine=True), nn.ReLU(True),
              CycleGANResnetBlock(8), CycleGANResnetBlock(8, use_dropout=False),
              nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(4, affine=True),
              nn.ReLU(True), nn.ReflectionPad2d(3), nn.Conv2d(4, 3, 7), nn.Tanh()]
    return nn.Sequential(*layers)


class PixelNormLayer(nn.Module):
    """ProGAN's pixel norm as users write it."""

    def forward(self, x):
        return x * torch.rsqrt(torch.mean(x ** 2, dim=1, keepdim=True) + 1e-8)


class PixelNormInline(nn.Module):
    """Pixel norm written inline, three ways (StyleGAN's methods, ProGAN's division), and a near miss
    (a mean over the spatial axes: an instance-wise RMS, not a pixel norm)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        a = x * (x.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()
        b = self.conv(a)
        c = b / torch.sqrt(torch.mean(b * b, dim=1, keepdim=True) + 1e-6)
        return c * torch.rsqrt(torch.mean(c ** 2, dim=(2, 3), keepdim=True) + 1e-8)


def progan_block():
    return nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(6, 8, 3, padding=1), nn.LeakyReLU(0.2),
                         PixelNormLayer(), nn.Conv2d(8, 8, 3, padding=1), nn.LeakyReLU(0.2), PixelNormLayer())


class UNet(nn.Module):
    """A small U-Net: GroupNorm + SiLU blocks (one shared SiLU module called as an attribute),
    bilinear upsampling through F.interpolate, skip connections by concatenation."""

    def __init__(self):
        super().__init__()
        self.inc = nn.Conv2d(3, 8, 3, padding=1)
        self.norm1 = nn.GroupNorm(4, 8)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.norm2 = nn.GroupNorm(4, 8)
        self.up = nn.Conv2d(8, 8, 3, padding=1)
        self.norm3 = nn.GroupNorm(4, 16)
        self.out = nn.Conv2d(16, 3, 1)
        self.nonlinearity = nn.SiLU()

    def forward(self, x):
        h1 = self.nonlinearity(self.norm1(self.inc(x)))
        h2 = self.nonlinearity(self.norm2(self.down(h1)))
        u = self.up(F.interpolate(h2, scale_factor=2, mode="bilinear", align_corners=False))
        return self.out(self.nonlinearity(self.norm3(torch.cat([u, h1], dim=1))))


class TrainingBranches(nn.Module):
    """self.training read in forward: dropout's flag and a train-only branch."""

    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(2, 4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        h = F.dropout(F.silu(self.norm(x)), 0.3, training=self.training)
        if self.training:
            h = h + 0.5 * self.conv(h)
        return h


class OptionalSkip(nn.Module):
    """An argument that is None or not decides the path."""

    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(2, 4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x, skip=None):
        h = self.conv(F.silu(self.norm(x)))
        if skip is not None:
            h = h + skip
        return h


class RemembersLast(nn.Module):
    """A forward with a side effect fx would drop."""

    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(2, 4)
        self.last = None

    def forward(self, x):
        h = F.silu(self.norm(x))
        self.last = h.detach()
        return h


class AppendsToCache(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(2, 4)
        self.cache = []

    def forward(self, x):
        h = F.silu(self.norm(x))
        self.cache.append(h.detach())
        return h[:, :2] if len(self.cache) > 1 else h  # reads its state


class Flagged(nn.Module):
    """A plain attribute read in forward, changed by the user after convert."""

    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(2, 4)
        self.use_act = True

    def forward(self, x):
        h = self.norm(x)
        return F.silu(h) if self.use_act else h


class SharedModules(nn.Module):
    """One GroupNorm called twice (once before an activation, once not); one SiLU after two norms."""

    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(2, 4)
        self.other = nn.GroupNorm(1, 4)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.norm(x)) + self.norm(2 * x) + self.act(self.other(x))


class ReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(2, 4)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        h = self.norm(x)
        b = self.bn(x)
        return F.silu(h) + h + F.relu(b, inplace=True) * 0.5


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4, momentum=None)
        self.norm = nn.GroupNorm(4, 4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return F.relu(self.bn(x), inplace=True) + self.act(self.norm(x))


class MyGroupNorm(nn.GroupNorm):
    def forward(self, x):
        return super().forward(x) * 0.5


def subclassed():
    return nn.Sequential(MyGroupNorm(2, 4), nn.SiLU(), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU())


class ConvList(nn.Module):
    """Convolutions reached through a ModuleList, after F.interpolate (nearest-exact at 2x, a tuple
    scale) and an nn.Upsample."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1),
                                    nn.Conv2d(4, 4, 3, padding=1)])
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest-exact")

    def forward(self, x):
        h = self.convs[0](F.interpolate(x, scale_factor=(2, 2), mode="nearest-exact"))
        h = self.convs[1](F.interpolate(h, size=(h.shape[-2] + 1, h.shape[-1] + 1)))  # a size: not fused
        return self.convs[2](self.up(h))


class UsesRandom(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(2, 4)

    def forward(self, x):
        h = F.silu(self.norm(x))
        return h * 0.5 if random.random() < 2 else h


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(2, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return F.silu(self.norm(x))
        return x


def image(c=4, h=6, w=5, n=2):
    return lambda: (torch.randn(n, c, h, w),)


# name -> (builder, inputs, fastgen ops that run in one forward (counted at run time), what `left` must mention)
MODELS = {
    "sequential": (sequential, image(4, 5, 7), {"group_norm_act": 1, "batch_norm_act": 1, "upsample_conv2d": 1}, ("align_corners=True", "Hardswish")),
    "functional": (Functional, image(4, 3, 5), {"group_norm_act": 1, "batch_norm_act": 1, "upsample_conv2d": 1}, ()),
    "functional-scale": (Functional, lambda: (torch.randn(2, 4, 3, 5), 2.0), {"group_norm_act": 1, "batch_norm_act": 1, "upsample_conv2d": 1}, ()),
    "cyclegan-resnet-block": (CycleGANResnetBlock, image(8, 6, 6), {"group_norm_act": 1}, ()),
    "cyclegan-generator": (cyclegan_generator, image(3, 8, 8), {"group_norm_act": 5}, ()),
    "progan-block": (progan_block, image(6, 4, 4), {"pixel_norm": 2, "upsample_conv2d": 1}, ()),
    "pixel-norm-inline": (PixelNormInline, image(), {"pixel_norm": 2}, ()),
    "unet": (UNet, image(3, 8, 8), {"group_norm_act": 3, "upsample_conv2d": 1}, ()),
    "training-branches": (TrainingBranches, image(), {"group_norm_act": 1}, ()),
    "optional-skip": (OptionalSkip, image(), {"group_norm_act": 1}, ()),
    "optional-skip-given": (OptionalSkip, lambda: (torch.randn(2, 4, 6, 5), torch.randn(2, 4, 6, 5)), {"group_norm_act": 1}, ()),
    "remembers-last": (RemembersLast, image(), {}, ("sets last",)),
    "appends-to-cache": (AppendsToCache, image(), {}, ("lists or dicts",)),
    "flagged": (Flagged, image(), {"group_norm_act": 1}, ()),
    "shared-modules": (SharedModules, image(), {"group_norm_act": 2}, ()),
    "read-twice": (ReadTwice, image(), {"batch_norm_act": 1}, ("read elsewhere",)),
    "in-place": (InPlace, image(), {"group_norm_act": 1, "batch_norm_act": 1}, ()),
    "subclassed": (subclassed, image(), {"batch_norm_act": 1}, ("subclass of nn.GroupNorm",)),
    "conv-list": (ConvList, image(4, 3, 4), {"upsample_conv2d": 2}, ("given size",)),
    "uses-random": (UsesRandom, image(), {}, ("random",)),
    "untraceable": (Untraceable, image(), {}, ("not traceable by torch.fx",)),
}


# --------------------------------------------------------------------------------------------
# the checks

def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Parameters and running statistics away from their initial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            r = torch.rand(t.shape, generator=g) + 0.5 if t.ndim <= 1 else \
                torch.randn(t.shape, generator=g) / t[0].numel() ** 0.5
            t.copy_(r)
    return model


def first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    return out[0]


def results(model: nn.Module, inputs, call=None) -> list[torch.Tensor]:
    """Output, gradients of the floating inputs and of every parameter, and every floating buffer
    after the call; dropout draws the same masks on both sides (same seed, same order)."""
    dtype = next(model.parameters()).dtype
    xs = [t.detach().to(dtype).requires_grad_(True) if isinstance(t, torch.Tensor) else t for t in inputs]
    torch.manual_seed(1)
    out = first_tensor(call(model, *xs) if call else model(*xs))
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(out.dtype)
    wrt = [x for x in xs if isinstance(x, torch.Tensor)] + list(model.parameters())
    if out.requires_grad:
        grads = torch.autograd.grad((out * weight).sum(), wrt, allow_unused=True)
    else:
        grads = ()
    grads = [g for g in grads if g is not None]
    return [out.detach(), *grads, *[b.clone() for b in model.buffers() if b.is_floating_point()]]


def assert_same(got, want, **tol):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        scale = max(1.0, w.abs().max().item()) if w.numel() else 1.0
        torch.testing.assert_close(g / scale, w / scale, **(tol or F64), msg=lambda m: f"result {i}: {m}")


def in_lockstep(a: nn.Module, b: nn.Module, inputs, call=None):
    assert_same(results(a, inputs, call), results(b, inputs, call))


def conform(build, make_inputs, ops: dict, left=(), call=None):
    """Every check of the module docstring, for one model pattern. `ops`: how many times each fastgen op
    runs in one forward of the converted model, counted as it runs (auto's choices), exactly."""
    torch.manual_seed(0)
    original = randomize(build())
    for training in (True, False):
        model = copy.deepcopy(original).train(training)
        converted = fastgen.convert(model)
        report = converted.fastgen_report
        for words in left:
            assert any(words in why for _, why in report.left), report
        assert list(converted.state_dict()) == list(model.state_dict())
        assert [type(m).__mro__[1] if "_fastgen_base" in type(m).__dict__ else type(m)
                for m in converted.modules()] == [type(m) for m in model.modules()]
        inputs = make_inputs()

        # float32 against float64: the flash rule; and the fused ops that ran
        want = results(copy.deepcopy(model).double(), inputs, call)
        with auto_choices() as picks:
            got = results(copy.deepcopy(converted), inputs, call)
        ran = Counter(op for op, _ in picks)
        assert ran == Counter(ops), f"fastgen ops run in a forward: {dict(ran)}, the row says {ops}"
        eager = results(copy.deepcopy(model), inputs, call)
        # a whole model's output, every parameter's gradient and its buffers: tens of layers of float32
        # rounding reach each of them, so each is judged on the list's scale (an op's results, judged
        # by fastgen.tolerances.judge, each on its own)
        assert_within_eager_error(got, eager, want, floor_share=1.0)

        # float64, mode after mode, both models in lockstep (running statistics move on both)
        a, b = copy.deepcopy(converted).double(), copy.deepcopy(model).double()
        for mode in ("as converted", "eval", "train", "eval"):
            if mode != "as converted":
                a.train(mode == "train"), b.train(mode == "train")
            in_lockstep(a, b, inputs, call)
        other = randomize(build(), seed=3).double().state_dict()
        a.load_state_dict(other), b.load_state_dict(other)
        in_lockstep(a, b, inputs, call)

        # pickled and copied: the same model
        for c in (pickle.loads(pickle.dumps(a)), copy.deepcopy(a)):
            in_lockstep(c, copy.deepcopy(b), inputs, call)

        # hooks: each fires as often; a hook that scales a layer's output scales the model's alike
        check_hooks(copy.deepcopy(converted).double(), copy.deepcopy(model).double(), inputs, call)

        # unconverted: the original classes and modes, bit for bit the original's results
        back = fastgen.unconvert(converted)
        assert [type(m) for m in back.modules()] == [type(m) for m in model.modules()]
        assert [m.training for m in back.modules()] == [m.training for m in model.modules()]
        assert "fastgen_report" not in vars(back)
        for x, y in zip(results(back, inputs, call), results(copy.deepcopy(model), inputs, call)):
            assert torch.equal(x, y)
    return converted


def check_hooks(a: nn.Module, b: nn.Module, inputs, call=None):
    calls = {id(a): [], id(b): []}
    for root in (a, b):
        for name, m in root.named_modules():
            if not name:
                continue
            log = calls[id(root)]
            m.register_forward_pre_hook(lambda mod, args, name=name, log=log: log.append(("pre", name)))
            scale = 1.5 if isinstance(m, (nn.GroupNorm, nn.modules.batchnorm._NormBase)) else None
            m.register_forward_hook(lambda mod, args, out, name=name, log=log, scale=scale:
                                    log.append(("post", name)) or (out * scale if scale else None))
            if scale:
                m.register_full_backward_hook(lambda mod, gi, go, name=name, log=log: log.append(("bwd", name)))
    try:
        want = results(b, inputs, call)
    except RuntimeError as e:  # e.g. a backward hook before an in-place ReLU: torch refuses; so must we
        with pytest.raises(RuntimeError, match=str(e).split(".")[0]):
            results(a, inputs, call)
        return
    assert_same(results(a, inputs, call), want)
    assert sorted(calls[id(a)]) == sorted(calls[id(b)]) and calls[id(a)]


@pytest.mark.parametrize("name", MODELS)
def test_conformance(name):
    build, make_inputs, ops, left = MODELS[name]
    conform(build, make_inputs, ops, left)


# --------------------------------------------------------------------------------------------
# particular promises

def test_hooks_set_before_convert_keep_firing():
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.SiLU()))
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    converted = fastgen.convert(model)
    x = torch.randn(1, 3, 6, 6)
    assert_same([converted(x)], [model(x)], atol=1e-5, rtol=1e-5)
    assert len(seen) == 2
    torch.testing.assert_close(seen[0], seen[1], atol=1e-6, rtol=1e-6)  # the norm's output, not the activation's


def test_a_flag_changed_after_convert_is_read():
    model = randomize(Flagged())
    converted = fastgen.convert(model)
    x = torch.randn(2, 4, 3, 3)
    for flag in (True, False, True, False):
        converted.use_act = model.use_act = flag
        assert_same([converted(x)], [model(x)], atol=1e-5, rtol=1e-5)


def test_a_child_swapped_after_convert_is_used():
    model = randomize(Flagged())
    converted = fastgen.convert(model)
    x = torch.randn(2, 4, 3, 3)
    converted.norm = model.norm = nn.GroupNorm(4, 4)
    assert_same([converted(x)], [model(x)], atol=1e-5, rtol=1e-5)


def test_one_class_per_original_class_and_a_fresh_process_unpickles(tmp_path):
    import subprocess
    import sys
    a, b = fastgen.convert(UNet()), fastgen.convert(UNet())
    assert type(a) is type(b) and isinstance(a, UNet)
    torch.save(fastgen.convert(sequential()), tmp_path / "seq.pt")
    code = ("import torch; m = torch.load('seq.pt', weights_only=False); print(type(m).__name__, "
            "m(torch.randn(1, 4, 5, 5)).shape)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "Sequential" in done.stdout, done.stderr[-2000:]


def test_a_sequential_slice_computes_the_slice():
    model = randomize(sequential()).eval()
    converted = fastgen.convert(model)
    x = torch.randn(1, 4, 5, 5)
    assert_same([converted[:2](x)], [model[:2](x)], atol=1e-6, rtol=1e-6)  # the norm's output, no SiLU


def test_torch_func_and_autocast_run_the_layers():
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.SiLU()))
    converted = fastgen.convert(model)
    x = torch.randn(3, 1, 3, 5, 5)
    vm = torch.func.vmap(converted)(x)
    torch.testing.assert_close(vm, torch.func.vmap(model)(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, z = converted(x[0]), model(x[0])
    assert y.dtype == z.dtype
    torch.testing.assert_close(y, z)


def test_compile_of_a_converted_model():
    model = randomize(UNet()).eval()
    converted = fastgen.convert(model)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert_same([torch.compile(converted)(x)], [model(x)], atol=1e-5, rtol=1e-5)


def test_idempotent_and_inplace():
    model = sequential()
    converted = fastgen.convert(model)
    assert type(model) is nn.Sequential and converted is not model
    again = fastgen.convert(converted)
    assert again.fastgen_report.fused == []
    same = fastgen.convert(model, inplace=True)
    assert same is model and isinstance(model, nn.Sequential) and type(model) is not nn.Sequential


def test_legacy_weight_norm_says_inplace_works():
    model = nn.Sequential(torch.nn.utils.weight_norm(nn.Conv2d(3, 4, 3)), nn.GroupNorm(2, 4), nn.SiLU())
    with pytest.raises(RuntimeError, match="inplace=True"):
        fastgen.convert(model)
    x = torch.randn(1, 3, 5, 5)
    want = model(x)
    converted = fastgen.convert(model, inplace=True)
    assert len(converted.fastgen_report.fused) == 1
    torch.testing.assert_close(converted(x), want, atol=1e-5, rtol=1e-5)


def test_bad_argument():
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        fastgen.convert(lambda x: x)
