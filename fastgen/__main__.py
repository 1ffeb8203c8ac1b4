"""python -m fastgen {bench,info}."""

import argparse
import json
import sys
from pathlib import Path

import torch

import fastgen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastgen")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="which backends this install can run")
    verify = sub.add_parser("verify", help="every op's backends on a device against the float64 reference; "
                                           "writes the record auto reads on CUDA")
    verify.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    verify.add_argument("--out", default=None, help="the record (JSON), e.g. fastgen/gpu_verified.json")
    verify.add_argument("--ops", default=None, help="comma-separated ops (default: all)")
    bench = sub.add_parser("bench", help="every provider side by side at generator shapes")
    bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    bench.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on the CPU")
    bench.add_argument("--passes", default="fwd,fwd+bwd")
    bench.add_argument("--out", default=None, help="JSON file for the results (rewritten after each row)")
    bench.add_argument("--layouts", default="nchw,nhwc")
    bench.add_argument("--shapes", default=None, help="comma-separated shape names (default: all)")
    bench.add_argument("--ops", default=None, help="comma-separated ops (default: every op with a suite)")
    bench.add_argument("--skip-ops", default="", help="comma-separated ops to leave out")
    bench.add_argument("--models", nargs="?", const="all", default=None,
                       help="time whole models instead of ops (eager vs torch.compile vs fastgen.convert); "
                            "optionally comma-separated names")
    bench.add_argument("--reps", type=int, default=5, help="timed repetitions per model and provider")
    bench.add_argument("--compile-mode", default="auto",
                       help="torch.compile mode of the compile provider (auto: max-autotune on a GPU)")
    args = parser.parse_args(argv)

    print(fastgen.summary())
    if args.command == "info":
        return 0
    if args.command == "verify":
        from fastgen import verify as fv

        return fv.main(args.device, args.out, args.ops.split(",") if args.ops else None)
    from fastgen import bench as fb

    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    passes = tuple(args.passes.split(","))
    env = fb.environment()
    print(f"on {env['device']} ({args.device}), torch {env['torch']}, triton {env['triton']}, {dtype}, "
          f"git {env['git_sha']}")
    rows = []
    if args.models:
        from fastgen import bench_models

        names = None if args.models == "all" else args.models.split(",")
        rows = bench_models.run(names, tuple(args.layouts.split(",")), args.reps)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"environment": env, "models": rows}, indent=1))
            print(f"wrote {args.out}")
        return 0

    def save(row):
        rows.append(row)
        if args.out:  # after every row, so a run cut short still leaves its results
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"environment": env, "rows": rows}, indent=1))

    ops = args.ops.split(",") if args.ops else list(fb.SUITES)
    skip = [op for op in args.skip_ops.split(",") if op]
    unknown = [op for op in ops + skip if op not in fb.SUITES]
    if unknown:
        parser.error(f"no benchmark suite for {unknown}; the suites: {list(fb.SUITES)}")
    for op in (op for op in ops if op not in skip):
        suite = fb.SUITES[op]
        shapes = suite.gpu_shapes if args.device == "cuda" else suite.cpu_shapes
        if args.shapes:
            shapes = [s for s in shapes if s.name in args.shapes.split(",")]
        for layout in args.layouts.split(","):
            fb.run(suite, args.device, dtype, layout == "nhwc", shapes=shapes, passes=passes, on_row=save,
                   compile_mode=None if args.compile_mode == "default" else args.compile_mode)
    print("\n" + fb.summary_table(rows))
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
