"""torch.compile(model, backend="fastgen"): the rules of fastgen.rules over the graphs TorchDynamo
captures, on generator code written the ways public repositories write it (the shapes of their
code, written here: CompVis' and guided-diffusion's blocks, lucidrains' RMS norm, pix2pixHD's nested
Sequentials). Each model: the fused ops counted as they run, the output and the gradients against
eager and a float64 oracle (tests/tolerances.py), and what Dynamo's guards must keep exact (a coin
flip in forward, a child's attribute set after compiling)."""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastgen  # noqa: F401  (registers the ops)
from fastgen import compiler
from fastgen.dispatch import auto_choices

from tolerances import assert_within_eager_error

EAGER_GRAPH = functools.partial(compiler.backend, options={"inductor": False})


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test from no compiled graph: past its recompile limit for one code object (nn.Sequential's
    forward is one for every Sequential), Dynamo runs the original forward, which would pass for
    fused ones that never ran."""
    torch._dynamo.reset()
    compiler.reset()


# --- CompVis (taming-transformers / latent-diffusion) style: swish written out, a block without a time
# embedding, an attribute written in forward
def swish(x):
    return x * torch.sigmoid(x)


class CompVisResBlock(nn.Module):
    def __init__(self, c, temb=0):
        super().__init__()
        self.norm1 = nn.GroupNorm(4, c, eps=1e-6)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        if temb > 0:
            self.temb_proj = nn.Linear(temb, c)
        self.norm2 = nn.GroupNorm(4, c, eps=1e-6)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, temb=None):
        h = self.conv1(swish(self.norm1(x)))
        if temb is not None:
            h = h + self.temb_proj(swish(temb))[:, :, None, None]
        return x + self.conv2(swish(self.norm2(h)))


class CompVisUpsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class CompVisDecoder(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv_in = nn.Conv2d(4, c, 3, padding=1)
        self.block = CompVisResBlock(c)
        self.up = CompVisUpsample(c)
        self.norm_out = nn.GroupNorm(4, c, eps=1e-6)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z):
        self.last_z_shape = z.shape
        h = self.up(self.block(self.conv_in(z)))
        return self.conv_out(swish(self.norm_out(h)))


# --- guided-diffusion style: a GroupNorm that computes in float32, the scale-shift norm, an assert
class GroupNorm32(nn.GroupNorm):
    def forward(self, x):
        return super().forward(x.float() if x.dtype != torch.float64 else x).type(x.dtype)


class GuidedResBlock(nn.Module):
    def __init__(self, c, emb=16):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(4, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, 2 * c))
        self.out_layers = nn.Sequential(GroupNorm32(4, c), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x, emb):
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
        scale, shift = torch.chunk(emb_out, 2, dim=1)
        h = out_norm(h) * (1 + scale) + shift
        return x + out_rest(h)


class GuidedUpsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.channels = c
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        assert x.shape[1] == self.channels
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class GuidedUNetPiece(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.block = GuidedResBlock(c)
        self.up = GuidedUpsample(c)
        self.out = nn.Sequential(GroupNorm32(4, c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1))

    def forward(self, x, emb):
        return self.out(self.up(self.block(x, emb)))


# --- lucidrains (denoising-diffusion-pytorch) style: RMS norm over channels with F.normalize
class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = dim ** 0.5
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x):
        return F.normalize(x, dim=1) * self.g * self.scale


class LucidBlock(nn.Module):
    def __init__(self, c, c_out):
        super().__init__()
        self.proj = nn.Conv2d(c, c_out, 3, padding=1)
        self.norm = RMSNorm(c_out)
        self.act = nn.SiLU()

    def forward(self, x, scale_shift=None):
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.act(x)


class LucidResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.block1, self.block2 = LucidBlock(c, c), LucidBlock(c, c)

    def forward(self, x):
        return x + self.block2(self.block1(x))


# --- a channel RMS norm written with rsqrt (LTX's and HunyuanVideo's form), its weight indexed into place
class RsqrtRMSBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.weight = nn.Conv2d(c, c, 3, padding=1), nn.Parameter(torch.ones(c))

    def forward(self, x):
        x = self.conv(x)
        x = x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6) * self.weight[:, None, None]
        return F.silu(x)


# --- pix2pixHD style: the norm closes an inner Sequential, the ReLU opens the outer one
def pix2pix_resblock(c):
    return nn.Sequential(nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c)),
                         nn.Sequential(nn.ReLU(True), nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3),
                                       nn.BatchNorm2d(c), nn.LeakyReLU(0.2)))


# --- ProGAN style: upsample, convolve, leaky ReLU, pixel norm written out
class ProGANBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        x = F.leaky_relu(self.conv(F.interpolate(x, scale_factor=2)), 0.2)
        return x * torch.rsqrt(torch.mean(x ** 2, dim=1, keepdim=True) + 1e-8)


MODELS = {  # name: (build, inputs, fastgen ops per forward)
    "compvis-decoder": (lambda: CompVisDecoder(), lambda: (torch.randn(2, 4, 6, 5),),
                        {"group_norm_act": 3, "upsample_conv2d": 1}),
    "compvis-resblock-temb": (lambda: CompVisResBlock(8, 16), lambda: (torch.randn(2, 8, 5, 6), torch.randn(2, 16)),
                              {"group_norm_act": 2}),
    "guided-diffusion": (lambda: GuidedUNetPiece(), lambda: (torch.randn(2, 8, 5, 4), torch.randn(2, 16)),
                         {"group_norm_act": 3, "upsample_conv2d": 1}),
    "lucidrains": (lambda: LucidResBlock(8), lambda: (torch.randn(2, 8, 6, 6),), {"rms_norm_act": 2}),
    "rsqrt-rms": (lambda: RsqrtRMSBlock(8), lambda: (torch.randn(2, 8, 5, 4),), {"rms_norm_act": 1}),
    "progan": (lambda: ProGANBlock(8), lambda: (torch.randn(2, 8, 4, 5),), {"upsample_conv2d": 1, "pixel_norm": 1}),
    "pix2pixhd": (lambda: pix2pix_resblock(8), lambda: (torch.randn(2, 8, 7, 6),),
                  {"group_norm_act": 1, "batch_norm_act": 1}),
}


def _ran(picks) -> dict:
    out: dict = {}
    for op, _ in picks:
        out[op] = out.get(op, 0) + 1
    return out


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_compiled_model_fuses_and_matches_eager(name, train):
    build, make_inputs, ops = MODELS[name]
    torch.manual_seed(0)
    model = build().train(train)
    for p in model.parameters():  # not the initial ones and zeros of the norms
        p.data.add_(torch.randn_like(p) * 0.3)
    oracle, eager = copy.deepcopy(model).double(), copy.deepcopy(model)
    inputs = make_inputs()
    compiled = torch.compile(model, backend=EAGER_GRAPH)
    compiler.reset()
    with auto_choices() as picks:
        got = compiled(*[t.requires_grad_() for t in inputs])
    assert _ran(picks) == ops, compiler.report()
    assert not compiler.report().left, compiler.report()
    want = oracle(*[t.detach().double().requires_grad_() for t in inputs])
    ref = eager(*[t.detach().requires_grad_() for t in inputs])
    assert_within_eager_error([got], [ref], [want])
    cot = torch.randn_like(want)
    grads = [torch.autograd.grad(y, [*m.parameters()], cot.to(y.dtype)) for y, m in
             ((got, model), (ref, eager), (want, oracle))]
    assert_within_eager_error(*[list(g) for g in grads], floor_share=1.0)
    for a, b in zip(model.buffers(), eager.buffers()):  # batch norm's running statistics, updated alike
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_coin_flip_in_forward_stays_random():
    """Classifier-free guidance's label dropout: Dynamo keeps torch.rand as an op of the graph, so the
    compiled model draws what the original draws, call after call."""
    class Dropping(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.null = nn.GroupNorm(2, 4), nn.Parameter(torch.randn(1, 4, 1, 1))

        def forward(self, x):
            if self.training and torch.rand(1) < 0.5:
                x = x * 0 + self.null
            return F.silu(self.norm(x))

    model = Dropping()
    compiled = torch.compile(copy.deepcopy(model), backend=EAGER_GRAPH)
    x = torch.randn(2, 4, 3, 3)
    dropped = 0
    for seed in range(12):
        torch.manual_seed(seed)
        want, next_want = model(x), torch.rand(1)
        torch.manual_seed(seed)
        got, next_got = compiled(x), torch.rand(1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert torch.equal(next_got, next_want)  # the random stream where the original leaves it
        dropped += bool(torch.allclose(want, F.silu(model.norm(x * 0 + model.null))))
    assert 0 < dropped < 12


def test_a_child_setting_changed_after_compiling_is_honoured():
    """Setting nn.Upsample's scale_factor (or mode) after compiling: the guards capture again."""
    model = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(4, 4, 3, padding=1))
    compiled = torch.compile(model, backend=EAGER_GRAPH)
    x = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    for scale, mode in ((4, "nearest"), (2, "bilinear")):
        model[0].scale_factor, model[0].mode = scale, mode
        with auto_choices() as picks:
            got = compiled(x)
        assert got.shape == model(x).shape == (1, 4, 5 * scale, 5 * scale)
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)
        assert _ran(picks) == {"upsample_conv2d": 1}


def test_what_is_left_says_why():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.conv = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1, stride=2)

        def forward(self, x, s):
            h = F.interpolate(x, scale_factor=1.5)
            h = self.conv(F.interpolate(h, scale_factor=2))
            return F.relu(self.norm(h) * (1 + s) + s)

    compiler.reset()
    torch.compile(Odd().eval(), backend=EAGER_GRAPH)(torch.randn(1, 4, 4, 4), torch.randn(1, 4, 1, 1))
    why = " | ".join(w for _, w in compiler.report().left)
    assert "not a stride-1" in why and "batch_norm_act has no per-sample affine" in why, why


def test_the_name_fastgen_is_a_torch_compile_backend():
    from torch._dynamo import list_backends

    assert "fastgen" in list_backends(exclude_tags=())
    model = nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU())
    x = torch.randn(2, 4, 3, 3)
    with auto_choices() as picks:
        got = torch.compile(model, backend="fastgen", options={"inductor": False})(x)
    torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-6)
    assert _ran(picks) == {"group_norm_act": 1}


def test_with_inductor_the_fused_op_is_in_the_compiled_graph():
    """The default: the rewritten graph goes to Inductor, which keeps fastgen's op as an extern call."""
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.GroupNorm(2, 8), nn.SiLU())
    x = torch.randn(2, 4, 5, 5)
    compiler.reset()
    got = torch.compile(model, backend=compiler.backend)(x)
    torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)
    assert [what for _, what in compiler.report().fused] == ["group_norm -> silu -> group_norm_act"]


@pytest.mark.parametrize("inside", [False, True], ids=["around", "inside"])
def test_under_autocast_nothing_is_fused(inside):
    """Autocast gives each op its own dtype (conv2d bfloat16, group_norm float32): no fused op could
    match both, so a graph captured under autocast, or entering it, is left as it is."""
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.conv = nn.Upsample(scale_factor=2), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            if inside:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return self.conv(self.up(x))
            return self.conv(self.up(x))

    model, x = Up(), torch.randn(1, 4, 5, 5)
    compiler.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not inside):
        with auto_choices() as picks:
            got = torch.compile(model, backend=EAGER_GRAPH)(x)
        want = model(x)
    assert got.dtype == want.dtype == torch.bfloat16 and picks == []
    torch.testing.assert_close(got, want)
    assert "nothing fused" in str(compiler.report())


def test_hooks_on_a_norm_keep_it_unfused():
    """A forward hook reads (and here replaces) the norm's output: the activation is no longer its only
    reader, nothing fuses. A module backward hook makes Dynamo run the module as it is (graph break)."""
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    model = nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU())
    model[0].register_forward_hook(lambda m, i, out: out * 2)
    with auto_choices() as picks:
        got = torch.compile(model, backend=EAGER_GRAPH)(x)
    torch.testing.assert_close(got, model(x))
    assert picks == []

    model, features = nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU()), []  # a hook that keeps the features
    model[0].register_forward_hook(lambda m, i, out: features.append(out))
    compiler.reset()
    with auto_choices() as picks:
        got = torch.compile(model, backend=EAGER_GRAPH)(x)
    torch.testing.assert_close(got, model(x))
    torch.testing.assert_close(features[0], features[1])
    assert picks == [] and "read elsewhere too" in str(compiler.report())

    model, seen = nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU()), []
    model[0].register_full_backward_hook(lambda m, gi, go: seen.append(go[0]))
    model(x).sum().backward()
    with auto_choices() as picks:
        torch.compile(model, backend=EAGER_GRAPH)(x).sum().backward()
    assert len(seen) == 2 and picks == []
    torch.testing.assert_close(seen[1], seen[0])
