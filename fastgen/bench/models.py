"""Whole generators side by side: `python -m fastgen bench --models`.

Each model is timed three ways, each in a fresh Python process (so that each one's peak resident
memory is its own): `eager` (the model built from torch's layers, or fastgen's references),
`compile` (torch.compile of that) and `converted` (fastgen.convert of it, or its fused build; auto
backends). The same seed builds the same weights in each process; the
converted and compiled outputs are compared with eager's. Rows: median ms, speedup over eager and
compile, peak RSS of the process (torch and the weights included) and the peak above the resident
memory just before the first call (the run's own working memory, compilation included).
"""

from __future__ import annotations

import functools
import json
import os
import resource
import subprocess
import sys
import tempfile

import torch

import fastgen
from fastgen.bench.harness import time_ms
from fastgen.dispatch import CHANNELS_LAST

PROVIDERS = ("eager", "compile", "converted")


def _reduced_vae(fused: bool):
    from diffusers import AutoencoderKL

    model = AutoencoderKL(block_out_channels=(32, 64, 128, 128), layers_per_block=2, latent_channels=4,
                          norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4)
    return fastgen.convert(model, inplace=True) if fused else model  # as a user would: the original is not kept


def _sd_vae(fused: bool):
    from diffusers import AutoencoderKL

    # Stable Diffusion's VAE configuration (diffusers' defaults for it; random weights: speed, not images)
    model = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                          norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4)
    return fastgen.convert(model, inplace=True) if fused else model


def _stylegan2_1024(fused: bool):
    from fastgen.models import StyleGAN2Generator

    return StyleGAN2Generator(512, 0, 512, 1024, 3, channel_base=32768, channel_max=512, fused=fused)


def _stylegan2_256(fused: bool):
    from fastgen.models import StyleGAN2Generator

    # StyleGAN2's 256x256 configuration (channel_base 16384, channel_max 512, 8 mapping layers)
    return StyleGAN2Generator(512, 0, 512, 256, 3, channel_base=16384, channel_max=512, fused=fused)


class _OnBackend(torch.nn.Module):
    """A model run with every fastgen op on one backend (per call, this thread)."""

    def __init__(self, model, backend: str):
        super().__init__()
        self.model, self.backend = model, backend

    def forward(self, *args, **kwargs):
        with fastgen.use_backend(self.backend):
            return self.model(*args, **kwargs)


def _stylegan2_256_official(fused: bool):
    """The same generator; the baseline is StyleGAN2's own formulation in plain torch, as the official
    networks run without their CUDA plugins: up=2 modulated convolutions as a transposed convolution
    then the FIR filter, upfirdn2d and bias_act in aten math (fastgen's composite backends)."""
    model = _stylegan2_256(True)
    return model if fused else _OnBackend(model, "composite")


def _wan(fused: bool):
    from diffusers import AutoencoderKLWan

    # Wan 2.1's VAE at a third of its width (base 32 instead of 96), its depth and temporal layout:
    # 3 latent frames decode to 9 (through its per-frame feature caches), 8x8 -> 64x64
    model = AutoencoderKLWan(base_dim=32, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                             temperal_downsample=[False, True, True])
    return fastgen.convert(model, inplace=True) if fused else model


def _hunyuan_video(fused: bool):
    from diffusers import AutoencoderKLHunyuanVideo

    # HunyuanVideo's VAE at a quarter of its width (32..128 instead of 128..512), its depth and its
    # 8x spatial, 4x temporal compression: 3 latent frames decode to 9, 8x8 -> 64x64
    model = AutoencoderKLHunyuanVideo(latent_channels=16, block_out_channels=(32, 64, 128, 128), layers_per_block=2,
                                      norm_num_groups=32)
    return fastgen.convert(model, inplace=True) if fused else model


def _ltx(fused: bool):
    from diffusers import AutoencoderKLLTXVideo

    # LTX-Video 0.9's VAE at a quarter of its decoder's width (32..128 instead of 128..512), its depth,
    # 4x4 patches and 8x temporal compression: 2 latent frames decode to 9, 4x4 -> 128x128
    model = AutoencoderKLLTXVideo(block_out_channels=(32, 64, 128, 128), decoder_block_out_channels=(32, 64, 128, 128))
    return fastgen.convert(model, inplace=True) if fused else model


def _cogvideox(fused: bool):
    from diffusers import AutoencoderKLCogVideoX

    # CogVideoX's VAE at a quarter of its width (32..128 instead of 128..512), its depth and 8x spatial,
    # 4x temporal compression: 3 latent frames decode to 9, 8x8 -> 64x64
    model = AutoencoderKLCogVideoX(block_out_channels=(32, 64, 64, 128))
    return fastgen.convert(model, inplace=True) if fused else model


def _mochi(fused: bool):
    from diffusers import AutoencoderKLMochi

    # Mochi's VAE at a quarter of its decoder's width (32..192 instead of 128..768), its depth and 8x
    # spatial, 6x temporal expansion: 2 latent frames decode to 7, 8x8 -> 64x64
    model = AutoencoderKLMochi(encoder_block_out_channels=(32, 64, 128, 192),
                               decoder_block_out_channels=(32, 64, 128, 192))
    return fastgen.convert(model, inplace=True) if fused else model


def _dcgan_64(fused: bool):
    from fastgen.models import DCGANGenerator

    return DCGANGenerator(100, 64, 3, 64, "upsample_conv", fused=fused)


# name -> (builder(fused) (the same seed gives the same weights either way), input maker, what is
# timed, description). eager and compile time the unfused model, converted the fused one.
MODELS = {
    "sd-vae-reduced-decode": (_reduced_vae, lambda: torch.randn(1, 4, 32, 32), lambda m, z: m.decode(z).sample,
                              "AutoencoderKL (32, 64, 128, 128) decode 32x32 -> 256x256, batch 1"),
    "stylegan2-256": (_stylegan2_256, lambda: torch.randn(4, 512), lambda m, z: m(z, None, noise_mode="const"),
                      "StyleGAN2 256x256 generator (baseline: fastgen's fused=False build, each op's reference: "
                      "the zero-inserted image for up=2), batch 4"),
    "stylegan2-256-official": (_stylegan2_256_official, lambda: torch.randn(4, 512),
                               lambda m, z: m(z, None, noise_mode="const"),
                               "StyleGAN2 256x256 generator (baseline: the official formulation in plain torch, "
                               "transposed convolution + FIR), batch 4"),
    "dcgan-64": (_dcgan_64, lambda: torch.randn(64, 100), lambda m, z: m(z),
                 "DCGAN 64x64 generator, upsample + conv variant, batch 64 (eval)"),
    "wan-decode": (_wan, lambda: torch.randn(1, 16, 3, 8, 8), lambda m, z: m.decode(z).sample,
                   "AutoencoderKLWan (base 32, Wan 2.1's depth) decode 3x8x8 -> 9 frames of 64x64, batch 1"),
    "hunyuan-video-decode": (_hunyuan_video, lambda: torch.randn(1, 16, 3, 8, 8), lambda m, z: m.decode(z).sample,
                             "AutoencoderKLHunyuanVideo (32..128 wide) decode 3x8x8 -> 9 frames of 64x64, batch 1"),
    "ltx-decode": (_ltx, lambda: torch.randn(1, 128, 2, 4, 4), lambda m, z: m.decode(z).sample,
                   "AutoencoderKLLTXVideo (0.9, decoder 32..128 wide) decode 2x4x4 -> 9 frames of 128x128, batch 1"),
    "cogvideox-decode": (_cogvideox, lambda: torch.randn(1, 16, 3, 8, 8), lambda m, z: m.decode(z).sample,
                         "AutoencoderKLCogVideoX (32..128 wide) decode 3x8x8 -> 9 frames of 64x64, batch 1"),
    "mochi-decode": (_mochi, lambda: torch.randn(1, 12, 2, 8, 8), lambda m, z: m.decode(z).sample,
                     "AutoencoderKLMochi (decoder 32..192 wide) decode 2x8x8 -> 7 frames of 64x64, batch 1"),
}
VIDEO_MODELS = ("wan-decode", "hunyuan-video-decode", "ltx-decode", "cogvideox-decode", "mochi-decode")
# the GPU's rows (--device cuda; bf16 by default there): the sizes people serve
GPU_MODELS = {
    "sd-vae-decode-1024": (_sd_vae, lambda: torch.randn(1, 4, 128, 128), lambda m, z: m.decode(z).sample,
                           "Stable Diffusion's AutoencoderKL decode 128x128 -> 1024x1024, batch 1"),
    "stylegan2-1024": (_stylegan2_1024, lambda: torch.randn(4, 512), lambda m, z: m(z, None, noise_mode="const"),
                       "StyleGAN2 1024x1024 generator (baseline: fastgen's fused=False build), batch 4"),
}
ALL_MODELS = {**MODELS, **GPU_MODELS}


def _measure_in_this_process(name: str, provider: str, channels_last: bool, reps: int, out_path: str,
                             device: str = "cpu", dtype: str = "float32") -> dict:
    from fastgen.verify import no_tf32

    no_tf32()  # fp32 convolutions in fp32 for every provider
    build, make_input, run, _ = ALL_MODELS[name]
    torch.manual_seed(0)
    model = build(provider == "converted").eval()
    z = make_input()
    model = model.to(device=device, dtype=getattr(torch, dtype))
    z = z.to(device=device, dtype=getattr(torch, dtype))
    if channels_last:  # each 4-D or 5-D tensor in its channels-last format (a video VAE has both ranks)
        for p in model.parameters():
            if p.dim() in CHANNELS_LAST:
                p.data = p.data.contiguous(memory_format=CHANNELS_LAST[p.dim()])
        z = z.contiguous(memory_format=CHANNELS_LAST[z.dim()]) if z.dim() in CHANNELS_LAST else z
    step = functools.partial(run, model)
    if provider == "compile":
        step = torch.compile(step)  # what is timed (decode, generate), not only forward
    cuda = device == "cuda"
    with torch.no_grad():
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2 ** 20 if cuda else _rss_mib()
        out = step(z)  # the warm-up (and compilation)
        ms = time_ms(lambda: step(z), device, reps)
    torch.save(out.float().cpu(), out_path)  # compared with eager's by the parent: no eager run in this process
    if cuda:  # device memory: the allocator's peak (the weights included)
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
        return {"ms": ms, "peak_cuda_mib": peak, "peak_above_model_mib": peak - before}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"ms": ms, "peak_rss_mib": peak, "peak_above_model_mib": peak - before}


def _rss_mib() -> float:
    """The process's resident memory now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def measure(name: str, provider: str, channels_last: bool = False, reps: int = 5, out_path: str = "",
            device: str = "cpu", dtype: str = "float32") -> dict:
    """One provider of one model, in a fresh process; its output is saved to out_path."""
    code = (f"import json, fastgen.bench.models as b; print(json.dumps(b._measure_in_this_process("
            f"{name!r}, {provider!r}, {channels_last!r}, {reps}, {out_path!r}, {device!r}, {dtype!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800,
                          env=dict(os.environ))
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1][:300] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(names=None, layouts=("nchw", "nhwc"), reps: int = 5, log=print, device: str = "cpu",
        dtype: str | None = None) -> list[dict]:
    """Rows of the models named (default: MODELS on the CPU in float32, GPU_MODELS on a GPU in bfloat16)."""
    unknown = [n for n in names or () if n not in ALL_MODELS]
    if unknown:
        raise ValueError(f"no model benchmark named {unknown}; the models: {list(ALL_MODELS)}")
    dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
    rows = []
    for name in names or (GPU_MODELS if device == "cuda" else MODELS):
        for layout in layouts:
            with tempfile.TemporaryDirectory() as tmp:
                results = {p: measure(name, p, layout == "nhwc", reps, os.path.join(tmp, p), device, dtype)
                           for p in PROVIDERS}
                if "ms" in results["eager"]:
                    eager_out = torch.load(os.path.join(tmp, "eager"))
                    for p, r in results.items():
                        if "ms" in r:
                            r["max_err_vs_eager"] = (torch.load(os.path.join(tmp, p)) - eager_out).abs().max().item()
            for r in results.values():
                for base in ("eager", "compile"):
                    if "ms" in r and "ms" in results[base]:
                        r[f"speedup_vs_{base}"] = results[base]["ms"] / r["ms"]
            row = {"model": name, "what": ALL_MODELS[name][3], "layout": layout, "device": device, "dtype": dtype,
                   "providers": results}
            rows.append(row)
            log(format_row(row))
    return rows


def format_row(row: dict) -> str:
    cells = []
    for name, r in row["providers"].items():
        if "ms" not in r:
            cells.append(f"{name} FAILED ({r.get('error')})")
            continue
        speed = "" if name == "eager" else f" x{r['speedup_vs_eager']:.2f} vs eager, x{r['speedup_vs_compile']:.2f} vs compile"
        peak = f"peak CUDA {r['peak_cuda_mib']:.0f} MiB" if "peak_cuda_mib" in r else f"peak RSS {r['peak_rss_mib']:.0f} MiB"
        cells.append(f"{name} {r['ms']:.1f} ms{speed}, {peak} "
                     f"({r['peak_above_model_mib']:.0f} above the model), "
                     f"max |out - eager's| {r.get('max_err_vs_eager', float('nan')):.2g}")
    return f"{row['model']} {row['layout']} ({row['what']})\n    " + "\n    ".join(cells)
