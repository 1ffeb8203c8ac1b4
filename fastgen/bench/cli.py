"""The command `python -m fastgen bench` (arguments: fastgen/__main__.py).

Default: the quick run, one shape per op (Shape.quick), both layouts, forward and forward+backward;
`--full` every shape. Writes runs/bench/bench-<device>[-<dtype>][-quick].json (benchmarks/results/ with
--record: the committed records, for whoever refreshes them; --out anywhere) (the dtype named
when it is not the device's default) (after every row, so a
run cut short keeps its rows) and a .png chart beside it, prints the summary table, and exits 1 if
any provider failed its correctness check.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from fastgen.bench import SUITES
from fastgen.bench.harness import environment, matmul_tflops, providers, row
from fastgen.bench.report import chart, summary_table


def plan(device: str, ops, shapes, layouts, passes, full: bool) -> list[tuple]:
    """(suite, shape, layout, pass) for every row to run, in order."""
    tasks = []
    for op in ops:
        suite = SUITES[op]
        pool = suite.gpu_shapes if device == "cuda" else suite.cpu_shapes
        chosen = [s for s in pool if (s.name in shapes if shapes else full or s.quick)]
        tasks += [(suite, s, layout, kind) for s in chosen for layout in layouts for kind in passes]
    return tasks


def device_tag(device: str) -> str:
    return torch.cuda.get_device_name().replace(" ", "-") if device == "cuda" else "cpu"


def main(args) -> int:
    from tqdm import tqdm

    from fastgen.verify import no_tf32

    no_tf32()  # an fp32 eager baseline in fp32: TF32 would flatter it against exact kernels
    device, full = args.device, args.full
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    ops = args.ops.split(",") if args.ops else list(SUITES)
    skip = [op for op in args.skip_ops.split(",") if op]
    unknown = [op for op in ops + skip if op not in SUITES]
    if unknown:
        print(f"no benchmark suite for {unknown}; the suites: {list(SUITES)}", file=sys.stderr)
        return 2
    shapes = args.shapes.split(",") if args.shapes else None
    tasks = plan(device, [op for op in ops if op not in skip], shapes, args.layouts.split(","), args.passes.split(","), full)
    if not tasks:
        print("no rows match the selection", file=sys.stderr)
        return 2
    default_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tag = device_tag(device) + ("" if dtype == default_dtype else f"-{str(dtype).replace('torch.', '')}")
    # a user's run goes to runs/bench/; the committed records (benchmarks/results/, which auto's CPU
    # choices and tests/test_bench.py read) change only when asked, with --record
    folder = "benchmarks/results" if args.record else "runs/bench"
    out = Path(args.out or f"{folder}/bench-{tag}{'' if full else '-quick'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(f"on {env['device']} ({device}), torch {env['torch']}, triton {env['triton']}, {dtype}, git {env['git_sha']}")
    peak = matmul_tflops(device, dtype)
    compile_mode = None if args.compile_mode == "default" else args.compile_mode
    reps, budget = (20, None) if full else (10, 0.3)  # the full run is the record auto's orders follow
    rows, start = [], time.perf_counter()
    total = sum(len(providers(s, device, shape)) for s, shape, _, _ in tasks)
    with tqdm(total=total, unit="run", file=sys.stderr, mininterval=0.5, dynamic_ncols=True,
              bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]") as bar:
        for suite, shape, layout, kind in tasks:
            # a fresh torch.compile per row: one graph per shape, never the recompile limit's silent
            # fall back to eager
            torch._dynamo.reset()
            table = providers(suite, device, shape, compile_mode)

            def progress(name, finished, shape=shape, layout=layout, kind=kind):
                if finished:
                    bar.update(1)
                else:
                    bar.set_description(f"{suite.op} {shape.name} {layout} {kind}: {name}")

            rows.append(row(suite, shape, device, dtype, layout == "nhwc", kind, table, peak, reps, budget,
                            progress))
            record = {"environment": env, "matmul_tflops": peak, "mode": "full" if full else "quick",
                      "wall_s": time.perf_counter() - start, "rows": rows}
            out.write_text(json.dumps(record, indent=1))
    print(summary_table(rows))
    png = out.with_suffix(".png")
    chart(rows, str(png), f"fastgen on {env['device']} ({dtype}, {'full' if full else 'quick'} run, "
                          f"git {str(env['git_sha'])[:10]}, {env['date']})")
    failed = [f"{r['op']} {r['shape']['name']} {r['layout']} {r['pass']}" for r in rows if not r["passed"]]
    print(f"wrote {out} and {png} ({time.perf_counter() - start:.0f} s)")
    if failed:
        print(f"FAIL: {len(failed)} of {len(rows)} rows have a provider that failed its check: {failed}")
        return 1
    print(f"PASS: every provider of all {len(rows)} rows is within tolerance of the float64 oracle")
    return 0
