"""`python -m fastgen bench --device xla [--models]`: what the fused composite buys on XLA, the fused
and the unfused form side by side, per op (each suite's quick CPU shape; --full: every one; forward
and forward+backward) or, with --models, per reference generator (fused build vs plain torch build,
same weights) and a converted diffusers AutoencoderKL vs the original:
    compile_s      the first call's compile seconds (torch_xla's CompileTime), first_call_s its wall time
    graphs         graphs compiled by the first call; recompiled: by the next calls (0 is the goal)
    steady_ms      median wall time of a call after it (XLA:CPU here: not TPU time)
    fallbacks      ops torch_xla ran on the CPU ({} is the goal)
    hlo_ops        instructions of the call's HLO (as torch_xla hands it to XLA, before XLA's passes)
    largest_mib    its largest intermediate (not a parameter): e.g. the 4x upsampled tensor that
                   upsample_conv2d's composite never makes
The HLO figures are the program, so they carry over to a TPU; the times are XLA:CPU's.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path

import torch

from fastgen import xla

XLA_CPU_CAVEAT = ("XLA:CPU times (PJRT_DEVICE=CPU) are not TPU times; the HLO figures (instructions, largest "
                  "intermediate) are the program itself and carry over")
_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}


def hlo_figures(tensors: list[torch.Tensor]) -> dict:
    """Instructions and the largest intermediate of the HLO that computes tensors (not yet run)."""
    import torch_xla

    text = torch_xla._XLAC._get_xla_tensors_hlo(tensors)
    ops, largest = 0, 0
    for line in text.splitlines():
        lhs, eq, rhs = line.partition(" = ")
        if not eq or "{" in lhs or "parameter(" in rhs:
            continue
        ops += 1
        kind = _SHAPE.search(rhs)  # the result's shape comes first on the right-hand side
        if kind:
            elements = 1
            for d in filter(None, kind.group(2).split(",")):
                elements *= int(d)
            largest = max(largest, elements * _BYTES[kind.group(1)])
    return {"hlo_ops": ops, "largest_mib": round(largest / 2 ** 20, 3)}


def measure(call, reps: int = 5) -> tuple[dict, list[torch.Tensor]]:
    """The figures of call() (-> the tensors it computes) on the XLA device; its last results."""
    import torch_xla
    import torch_xla.core.xla_model as xm

    def run():  # sync(wait=True) returns before XLA:CPU has run the graph; wait_device_ops waits
        torch_xla.sync()
        xm.wait_device_ops()

    watch = xla.Watch()
    results = call()
    figures = hlo_figures(results)
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    compiled = watch.summary()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        results = call()
        run()
        times.append(time.perf_counter() - start)
    after = watch.summary()
    return {"compile_s": compiled["compile_seconds"], "first_call_s": round(first, 3),
            "graphs": compiled["graphs_compiled"], "recompiled": after["graphs_compiled"] - compiled["graphs_compiled"],
            "steady_ms": round(statistics.median(times) * 1e3, 3), "fallbacks": after["fallbacks"], **figures}, results


def _on_xla(inputs, grad_of, backward: bool):
    device = xla.device()
    return [t.detach().to(device).requires_grad_(backward and i in grad_of) for i, t in enumerate(inputs)]


def _call(fn, wrt: list[torch.Tensor], backward: bool):
    """call() -> fn()'s output and, backward, the gradients of a loss on it w.r.t. wrt (those it uses)."""
    def call():
        out = fn()
        if not backward:
            return [out.detach()]
        grads = torch.autograd.grad(out.float().square().mean(), wrt, allow_unused=True)
        return [out.detach(), *[g for g in grads if g is not None]]
    return call


def _max_abs_diff(outs: dict) -> float:
    return max(float((a.cpu() - b.cpu()).abs().max()) for a, b in zip(outs["fused"], outs["unfused"], strict=True))


def op_rows(ops: list[str] | None, full: bool, passes: list[str], reps: int) -> list[dict]:
    from fastgen.bench import SUITES

    rows = []
    for op in ops or list(SUITES):
        suite = SUITES[op]
        for shape in [s for s in suite.cpu_shapes if full or s.quick]:
            inputs = suite.inputs(shape)
            for kind in passes:
                backward = kind != "fwd"
                row = {"op": op, "shape": shape.name, "pass": kind, "providers": {}}
                outs = {}
                for name, fn in (("unfused", suite.eager), ("fused", suite.fused(None))):
                    xs = _on_xla(inputs, suite.grad_of, backward)
                    call = _call(lambda fn=fn, xs=xs: fn(*xs, shape), [xs[i] for i in suite.grad_of], backward)
                    row["providers"][name], outs[name] = measure(call, reps)
                row["max_abs_diff"] = _max_abs_diff(outs)
                rows.append(row)
    return rows


def _models() -> dict:
    """name -> (fused model, unfused model (same weights), inputs (CPU), the call)."""
    import copy

    import fastgen
    from fastgen.models import VAE, DCGANGenerator, StyleGAN2Generator

    def pair(build):
        torch.manual_seed(0)
        unfused = build(False)
        fused = build(True)
        fused.load_state_dict(unfused.state_dict())
        return fused, unfused

    def vae(fused):
        return VAE(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                   up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), layers_per_block=1,
                   latent_channels=4, norm_num_groups=8, sample_size=64, fused=fused)

    def autoencoder_kl():
        from diffusers import AutoencoderKL

        torch.manual_seed(0)
        original = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                                 up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64),
                                 layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64)
        return fastgen.convert(copy.deepcopy(original)), original

    g = torch.Generator().manual_seed(0)
    return {
        "dcgan-g": (*pair(lambda f: DCGANGenerator(64, 32, 3, 32, "upsample_conv", fused=f)),
                    (torch.randn(8, 64, generator=g),), lambda m, z: m(z)),
        "stylegan2-g": (*pair(lambda f: StyleGAN2Generator(64, 0, 64, 32, 3, channel_base=2048, channel_max=64, fused=f)),
                        (torch.randn(4, 64, generator=g),), lambda m, z: m(z, None, noise_mode="const")),
        "vae-decode": (*pair(vae), (torch.randn(1, 4, 16, 16, generator=g),), lambda m, z: m.decode(z).sample),
        "autoencoderkl-decode": (*autoencoder_kl(), (torch.randn(1, 4, 16, 16, generator=g),),
                                 lambda m, z: m.decode(z).sample),
    }


def model_rows(names: list[str] | None, passes: list[str], reps: int) -> list[dict]:
    rows = []
    for name, (fused, unfused, inputs, run) in _models().items():
        if names and name not in names:
            continue
        for kind in passes:
            backward = kind != "fwd"
            row = {"model": name, "pass": kind, "providers": {}}
            outs = {}
            for label, model in (("unfused", unfused), ("fused", fused)):
                model = model.to(xla.device()).train(backward)
                xs = _on_xla(inputs, (), False)
                call = _call(lambda model=model, xs=xs: run(model, *xs), list(model.parameters()), backward)
                row["providers"][label], outs[label] = measure(call, reps)
            row["max_abs_diff"] = _max_abs_diff(outs)
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| case | pass | compile s (unfused / fused) | graphs | recompiled | steady ms | HLO ops | "
            "largest MiB | fallbacks |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        u, f = r["providers"]["unfused"], r["providers"]["fused"]
        case = r.get("model") or f"{r['op']} {r['shape']}"
        lines.append(f"| {case} | {r['pass']} | {u['compile_s']:.2f} / {f['compile_s']:.2f} | {u['graphs']} / {f['graphs']} "
                     f"| {u['recompiled']} / {f['recompiled']} | {u['steady_ms']:.1f} / {f['steady_ms']:.1f} "
                     f"| {u['hlo_ops']} / {f['hlo_ops']} | {u['largest_mib']:.2f} / {f['largest_mib']:.2f} "
                     f"| {len(u['fallbacks'])} / {len(f['fallbacks'])} |")
    return "\n".join(lines)


def main(args) -> int:
    from fastgen.bench.harness import environment

    passes = args.passes.split(",")
    reps = 5 if args.full else 3
    if args.models:
        rows = model_rows(None if args.models == "all" else args.models.split(","), passes, reps)
        default = "models-xla.json"
    else:
        rows = op_rows(args.ops.split(",") if args.ops else None, args.full, passes, reps)
        default = f"bench-xla{'' if args.full else '-quick'}.json"
    out = Path(args.out or f"{'benchmarks/results' if args.record else 'runs/bench'}/{default}")
    out.parent.mkdir(parents=True, exist_ok=True)
    import torch_xla

    env = {**environment(), "device": f"XLA ({torch_xla.runtime.device_type()})", "torch_xla": torch_xla.__version__}
    out.write_text(json.dumps({"environment": env, "caveat": XLA_CPU_CAVEAT, "rows": rows}, indent=1))
    print(table(rows))
    print(f"(unfused / fused) {XLA_CPU_CAVEAT}\nwrote {out}")
    fell_back = [r.get("model") or r["op"] for r in rows if r["providers"]["fused"]["fallbacks"]]
    if fell_back:
        print(f"FAIL: the fused form ran ops on the CPU in {fell_back}")
        return 1
    return 0
