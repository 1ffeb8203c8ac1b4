"""python -m fastgen {info,verify,bench,train}."""

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
    verify.add_argument("--untimed", action="store_true",
                        help="check only, no speedup timing (e.g. under compute-sanitizer)")
    verify.add_argument("--in-process", action="store_true",
                        help="every op in this process (default: a process per op, so that a sticky CUDA "
                             "error or a crash fails that op alone)")
    verify.add_argument("--budget", type=float, default=None,
                        help="seconds: no op starts after it, a running one is stopped (exit 3: cut by time)")
    bench = sub.add_parser("bench", help="every provider side by side at generator shapes (default: the quick run)")
    bench.add_argument("--full", action="store_true", help="every shape of every suite (default: one per op)")
    bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    bench.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on the CPU")
    bench.add_argument("--passes", default="fwd,fwd+bwd",
                       help="comma-separated: fwd, bwd (the backward alone, of one forward), fwd+bwd")
    bench.add_argument("--layouts", default="nchw,nhwc")
    bench.add_argument("--shapes", default=None, help="comma-separated shape names (any of the suite's)")
    bench.add_argument("--ops", default=None, help="comma-separated ops (default: every op with a suite)")
    bench.add_argument("--skip-ops", default="", help="comma-separated ops to leave out")
    bench.add_argument("--out", default=None, help="the JSON (rewritten after each row; the chart is its .png); "
                                                   "default runs/bench/bench-<device>[-quick].json "
                                                   "(--models: runs/bench/models-<device>.json)")
    bench.add_argument("--record", action="store_true",
                       help="write the committed record under benchmarks/results/ instead of runs/bench/ "
                            "(for whoever refreshes what auto and the tests read)")
    bench.add_argument("--models", nargs="?", const="all", default=None,
                       help="time whole models instead of ops (eager vs torch.compile vs fastgen.convert); "
                            "optionally comma-separated names")
    bench.add_argument("--reps", type=int, default=5, help="timed repetitions per model and provider")
    bench.add_argument("--compile-mode", default="auto",
                       help="torch.compile mode of the compile provider (auto: max-autotune on a GPU)")
    train = sub.add_parser("train", help="train a reference generator on scikit-learn's digits (torchrun: several processes)")
    train.add_argument("--model", required=True, choices=("dcgan", "stylegan2", "vae"))
    train.add_argument("--data", default="digits", choices=("digits",),
                       help="scikit-learn's bundled 8x8 digits, upscaled to 32x32 (no download)")
    train.add_argument("--steps", type=int, default=None, help="default: the model's (under 3 minutes on 2 cores)")
    train.add_argument("--batch", type=int, default=None, help="images per process per step")
    train.add_argument("--backend", default="auto", help="the fastgen backend of the fused layers")
    train.add_argument("--unfused", action="store_true", help="train the plain torch build instead (a baseline)")
    train.add_argument("--out", default=None, help="where the samples, loss plot and checkpoint go (default runs/<model>)")
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    train.add_argument("--device", default="cpu", choices=("cpu", "cuda", "xla"),
                       help="xla: torch_xla's device (a TPU; PJRT_DEVICE=CPU for its CPU client)")
    train.add_argument("--xla-devices", type=int, default=1,
                       help="with --device xla: SPMD data parallelism over this many XLA devices (the batch, "
                            "--batch per device, sharded; one process)")
    train.add_argument("--fsdp", action="store_true",
                       help="with --xla-devices N: also shard the parameters (torch_xla's SPMD FSDP)")
    train.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                       help="float64: for checking against the unfused build")
    train.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "train":
        from fastgen.train import main as train_main

        return train_main(args)
    print(fastgen.summary())
    if args.command == "info":
        return 0
    if args.command == "verify":
        from fastgen import verify as fv

        return fv.main(args.device, args.out, args.ops.split(",") if args.ops else None, timed=not args.untimed,
                       isolate=not args.in_process, budget=args.budget)
    if args.device == "xla":  # fused vs unfused on torch_xla: compile, graphs, fallbacks, HLO
        from fastgen.bench import xla as bench_xla

        return bench_xla.main(args)
    if args.models:
        from fastgen.bench import models
        from fastgen.bench.harness import environment

        names = None if args.models == "all" else args.models.split(",")
        rows = models.run(names, tuple(args.layouts.split(",")), args.reps, device=args.device, dtype=args.dtype)
        out = Path(args.out or f"{'benchmarks/results' if args.record else 'runs/bench'}/models-{args.device}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"environment": environment(), "models": rows}, indent=1))
        print(f"wrote {out}")
        crashed = [f"{row['model']}/{row['layout']}/{p}" for row in rows for p, r in row["providers"].items()
                   if "error" in r]
        if crashed:
            print(f"FAILED (an error, not a time): {', '.join(crashed)}")
        return 1 if crashed else 0
    from fastgen.bench import cli

    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
