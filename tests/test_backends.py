import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import fastgen
from fastgen import dispatch as fb
from fastgen.ops._registry import NO_FLOAT64, Impl, OpSpec

SPEC = OpSpec("op", public=None, ref=None, impls={"composite": Impl(None), "cuda": Impl(None), "triton": Impl(None, NO_FLOAT64)},
              auto={"cpu": ("composite",), "cpu/slow": ("reference",)})
CPU = torch.empty(1)


def on(device: str, dtype=torch.float32, channels_last=False):
    """What select reads of an input: its device, dtype and layout (strides)."""
    t = torch.empty(2, 3, 4, 5, device="meta", dtype=dtype)
    t = t.to(memory_format=torch.channels_last) if channels_last else t
    return SimpleNamespace(device=torch.device(device), dtype=dtype, dim=t.dim, is_contiguous=t.is_contiguous)


def test_every_backend_is_reported_with_a_reason():
    table = fastgen.backends()
    assert tuple(table) == fb.NAMES
    for b in table.values():
        assert isinstance(b.available, bool) and b.reason
    assert table["reference"].available and table["composite"].available


def test_keyword_beats_block_beats_environment(monkeypatch):
    monkeypatch.setattr(fb, "_env_default", "reference")
    assert fb.select(SPEC, CPU, None) == "reference"
    with fastgen.use_backend("composite"):
        assert fb.select(SPEC, CPU, None) == "composite"
        with fastgen.use_backend("reference"):
            assert fb.select(SPEC, CPU, None) == "reference"
        assert fb.select(SPEC, CPU, "reference") == "reference"
        assert fb.select(SPEC, CPU, None) == "composite"
    monkeypatch.setattr(fb, "_env_default", "auto")
    assert fb.select(SPEC, CPU, None) == "composite"


def test_use_backend_restores_after_an_error():
    with pytest.raises(KeyError):
        with fastgen.use_backend("reference"):
            raise KeyError
    assert fb.requested(None) == fb._validate_name(fb._env_default)


def test_unknown_and_unavailable_backends_raise():
    with pytest.raises(ValueError, match="backend must be one of"):
        fastgen.use_backend("fastest").__enter__()
    with pytest.raises(ValueError, match="backend"):
        fb.select(SPEC, CPU, "gpu")
    with pytest.raises(NotImplementedError, match="has no 'cpu' backend"):
        fb.select(SPEC, CPU, "cpu")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        fb.select(SPEC, CPU, "cuda")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(fb, "_INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fb.select(SPEC, CPU, "triton")
    assert not fb.backends()["triton"].available or torch.cuda.is_available()


def test_xla_tensors_always_take_the_composite():
    assert fb.select(SPEC, on("xla"), None) == "composite"
    with fastgen.use_backend("auto"):
        assert fb.select(SPEC, on("xla"), None) == "composite"


def test_auto_on_cuda_without_a_gpu_record_runs_the_eager_path_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(fb, "_CUDA_WHY", "")
    monkeypatch.setattr(fb, "_TRITON_WHY", "")
    monkeypatch.setattr(fb, "_VERIFIED", {})
    monkeypatch.setattr(fb, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="fastgen"):
        for _ in range(3):
            assert fb.select(SPEC, on("cuda"), None) == "reference"
    assert len(caplog.records) == 1 and "no GPU run has verified a fused kernel faster" in caplog.records[0].getMessage()
    assert fb.select(SPEC, on("cuda"), "triton") == "triton"  # named explicitly, it runs
    assert "none (no GPU run recorded" in fb.verified_summary()


def record(**ops):
    return {"format": fb.RECORD_FORMAT, "device": "NVIDIA H200", "capability": [9, 0], "git_sha": "abc", "ops": {"op": ops}}


def passed(speedup):
    return {"passed": True, "speedup_vs_eager": speedup}


def test_auto_on_cuda_takes_the_recorded_fastest_verified_backend_for_the_memory_format(monkeypatch):
    monkeypatch.setattr(fb, "_CUDA_WHY", "")
    monkeypatch.setattr(fb, "_TRITON_WHY", "")
    monkeypatch.setattr(fb, "_device_capability", lambda device: (9, 0))
    monkeypatch.setattr(fb, "_VERIFIED", record(
        cuda={"float32": {"nchw": passed(2.0), "nhwc": {"passed": False}}, "bfloat16": {"nchw": {"passed": False}}},
        triton={"float32": {"nchw": passed(1.5), "nhwc": passed(1.1)},
                "bfloat16": {"nchw": passed(1.2)}}))
    assert fb.select(SPEC, on("cuda"), None) == "cuda"
    assert fb.select(SPEC, on("cuda", channels_last=True), None) == "triton"  # cuda failed in channels_last
    assert fb.select(SPEC, on("cuda", torch.bfloat16), None) == "triton"  # cuda failed there
    # verified in NCHW only: a channels_last input, which no GPU ran, takes the eager path
    assert fb.select(SPEC, on("cuda", torch.bfloat16, channels_last=True), None) == "reference"
    assert fb.select(SPEC, on("cuda", torch.float16), None) == "reference"  # nothing recorded
    monkeypatch.setattr(fb, "_CUDA_WHY", "fastgen._C was built without CUDA (test)")
    assert fb.select(SPEC, on("cuda"), None) == "triton"  # verified, but not in this install
    monkeypatch.setattr(fb, "_device_capability", lambda device: (8, 0))
    assert fb.select(SPEC, on("cuda"), None) == "reference"  # recorded on another GPU generation
    assert "4 op/backend/dtype/layout passed" in fb.verified_summary()


def test_auto_on_cuda_never_takes_a_backend_slower_than_eager_or_untimed(monkeypatch):
    monkeypatch.setattr(fb, "_CUDA_WHY", "")
    monkeypatch.setattr(fb, "_TRITON_WHY", "")
    monkeypatch.setattr(fb, "_device_capability", lambda device: (9, 0))
    monkeypatch.setattr(fb, "_VERIFIED", record(
        cuda={"float32": {"nchw": passed(0.8)}, "bfloat16": {"nchw": {"passed": True}}},
        triton={"float32": {"nchw": passed(0.95)}, "bfloat16": {"nchw": passed(1.0)}}))
    assert fb.select(SPEC, on("cuda"), None) == "reference"  # the fastest of two is still slower than eager
    assert fb.select(SPEC, on("cuda", torch.bfloat16), None) == "reference"  # untimed, or no faster


def test_the_record_tells_5d_from_4d_channels_last(monkeypatch):
    monkeypatch.setattr(fb, "_CUDA_WHY", "")
    monkeypatch.setattr(fb, "_TRITON_WHY", "")
    monkeypatch.setattr(fb, "_device_capability", lambda device: (9, 0))
    monkeypatch.setattr(fb, "_VERIFIED", record(triton={"float32": {"nhwc": passed(2.0), "ncdhw": passed(1.5)}}))
    clip = torch.empty(1, 4, 2, 3, 3, device="meta")
    clip_cl = clip.contiguous(memory_format=torch.channels_last_3d)
    assert fb.select(SPEC, on("cuda", channels_last=True), None) == "triton"
    # a 5-D channels-last clip is not what the 4-D "nhwc" entry verified
    assert fb.select(SPEC, SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32, dim=clip_cl.dim,
                                           is_contiguous=clip_cl.is_contiguous), None) == "reference"
    assert fb.select(SPEC, SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32, dim=clip.dim,
                                           is_contiguous=clip.is_contiguous), None) == "triton"
    assert [fb.record_layout(t) for t in (clip, clip_cl, torch.empty(1, 4, 3, 3, device="meta"))] == \
        ["ncdhw", "ndhwc", "nchw"]


def test_a_record_without_memory_formats_verifies_nothing(monkeypatch):
    monkeypatch.setattr(fb, "_CUDA_WHY", "")
    monkeypatch.setattr(fb, "_device_capability", lambda device: (9, 0))
    old = record(cuda={"float32": {"passed": True, "speedup_vs_eager": 2.0}})
    del old["format"]  # the first format: op / backend / dtype, every layout at once
    monkeypatch.setattr(fb, "_VERIFIED", old)
    assert fb.select(SPEC, on("cuda"), None) == "reference"
    assert fb.select(SPEC, on("cuda", channels_last=True), None) == "reference"
    # the second: one "nhwc" for 4-D and 5-D channels-last alike
    monkeypatch.setattr(fb, "_VERIFIED", dict(record(cuda={"float32": {"nchw": passed(2.0)}}), format=2))
    assert fb.select(SPEC, on("cuda"), None) == "reference"


def test_auto_skips_a_backend_that_cannot_take_the_dtype(monkeypatch):
    monkeypatch.setattr(fb, "_TRITON_WHY", "")
    monkeypatch.setattr(fb, "_INTERPRET", True)
    cpu_spec = OpSpec("op", public=None, ref=None, impls={"composite": Impl(None), "triton": Impl(None, NO_FLOAT64)},
                      auto={"cpu": ("triton", "composite")})
    assert fb.select(cpu_spec, on("cpu", torch.float32), None) == "triton"
    assert fb.select(cpu_spec, on("cpu", torch.float64), None) == "composite"  # triton takes no float64
    with pytest.raises(RuntimeError, match="the triton backend takes bfloat16, float16, float32, not float64"):
        fb.select(cpu_spec, on("cpu", torch.float64), "triton")


def test_a_variant_has_its_own_auto_order():
    assert fb.select(SPEC, CPU, None, variant="slow") == "reference"
    assert fb.select(SPEC, CPU, None, variant="other") == "composite"


def test_use_backend_blocks_are_per_thread():
    import threading

    inside, release, seen = threading.Event(), threading.Event(), {}

    def holder():
        with fb.use_backend("reference"):
            seen["holder"] = fb.requested(None)
            inside.set()
            release.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    assert inside.wait(30)
    seen["other"] = fb.requested(None)  # this thread opened no block
    release.set()
    t.join()
    assert seen == {"holder": "reference", "other": fb.requested(None)} and seen["other"] != "reference"


def test_auto_orders_go_from_the_most_specific_entry():
    spec = OpSpec("op", public=None, ref=None, impls={"composite": Impl(None)},
                  auto={"cpu": ("composite",), "cpu/nhwc": ("reference",), "cpu/up/nchw": ("reference",),
                        "cpu/down": ("composite",), "cpu/bfloat16": ("reference",),
                        "cpu/nchw/bfloat16": ("composite",)})
    assert fb.select(spec, on("cpu"), None) == "composite"
    assert fb.select(spec, on("cpu", channels_last=True), None) == "reference"  # layout
    assert fb.select(spec, on("cpu"), None, variant="up") == "reference"  # variant and layout
    assert fb.select(spec, on("cpu", channels_last=True), None, variant="up") == "reference"  # layout
    assert fb.select(spec, on("cpu", channels_last=True), None, variant="down") == "composite"  # variant first
    assert fb.select(spec, on("cpu", torch.bfloat16, channels_last=True), None) == "reference"  # dtype
    assert fb.select(spec, on("cpu", torch.bfloat16), None) == "composite"  # layout and dtype
    with fb.auto_choices() as picked:
        fb.select(spec, on("cpu", channels_last=True), None)
        fb.select(spec, on("cpu"), "reference")  # named, not auto's: not recorded
    assert picked == [("op", "reference")]


def _in_fresh_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_environment_variable_picks_the_default():
    done = _in_fresh_python("import fastgen.dispatch as b; print(b.requested(None))", FASTGEN_BACKEND="reference")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "reference"
    bad = _in_fresh_python("import fastgen.dispatch as b; b.requested(None)", FASTGEN_BACKEND="fastest")
    assert bad.returncode != 0 and "FASTGEN_BACKEND must be one of" in bad.stderr


def test_import_says_once_which_backends_it_has():
    code = "import logging; logging.basicConfig(level=logging.INFO); import fastgen; import fastgen"
    done = _in_fresh_python(code)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("fastgen backends:") == 1
    for name in fb.NAMES:
        assert name in done.stderr
