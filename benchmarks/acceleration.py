"""Eager vs ``--compile torch`` (vs ``--compile tensorrt``) on the same inputs, and memory with and without
``--offload stages``.

    python benchmarks/acceleration.py                                   # tiny random-weight models, CPU
    python benchmarks/acceleration.py --preset transfer2.5-2b --height 720 --width 1280 --frames 93 --steps 4 \\
        --modes none,torch,tensorrt                                     # Transfer2.5-2B size, random weights, GPU

One chunk = the VAE encodes a control video, the DiT (transformer + one ControlNet, guidance 3: two branches a step)
denoises, the VAE decodes -- through the product's stage classes (``transfer.families.transfer25.models``) and its compile and offload
code (``transfer.acceleration``), with random weights built from the preset's configs. Each mode runs on the same
weights and inputs: ``first s`` is the first chunk (compilation included), ``chunk s`` the mean of the next
``--repeats``; ``max |d latents|`` / ``max |d frames|`` compare with eager. The memory table runs the eager chunk
with both stages on one device, without and with offload: peak bytes of resident weights (and on CUDA
``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs.models import preset  # noqa: E402
from transfer.acceleration import compile_stage  # noqa: E402
from transfer.checkpoint import info_from_preset, load_dit, load_vae  # noqa: E402
from transfer.prepare import ModelLimits  # noqa: E402
from transfer.residency import Residency  # noqa: E402
from transfer.families.transfer25.models import Denoiser, VideoVAE  # noqa: E402


def build(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The VAE and DiT stages of preset ``name`` with random weights (the product's ``--random_weights`` loaders:
    the same seeds, the same weights each call), and a random prompt embedding."""
    info = info_from_preset(preset(name))
    t = info.transformer
    text_dim = t["crossattn_proj_in_channels"] if t["use_crossattn_projection"] else t["text_embed_dim"]
    embeds = torch.randn(1, 512, text_dim, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return load_vae(info, device, dtype), load_dit(info, ["edge"], device, dtype), embeds


def chunk(vae: VideoVAE, dit: Denoiser, limits: ModelLimits, video, embeds, steps: int):
    """One chunk through the stages; returns (latents, frames)."""
    controls = {"edge": vae.encode(video, dit.dtype)}
    f = limits.spatial_factor
    shape = (1, 16, limits.latent_frames(video.shape[2]), video.shape[3] // f, video.shape[4] // f)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    latents = dit.denoise(noise, None, 0, controls, {"edge": 1.0}, embeds, embeds * 0, steps, 3.0, video.shape[3:])
    return latents.float().cpu(), vae.decode(latents).float()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="tiny (CPU) or transfer2.5-2b (GPU) (default: tiny)")
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--width", type=int, default=160)
    p.add_argument("--frames", type=int, default=9, help="frames per chunk, 1 + 4k (default: 9)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--modes", default="none,torch", help="comma-separated --compile modes (default: none,torch)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    limits = ModelLimits.from_info(info_from_preset(preset(args.preset)))
    video = torch.rand(1, 3, args.frames, args.height, args.width, generator=torch.Generator().manual_seed(2)) * 2 - 1
    print(f"{args.preset} on {device} ({dtype}), chunk {args.frames}x{args.height}x{args.width}, {args.steps} steps, "
          f"guidance 3, one ControlNet\n")

    rows, reference = [], None
    for mode in args.modes.split(","):
        torch._dynamo.reset()
        vae, dit, embeds = build(args.preset, device, dtype)  # the same seed: the same weights each mode
        compile_stage("vae", vae, mode)
        compile_stage("dit", dit, mode)
        sync(device)
        start = time.perf_counter()
        latents, frames = chunk(vae, dit, limits, video, embeds, args.steps)
        sync(device)
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(args.repeats):
            chunk(vae, dit, limits, video, embeds, args.steps)
        sync(device)
        steady = (time.perf_counter() - start) / args.repeats
        reference = reference or (latents, frames, steady)
        rows.append((mode, first, steady, reference[2] / steady, (latents - reference[0]).abs().max().item(),
                     (frames - reference[1]).abs().max().item()))
        del vae, dit
    print(f"{'compile':<10}{'first s':>10}{'chunk s':>10}{'speedup':>9}{'max |d latents|':>17}{'max |d frames|':>16}")
    for mode, first, steady, ratio, dl, df in rows:
        print(f"{mode:<10}{first:>10.2f}{steady:>10.3f}{ratio:>8.2f}x{dl:>17.2e}{df:>16.2e}")

    print(f"\n{'offload':<10}{'peak weights MB':>17}{'all weights MB':>16}{'CUDA peak MB':>14}{'chunk s':>10}")
    for offload in (False, True):
        vae, dit, embeds = build(args.preset, torch.device("cpu") if offload and device.type == "cuda" else device, dtype)
        vae.device = dit.device = device
        residency = Residency(device, offload)
        residency.add("vae", vae)
        residency.add("dit", dit)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        chunk(vae, dit, limits, video, embeds, args.steps)
        sync(device)
        took = time.perf_counter() - start
        r = residency.report()
        cuda = f"{r['cuda_max_allocated_bytes'] / 2**20:>14.0f}" if "cuda_max_allocated_bytes" in r else f"{'-':>14}"
        print(f"{'stages' if offload else 'none':<10}{r['peak_resident_bytes'] / 2**20:>17.1f}"
              f"{r['all_stages_bytes'] / 2**20:>16.1f}{cuda}{took:>10.3f}")
        residency.close()
        del vae, dit


if __name__ == "__main__":
    main()
