"""The VAE split over ranks by rows (``transfer.distributed.vae_split``): one chunk's encode and decode at each degree,
side by side, against degree 1.

    python benchmarks/vae_split.py                                   # Transfer2.5's VAE, 17 x 128 x 224, degrees 1 2
    python benchmarks/vae_split.py --preset cosmos3-nano --degrees 1 2 4 8 --frames 93 --height 704 --width 1280

For each degree N a ``torchrun`` of N processes (gloo on CPU, NCCL on GPUs, one per GPU) builds the preset's VAE with
random weights through the product's loader (``transfer.checkpoint.load_vae``; Cosmos 3's through ``load_cosmos3``),
splits it over the N ranks for N > 1, and times ``--repeats`` encodes of one control chunk and decodes of its latents
(the mean; one call before, not timed); every rank's peak memory of a call above what it held before
(``transfer.memory.measured_peak``). The table: seconds, speed-up over degree 1, the largest rank's peak, and the
largest difference from degree 1 (latents; frames in 8-bit levels). On a machine with fewer cores than processes
the seconds show only that the split runs: the speed-up needs a GPU (or core) per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_vae(name: str, device: torch.device, dtype: torch.dtype):
    """The preset's ``AutoencoderKLWan`` with random weights, through the product's loaders."""
    from configs.cosmos3 import COSMOS3_PRESETS
    from configs.models import preset
    from transfer.checkpoint import info_from_preset, load_vae

    if name in COSMOS3_PRESETS:
        from transfer.families.cosmos3.checkpoint import cosmos3_preset_info
        from transfer.families.cosmos3.pipeline import load_cosmos3

        return load_cosmos3(cosmos3_preset_info(name), device, dtype, ("vae",)).vae
    return load_vae(info_from_preset(preset(name)), device, dtype).vae


def worker(args) -> None:
    import torch.distributed as dist

    from transfer.device import default_device, dtype_for
    from transfer.distributed.vae_split import RowSplit, install
    from transfer.memory import measured_peak
    from benchmarks.call_costs import timed

    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = default_device()
    dtype = dtype_for(device, args.dtype)
    if world > 1:
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "cpu:gloo")
    vae = build_vae(args.preset, device, dtype).eval()
    if world > 1:
        install(vae, RowSplit(tuple(range(world)), dist.group.WORLD, rank))
    g = torch.Generator().manual_seed(0)
    video = (torch.rand(1, 3, args.frames, args.height, args.width, generator=g) * 2 - 1).to(device, dtype)
    with torch.no_grad():
        encode = lambda: vae.encode(video).latent_dist.mode()  # noqa: E731
        latents = encode()  # warm-up
        encode_s, latents = timed(device, encode, args.repeats)
        decode = lambda: vae.decode(latents).sample  # noqa: E731
        decode()
        decode_s, frames = timed(device, decode, args.repeats)
        peaks = [measured_peak(device, encode)[0], measured_peak(device, decode)[0]]
    if world > 1:  # the largest rank's
        everyone = [None] * world
        dist.all_gather_object(everyone, peaks)
        peaks = [max(p[i] for p in everyone) for i in range(2)]
        dist.destroy_process_group()
    if rank == 0:
        torch.save({"encode_s": encode_s, "decode_s": decode_s, "peaks": peaks, "latents": latents.float().cpu(),
                    "frames": frames.float().cpu()}, args.out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="transfer2.5-2b", help="whose VAE (default: transfer2.5-2b; cosmos3-nano: Wan2.2)")
    p.add_argument("--degrees", type=int, nargs="+", default=[1, 2])
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=224)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFER_LOG_LEVEL": "WARNING"}
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for degree in args.degrees:
            out = Path(work) / f"{degree}.pt"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(degree), __file__, "--worker",
                   "--out", str(out), "--preset", args.preset, "--frames", str(args.frames), "--height",
                   str(args.height), "--width", str(args.width), "--dtype", args.dtype, "--repeats", str(args.repeats)]
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"degree {degree} failed:\n{proc.stderr[-3000:]}")
            results[degree] = torch.load(out)
    device = "cuda" if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"VAE of {args.preset}, one chunk {args.frames} x {args.height} x {args.width}, random weights, {device}, "
          f"mean of {args.repeats}")
    head = (f"{'degree':>6}{'encode s':>10}{'x':>7}{'decode s':>10}{'x':>7}{'peak GB enc/dec (largest rank)':>32}"
            f"{'max |d latents|':>17}{'max d levels':>14}")
    print(head + "\n" + "-" * len(head))
    base = results[min(results)]
    rows = []
    for degree, r in sorted(results.items()):
        dl = float((r["latents"] - base["latents"]).abs().max())
        df = float(((r["frames"] - base["frames"]) * 127.5).abs().max())
        rows.append({"degree": degree, "encode_s": r["encode_s"], "decode_s": r["decode_s"], "peaks": r["peaks"],
                     "latents": dl, "levels": df})
        print(f"{degree:>6}{r['encode_s']:>10.3f}{base['encode_s'] / r['encode_s']:>6.2f}x{r['decode_s']:>10.3f}"
              f"{base['decode_s'] / r['decode_s']:>6.2f}x{r['peaks'][0] / 1e9:>16.3f} / {r['peaks'][1] / 1e9:<13.3f}"
              f"{dl:>17.2e}{df:>14.3f}")
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
