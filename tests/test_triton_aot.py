"""The ahead-of-time compile stage (tools/triton_aot.py) fails where a GPU would: a kernel that does
not compile for sm_90 (a tl.dot on 8-wide tiles, which the interpreter runs happily), a kernel that
spills, a grid over its limits, an int32 offset into a tensor past 2^31 elements; and passes a sound
kernel. The stage itself runs in README's test command (tools/test.sh)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TOYS = '''
import json, sys
sys.path.insert(0, sys.argv[1])
import triton_aot as A  # unsets TRITON_INTERPRET before triton is imported
import torch, triton, triton.language as tl

@triton.jit
def sound(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)

@triton.jit
def dot8(a_ptr, o_ptr):
    r = tl.arange(0, 8)
    a = tl.load(a_ptr + r[:, None] * 8 + r[None, :])
    tl.store(o_ptr + r[:, None] * 8 + r[None, :], tl.dot(a, a))

@triton.jit
def spills(x_ptr, n, R: tl.constexpr, C: tl.constexpr):
    r, c = tl.arange(0, R), tl.arange(0, C)
    acc = tl.zeros((R, C), dtype=tl.float32)  # R * C live values a thread: past its 255 registers
    for i in range(n):
        acc = acc * tl.sum(acc, axis=None) + tl.load(x_ptr + i + r[:, None] * C + c[None, :])  # all live
    tl.store(x_ptr + r[:, None] * C + c[None, :], acc)

@triton.jit
def int32_offsets(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # int32: wraps past 2^31
    tl.store(x_ptr + offs, 1.0, mask=offs < n)

x = torch.zeros(1 << 16)
half = torch.zeros(64, dtype=torch.float16)
big = torch.empty(2 ** 31 + 16, dtype=torch.float16)  # never touched: only its size counts
toys = {
    "sound": lambda: sound[(4,)](x, x.numel(), BLOCK=1024),
    "dot8": lambda: dot8[(1,)](half, half),
    "spills": lambda: spills[(1,)](x, 4, R=128, C=64, num_warps=1),
}
A.cases = lambda full, quick: [("toy", name, thunk) for name, thunk in toys.items()]
A.size_cases = lambda *a: []
A.large_cases = lambda: [
    ("toy", "grid", lambda: sound[(1, 2 ** 16)](x, x.numel(), BLOCK=1024)),
    ("toy", "int32", lambda: int32_offsets[(triton.cdiv(big.numel(), 1024),)](big, big.numel(), BLOCK=1024)),
    ("toy", "int64", lambda: sound[(triton.cdiv(big.numel(), 1024),)](big, big.numel(), BLOCK=1024)),
]
report, problems = A.triton_report(90, False, False)
print(json.dumps({"problems": problems, "kernels": sorted({v["kernel"] for v in report["variants"]})}))
'''


def test_the_stage_fails_on_what_a_gpu_would_refuse(tmp_path):
    script = tmp_path / "toys.py"
    script.write_text(TOYS)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script), str(ROOT / "tools")], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    problems = result["problems"]
    assert any(p.startswith("sm_90 toy dot8: ") for p in problems), problems  # no 8-wide tl.dot on a GPU
    assert any("spills" in p and "(toy spills)" in p for p in problems), problems
    assert any("toy grid" in p and "over the limits" in p for p in problems), problems
    assert any("toy int32" in p and "int32 offsets to ['x_ptr']" in p for p in problems), problems
    assert not any("toy sound" in p or "toy int64" in p for p in problems), problems  # the sound kernel passes
    assert len(problems) == 4, problems
    assert {"sound", "spills"} <= set(result["kernels"])
