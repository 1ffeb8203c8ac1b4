"""`python -m fastgen train`: the reference generators of fastgen.models trained on scikit-learn's
bundled digits, with fastgen's fused layers (or the plain torch ones, --unfused).

    data.py       the digits, 32x32 in [-1, 1], sharded per process
    recipe.py     what a model's training recipe is; sync BatchNorm + DistributedDataParallel
    dcgan.py      the non-saturating GAN loss
    stylegan2.py  StyleGAN2's loss: lazy R1 and path-length regularization, G's moving average
    vae.py        the negative ELBO
    loop.py       the loop: progress bar, checkpoint and resume, samples and loss plot (rank 0)
"""

from __future__ import annotations

import torch


def main(args) -> int:
    from fastgen.train.loop import distributed, train

    if args.device == "cuda":
        import os

        os.environ["FASTGEN_DEVICE"] = "cuda"
    if args.device != "xla" and (args.xla_devices != 1 or args.fsdp):
        raise SystemExit("--xla-devices and --fsdp need --device xla")
    if args.xla_devices < 1 or (args.fsdp and args.xla_devices == 1):
        raise SystemExit(f"--xla-devices must be >= 1 (and > 1 with --fsdp), got {args.xla_devices}")
    rank, world = distributed()
    run = train(args.model, args.steps, args.batch, args.backend, not args.unfused, args.out, args.resume,
                args.device, getattr(torch, args.dtype), args.seed, xla_devices=args.xla_devices, fsdp=args.fsdp)
    if rank == 0:
        final = ", ".join(f"{k} {v:.4f}" for k, v in run["final"].items())
        where = f"{args.xla_devices} XLA device(s){' (FSDP)' if args.fsdp else ''}" if args.device == "xla" else \
            f"{world} process(es)"
        print(f"{args.model}: {run['steps']} steps, {where}, {run['seconds']:.0f} s "
              f"(median step {run['median_step_ms']:.0f} ms); "
              f"final (mean of the last 20 steps): {final}; wrote {args.out or f'runs/{args.model}'}/"
              "{samples.png, losses.png, checkpoint.pt, summary.json}")
    if world > 1:
        # every rank waits for rank 0's files before the group goes: a rank that tore its gloo
        # threads down while another still used the group aborted ("terminate called ...")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0
