"""What keeps a kernel library out of a training run's way: no memory growth over many calls, and
correct results when several Python threads call the ops at once."""

import os
import threading

import pytest
import torch

from fastgen.ops import REGISTRY

from cases import cpu_backends

SPECS = list(REGISTRY.values())


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _step(spec, example, backend, device="cpu"):
    inputs = [t.to(device) if torch.is_tensor(t) else t for t in example.inputs()]
    inputs = [t.requires_grad_(True) if i in example.grad_of else t for i, t in enumerate(inputs)]
    out = spec.public(*inputs, **example.kwargs, backend=backend)
    torch.autograd.grad(out, [inputs[i] for i in example.grad_of], torch.ones_like(out))


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_a_thousand_forward_backward_calls_do_not_grow_memory(spec):
    example = spec.examples[0]
    for backend in ["reference", *cpu_backends(spec.name)]:
        if backend == "triton":
            continue  # the interpreter keeps its own caches; the GPU script checks the real thing
        for _ in range(100):  # warm-up: allocator pools, dispatcher caches
            _step(spec, example, backend)
        before = _rss_mib()
        for _ in range(1000):
            _step(spec, example, backend)
        assert _rss_mib() - before < 8, f"{backend}: RSS grew {_rss_mib() - before:.1f} MiB over 1000 calls"


@pytest.mark.cuda
@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_a_thousand_cuda_calls_do_not_grow_allocated_memory(spec):
    """The same on the GPU (tools/gpu_check.sh), for every backend there, Triton included: memory
    held by tensors (memory_allocated) returns to where it was, and the caching allocator's reserve
    does not climb."""
    example = spec.examples[0]
    for backend in ["reference", *[b for b in ("composite", "triton", "cuda") if b in spec.impls]]:
        for _ in range(100):
            _step(spec, example, backend, "cuda")
        torch.cuda.synchronize()
        allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        for _ in range(1000):
            _step(spec, example, backend, "cuda")
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == allocated, f"{backend}: allocated memory grew"
        assert torch.cuda.memory_reserved() <= reserved + 2 ** 21, f"{backend}: reserved memory grew"


@pytest.mark.serial
@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_four_threads_calling_at_once_get_correct_results(spec):
    example = spec.examples[0]
    backends = [b for b in cpu_backends(spec.name) if b != "triton"]
    cases = [(example.inputs(), b) for b in backends for _ in range(2)]  # 2 calls per backend
    want = [spec.public(*inputs, **example.kwargs, backend=b) for inputs, b in cases]
    results, errors = {}, []
    start = threading.Barrier(4)

    def work(k):
        try:
            start.wait(30)
            for _ in range(20):
                for i, (inputs, b) in enumerate(cases):
                    if i % 4 == k:
                        results[i] = spec.public(*inputs, **example.kwargs, backend=b)
        except Exception as e:  # reported below, in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i, w in enumerate(want):
        assert torch.equal(results[i], w), cases[i][1]


@pytest.mark.parametrize("spec", [s for s in SPECS if s.custom_op], ids=[s.name for s in SPECS if s.custom_op])
def test_torch_export_captures_each_custom_op(spec):
    """torch.export (README promises it): the op stays one node, fastgen::<op>, and the exported
    program computes what the op does."""
    example = spec.examples[0]
    inputs = example.inputs()
    tensors = [i for i, t in enumerate(inputs) if torch.is_tensor(t)]

    class Call(torch.nn.Module):
        def forward(self, *ts):
            args = list(inputs)
            for i, t in zip(tensors, ts):
                args[i] = t
            return spec.public(*args, **example.kwargs, backend="composite")

    exported = torch.export.export(Call(), tuple(inputs[i] for i in tensors))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert f"fastgen.{spec.name}.default" in targets, targets
    fresh = example.inputs()
    want = spec.public(*fresh, **example.kwargs, backend="composite")
    assert torch.equal(exported.module()(*[fresh[i] for i in tensors]), want)


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_deterministic_mode_runs_and_repeats_bitwise(spec):
    """No kernel of ours uses atomics (forward or backward; grep csrc/ kernels/ finds none), so under
    torch.use_deterministic_algorithms(True) every backend runs, and twice gives the same bits."""
    example = spec.examples[0]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for backend in ["reference", *cpu_backends(spec.name)]:
            runs = []
            for _ in range(2):
                torch.manual_seed(0)  # the same inputs both times
                inputs = [t.requires_grad_(True) if i in example.grad_of else t
                          for i, t in enumerate(example.inputs())]
                out = spec.public(*inputs, **example.kwargs, backend=backend)
                grads = torch.autograd.grad(out, [inputs[i] for i in example.grad_of], torch.ones_like(out))
                runs.append([out, *grads])
            assert all(torch.equal(a, b) for a, b in zip(*runs)), backend
    finally:
        torch.use_deterministic_algorithms(previous)


def _layers():
    from fastgen.models import Autoencoder, DCGANGenerator, StyleGAN2Generator
    from fastgen.nn import (AdaIN, BatchNormAct2d, BiasAct, Downsample2dFIR, EqualizedLinear, GroupNormAct,
                            InstanceNormAct2d, ModulatedConv2d, PixelNorm, Upsample2dFIR, UpsampleConv2d)
    x = lambda: (torch.randn(2, 6, 8, 8),)  # noqa: E731
    return {  # name: (module, inputs maker)
        "GroupNormAct": (GroupNormAct(2, 6, activation="silu"), x),
        "InstanceNormAct2d": (InstanceNormAct2d(6, affine=True, activation="lrelu"), x),
        "AdaIN": (AdaIN(6, 4), lambda: (torch.randn(2, 6, 8, 8), torch.randn(2, 4))),
        "PixelNorm": (PixelNorm(), x),
        "BatchNormAct2d": (BatchNormAct2d(6, activation="relu"), x),
        "BiasAct": (BiasAct(6, act="lrelu"), x),
        "Upsample2dFIR": (Upsample2dFIR(), x),
        "Downsample2dFIR": (Downsample2dFIR(), x),
        "EqualizedLinear": (EqualizedLinear(8, 4, activation="lrelu"), lambda: (torch.randn(3, 8),)),
        "ModulatedConv2d": (ModulatedConv2d(6, 4, 3, 5), lambda: (torch.randn(2, 6, 8, 8), torch.randn(2, 5))),
        "UpsampleConv2d": (UpsampleConv2d(6, 4, 3), x),
        "DCGANGenerator": (DCGANGenerator(16, 16, 3, 8, "upsample_conv"), lambda: (torch.randn(4, 16),)),
        "Autoencoder": (Autoencoder(3, 4, (8, 16), 4), lambda: (torch.randn(2, 3, 16, 16),)),
        "StyleGAN2Generator": (StyleGAN2Generator(32, 0, 32, 16, 3, channel_base=256, channel_max=32),
                               lambda: (torch.randn(2, 32), None)),
    }


@pytest.mark.parametrize("name", list(_layers()))
def test_torch_export_of_each_layer_and_generator_matches_eager(name):
    """torch.export of every fastgen.nn layer and of the reference generators (eval mode: what one
    serves) runs, and the exported program computes what eager does, to the bit (the generators keep
    our ops as custom-op nodes; a layer whose auto choice on the CPU is the eager path, PixelNorm, or
    that is aten alone, ModulatedConv2d without resampling, has none: test_torch_export_captures_each_custom_op)."""
    module, inputs = _layers()[name]
    module = module.eval()
    args = inputs()
    kwargs = {"noise_mode": "const"} if name == "StyleGAN2Generator" else {}
    exported = torch.export.export(module, args, kwargs)
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert name in ("PixelNorm", "ModulatedConv2d") or any(t.startswith("fastgen.") for t in targets), targets
    fresh = inputs()
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(*fresh, **kwargs), module(*fresh, **kwargs), rtol=0, atol=0)
