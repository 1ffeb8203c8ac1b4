import importlib
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fastgen.nn import BatchNormAct2d
from fastgen.ops import batch_norm_act, batch_norm_act_ref
from fastgen.activations import ACTIVATIONS
from cases import check_compiled_layer, cpu_backends, f64
from tolerances import assert_close, assert_close_grad

BACKENDS = cpu_backends("batch_norm_act")
FORMATS = [torch.contiguous_format, torch.channels_last]
# odd sizes, one position, C not a multiple of 8, one channel, many rows (several row chunks)
SHAPES = [(4, 6, 5, 7), (2, 3, 1, 1), (1, 40, 9, 3), (3, 1, 4, 4), (8, 3, 20, 20)]


@pytest.fixture(autouse=True)
def _triton_needs_the_interpreter(request):
    """The CPU cases of the triton backend need the interpreter; the CUDA ones (marked cuda) do not."""
    cpu_case = "cuda" not in request.node.keywords
    backend = getattr(request.node, "callspec", None) and request.node.callspec.params.get("backend")
    if cpu_case and backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on CPU tensors needs TRITON_INTERPRET=1")


def make(shape, dtype, fmt=torch.contiguous_format, grad=False):
    c = shape[1]
    x = (torch.randn(shape) * 2 + 0.5).to(dtype).to(memory_format=fmt)
    w, b = torch.randn(c).to(dtype), torch.randn(c).to(dtype)
    rm, rv = torch.randn(c), torch.rand(c) + 0.5
    if grad:
        for t in (x, w, b):
            t.requires_grad_(True)
    return x, w, b, rm, rv



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.sweep
def test_forward_and_running_stats(backend, training, activation, fmt, shape):
    x, w, b, rm, rv = make(shape, torch.float32, fmt)
    x64, w64, b64, rm64, rv64 = f64(x, w, b, rm, rv)
    out = batch_norm_act(x, rm, rv, w, b, training, 0.1, 1e-5, activation, 0.2, backend=backend)
    expected = batch_norm_act_ref(x64, rm64, rv64, w64, b64, training, 0.1, 1e-5, activation, 0.2)
    if not x.is_contiguous() or fmt == torch.contiguous_format:
        assert out.is_contiguous(memory_format=fmt)
    assert_close(out, expected, torch.float32)
    assert_close(rm, rm64, torch.float32)  # updated in place in training, untouched in eval
    assert_close(rv, rv64, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dtypes(backend, dtype, training):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend takes float32/16 and bfloat16")
    x, w, b, rm, rv = make((4, 6, 5, 7), dtype)
    x64, w64, b64, rm64, rv64 = f64(x, w, b, rm, rv)
    out = batch_norm_act(x, rm, rv, w, b, training, 0.1, 1e-5, "relu", backend=backend)
    assert out.dtype == dtype
    assert_close(out, batch_norm_act_ref(x64, rm64, rv64, w64, b64, training, 0.1, 1e-5, "relu"), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_row_chunks(backend):
    """16384 rows of 3 channels: the triton backend merges 64 row chunks' partial statistics, more
    than one block of them (its merge loops over SPLIT_BLOCK = 32 chunks at a time)."""
    x, w, b, rm, rv = make((16, 3, 32, 32), torch.float32)
    x64, w64, b64, rm64, rv64 = f64(x, w, b, rm, rv)
    out = batch_norm_act(x, rm, rv, w, b, True, 0.1, 1e-5, "silu", backend=backend)
    assert_close(out, batch_norm_act_ref(x64, rm64, rv64, w64, b64, True, 0.1, 1e-5, "silu"), torch.float32)
    assert_close(rv, rv64, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_running_stats_no_affine(backend):
    x = torch.randn(4, 5, 3, 3)
    out = batch_norm_act(x, None, None, training=True, activation="identity", backend=backend)
    assert_close(out, batch_norm_act_ref(x.double(), None, None, training=True, activation="identity"), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward(backend, training, dtype):
    x, w, b, rm, rv = make((4, 6, 5, 3), dtype, grad=True)
    out = batch_norm_act(x, rm, rv, w, b, training, 0.1, 1e-5, "silu", backend=backend)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w, b), grad)
    x64, w64, b64, rm64, rv64 = f64(x, w, b, rm, rv)
    expected = batch_norm_act_ref(x64, rm64, rv64, w64, b64, training, 0.1, 1e-5, "silu")
    want = torch.autograd.grad(expected, (x64, w64, b64), grad.double())
    for g, e in zip(got, want, strict=True):
        assert_close_grad(g, e, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last_3d], ids=["ncthw", "nthwc"])
def test_video(backend, training, fmt):
    """BatchNorm3d's input (N, C, T, H, W), contiguous or channels_last_3d: forward, running
    statistics and every gradient."""
    x, w, b, rm, rv = make((2, 6, 3, 5, 4), torch.float32, fmt, grad=True)
    x64, w64, b64, rm64, rv64 = f64(x, w, b, rm, rv)
    out = batch_norm_act(x, rm, rv, w, b, training, 0.1, 1e-5, "silu", backend=backend)
    assert out.is_contiguous(memory_format=fmt)
    expected = batch_norm_act_ref(x64, rm64, rv64, w64, b64, training, 0.1, 1e-5, "silu")
    assert_close(out, expected, torch.float32)
    assert_close(rm, rm64, torch.float32)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w, b), grad)
    want = torch.autograd.grad(expected, (x64, w64, b64), grad.double())
    for g, e in zip(got, want, strict=True):
        assert_close_grad(g, e, torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["composite", "triton", "cuda"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(4, 6, 5, 7), (64, 40, 33, 17)], ids=lambda s: "x".join(map(str, s)))
def test_cuda(backend, training, dtype, fmt, shape):
    x, w, b, rm, rv = (t.cuda() for t in make(shape, dtype, fmt))
    x.requires_grad_(True)
    x64, w64, b64, rm64, rv64 = f64(x, w, b, rm, rv)
    out = batch_norm_act(x, rm, rv, w, b, training, 0.1, 1e-5, "silu", backend=backend)
    expected = batch_norm_act_ref(x64, rm64, rv64, w64, b64, training, 0.1, 1e-5, "silu")
    assert_close(out, expected, dtype)
    assert_close(rm, rm64, torch.float32)
    assert_close(rv, rv64, torch.float32)
    grad = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, grad)
    (ex,) = torch.autograd.grad(expected, x64, grad.double())
    assert_close_grad(gx, ex, dtype)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_and_gradgradcheck(training):
    x = torch.randn(3, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    mean = torch.randn(4, dtype=torch.float64, requires_grad=not training)
    var = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_(not training)
    if training:
        f = lambda x, w, b: batch_norm_act(x, None, None, w, b, True, activation="gelu", backend="composite")  # noqa: E731
        args = (x, w, b)
    else:  # gradients reach the given statistics too (the synchronized path relies on it)
        f = lambda x, w, b, m, v: batch_norm_act(x, m, v, w, b, False, activation="gelu", backend="composite")  # noqa: E731
        args = (x, w, b, mean, var)
    assert torch.autograd.gradcheck(f, args) and torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_opcheck(backend, training):
    x, w, b, rm, rv = make((3, 4, 5, 2), torch.float32, grad=True)
    stats = (None, None) if training else (rm, rv)
    torch.library.opcheck(torch.ops.fastgen.batch_norm_act.default,
                          (x, w, b, *stats, training, 1e-5, "relu", 0.01, backend))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_layer_matches_batch_norm2d_then_relu(momentum):
    fused = BatchNormAct2d(6, momentum=momentum, activation="leaky_relu", negative_slope=0.2)
    ref = nn.BatchNorm2d(6, momentum=momentum)
    nn.init.normal_(ref.weight)
    fused.load_state_dict(ref.state_dict())
    assert fused.state_dict().keys() == ref.state_dict().keys()
    for step in range(3):
        x = torch.randn(4, 6, 5, 5) * (step + 1)
        torch.testing.assert_close(fused(x), nn.functional.leaky_relu(ref(x), 0.2), atol=1e-5, rtol=1e-5)
    for name, buf in ref.named_buffers():
        torch.testing.assert_close(getattr(fused, name), buf, atol=1e-6, rtol=1e-5)
    fused.eval(), ref.eval()
    x = torch.randn(2, 6, 3, 3)
    torch.testing.assert_close(fused(x), nn.functional.leaky_relu(ref(x), 0.2), atol=1e-5, rtol=1e-5)


def test_compile_fullgraph_eval():
    layer = BatchNormAct2d(4).eval()
    with torch.no_grad():
        layer.running_mean.normal_(), layer.running_var.uniform_(0.5, 2), layer.weight.normal_()
    check_compiled_layer(layer, torch.randn(2, 4, 5, 5), "auto")


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(training=False, running_mean=None, running_var=None), ValueError, "needed when training=False"),
    (dict(running_var=None), ValueError, "together"),
    (dict(weight=torch.randn(5)), RuntimeError, "weight must be a"),
    (dict(activation="mish"), ValueError, "activation must be one of"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(backend="cuda"), RuntimeError, "backend 'cuda' is not available"),
])
def test_bad_arguments(kwargs, error, match):
    args = dict(x=torch.randn(2, 3, 4, 4), running_mean=torch.zeros(3), running_var=torch.ones(3), training=True)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        batch_norm_act(**args)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm_act(torch.randn(1, 3, 1, 1), None, None, training=True)


# --- synchronized statistics: 2 gloo processes against 1 process on the concatenated batch --------

def _sync_worker(rank: int, init_file: str, out_dir: str, x: torch.Tensor, grad: torch.Tensor, state: dict):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        layer = BatchNormAct2d(x.shape[1], activation="silu", sync=True)
        layer.load_state_dict(state)
        half = x.shape[0] // 2
        xs = x[rank * half:(rank + 1) * half].clone().requires_grad_(True)
        out = layer(xs)
        out.backward(grad[rank * half:(rank + 1) * half])
        torch.save({"out": out.detach(), "gx": xs.grad, "gw": layer.weight.grad, "gb": layer.bias.grad,
                    "running_mean": layer.running_mean, "running_var": layer.running_var},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears its connections down while the other still uses them
    finally:
        dist.destroy_process_group()


@pytest.mark.serial
def test_sync_two_processes_equal_one_process_on_the_whole_batch():
    x, grad = torch.randn(8, 5, 4, 3) * 2 + 1, torch.randn(8, 5, 4, 3)
    single = BatchNormAct2d(5, activation="silu")
    nn.init.normal_(single.weight)
    state = {k: v.clone() for k, v in single.state_dict().items()}
    xs = x.clone().requires_grad_(True)
    out = single(xs)
    out.backward(grad)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_sync_worker, args=(os.path.join(tmp, "init"), tmp, x, grad, state), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), out.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r["gx"] for r in ranks]), xs.grad, atol=1e-5, rtol=1e-5)
    # parameter gradients: each rank holds its share; DDP would sum (average) them
    torch.testing.assert_close(ranks[0]["gw"] + ranks[1]["gw"], single.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ranks[0]["gb"] + ranks[1]["gb"], single.bias.grad, atol=1e-5, rtol=1e-5)
    for r in ranks:
        torch.testing.assert_close(r["running_mean"], single.running_mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(r["running_var"], single.running_var, atol=1e-6, rtol=1e-5)


def test_sync_without_a_process_group_is_plain_batch_norm():
    layer = BatchNormAct2d(3, sync=True)
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(layer(x), torch.relu(nn.functional.batch_norm(x, None, None, layer.weight, layer.bias,
                                                                             True)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
def test_triton_int64_rows(monkeypatch, backend, training, fmt):
    # at 2^31 rows (N * H * W) and more the Triton kernels divide row indices in int64 (that branch
    # once called itself forever); forced here at a small size: forward and every gradient
    monkeypatch.setattr(importlib.import_module("fastgen.ops.batch_norm_act"), "_rows_fit_int32", lambda *a: False)
    x, w, b, rm, rv = make((3, 5, 7, 6), torch.float32, fmt, grad=True)
    x64, w64, b64, rm64, rv64 = f64(x, w, b, rm, rv)
    out = batch_norm_act(x, rm, rv, w, b, training, 0.1, 1e-5, "silu", backend=backend)
    expected = batch_norm_act_ref(x64, rm64, rv64, w64, b64, training, 0.1, 1e-5, "silu")
    assert_close(out, expected, torch.float32)
    grad = torch.randn_like(out)
    for g, e in zip(torch.autograd.grad(out, (x, w, b), grad), torch.autograd.grad(expected, (x64, w64, b64),
                                                                                     grad.double())):
        assert_close_grad(g, e, torch.float32)
