"""Real-size cost of every stage with random weights (``--random_weights``): no download, one command, any machine.

    python benchmarks/real_size.py                      # Transfer2.5-2B, 704x1280, 93-frame chunks, on GPU 0
    python benchmarks/real_size.py --placements 4       # also the 4-rank preset under torchrun (needs 4 GPUs)
    python benchmarks/real_size.py --small              # the same code, reduced layers and size, on CPU (a test runs it)

Part 1, one process, the product's stage classes (``transfer.checkpoint`` loaders with random weights, the run dtype):
seconds per call of the text encoder (one prompt), the VAE encoding one chunk of one control, a DiT step with CFG
(two branches) and without, the VAE decode of a chunk and its re-encode (roundtrip chunk conditioning), and the peak
memory of each call above what was resident before it (``torch.cuda.max_memory_allocated`` on CUDA; sampled RSS on
CPU). From these, the projected wall time of a full video (``--full_steps`` steps, ``--full_chunks`` chunks, two
controls) next to upstream's published 1/4/8-GPU times (../shared/ANCHORS.md).

Part 2, for each ``--placements`` world size the visible devices allow: ``transfer.py`` under torchrun with
``--random_weights --trace`` on a ``--chunks``-chunk, two-control input: wall time, per rank and stage the busy
seconds and the bytes sent (the run's own stage table), and each rank's memory line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs.models import preset  # noqa: E402
from transfer.checkpoint import info_from_preset, load_dit, load_text_encoder, load_vae  # noqa: E402
from transfer.job import dtype_for  # noqa: E402
from transfer.pipeline import ModelLimits  # noqa: E402

#: Upstream's published times for one Transfer2.5-2B edge-control video, 720p, 93 frames per chunk (H100 NVL).
UPSTREAM_SECONDS = {1: 502.6, 4: 154.5, 8: 92.5}
CONTROLS = ("edge", "vis")


class PeakMemory:
    """Peak memory of a block above what was in use when it started: CUDA allocator stats, or sampled RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            import psutil

            process = psutil.Process()
            self.base, self.peak, self._stop = process.memory_info().rss, 0, threading.Event()

            def sample():
                while not self._stop.is_set():
                    self.peak = max(self.peak, process.memory_info().rss - self.base)
                    self._stop.wait(0.002)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self._stop.set()
            self._thread.join()


def timed(device: torch.device, fn, repeats: int = 1):
    """(mean seconds, peak bytes, last result) of ``fn()`` over ``repeats`` calls."""
    result, seconds, peak = None, 0.0, 0
    for _ in range(repeats):
        with PeakMemory(device) as memory:
            start = time.perf_counter()
            result = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds += time.perf_counter() - start
        peak = max(peak, memory.peak)
    return seconds / repeats, peak, result


def stage_costs(args, device: torch.device, dtype: torch.dtype) -> dict:
    """Seconds and peak bytes per call of each stage, one process."""
    info = info_from_preset(preset(args.preset))
    limits = ModelLimits.from_info(info)
    costs = {}
    load_start = time.perf_counter()
    text = load_text_encoder(info, device, dtype)
    vae = load_vae(info, device, dtype)
    dit = load_dit(info, list(CONTROLS), device, dtype)
    costs["load"] = (time.perf_counter() - load_start, 0)
    prompt = "a robot arm picks up a red cube from a wooden table, sunlight, high detail " * 4
    costs["text encode"] = timed(device, lambda: text.encode(prompt), args.repeats)[:2]
    embeds = text.encode(prompt)
    video = torch.rand(1, 3, args.frames, args.height, args.width, generator=torch.Generator().manual_seed(0)) * 2 - 1
    seconds, peak, control = timed(device, lambda: vae.encode(video, dtype), args.repeats)
    costs["VAE encode (one control)"] = (seconds, peak)
    f = limits.spatial_factor
    shape = (1, 16, limits.latent_frames(args.frames), args.height // f, args.width // f)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    controls, scales = {m: control for m in CONTROLS}, {m: 0.5 for m in CONTROLS}
    for label, guidance in (("DiT step, CFG (2 branches)", 3.0), ("DiT step, no CFG", 1.0)):
        seconds, peak, latents = timed(device, lambda: dit.denoise(noise, None, 0, controls, scales, embeds, embeds * 0,
                                                                    args.steps, guidance, (args.height, args.width)))
        costs[label] = (seconds / args.steps, peak)
    seconds, peak, frames = timed(device, lambda: vae.decode(latents), args.repeats)
    costs["VAE decode (one chunk)"] = (seconds, peak)
    costs["VAE re-encode (roundtrip)"] = timed(device, lambda: vae.encode(frames.to(device), dtype), args.repeats)[:2]
    costs["weights of every stage (resident)"] = (0, sum(p.numel() * p.element_size() for m in (text.model, vae.vae, dit.transformer,
                                                                       *dit.controlnets.values()) for p in m.parameters()))
    return costs


def projection(costs: dict, steps: int, chunks: int) -> dict[str, float]:
    """Projected seconds of a ``chunks``-chunk, two-control video at ``steps`` steps, from the per-call costs.

    One GPU: everything in turn. Stage processes (text, VAE, DiT on other GPUs): the text encoder and the control
    encodes run ahead, the critical path per chunk is the DiT steps plus the decode and re-encode that make the next
    chunk's condition (``roundtrip``); with a CFG pair the two branches run side by side (no-CFG step time; the
    exchange of one latent per step is left out). Projections, not measurements."""
    c = {k: v[0] for k, v in costs.items()}
    per_chunk_vae = 2 * c["VAE encode (one control)"] + c["VAE decode (one chunk)"] + c["VAE re-encode (roundtrip)"]
    one = 2 * c["text encode"] + chunks * (steps * c["DiT step, CFG (2 branches)"] + per_chunk_vae)
    seam = c["VAE decode (one chunk)"] + c["VAE re-encode (roundtrip)"]
    stages = 2 * c["text encode"] + chunks * (steps * c["DiT step, CFG (2 branches)"] + seam)
    pair = 2 * c["text encode"] + chunks * (steps * c["DiT step, no CFG"] + seam)
    return {"1 GPU, all stages": one, "stage processes, 1 DiT GPU": stages, "stage processes, CFG pair": pair}


def write_inputs(folder: Path, frames: int, height: int, width: int) -> Path:
    """A two-control spec over synthetic video of the given size (written with the product's writer)."""
    from transfer.video_io import write_mp4

    y, x = np.mgrid[0:height, 0:width]
    video = np.stack([np.stack([(x + 3 * t) % 256, (y + 2 * t) % 256, (x + y) % 256], -1) for t in range(frames)])
    write_mp4(folder / "input.mp4", video.astype(np.uint8), 24)
    spec = {"prompt": "a robot arm picks up a red cube", "input_video_path": str(folder / "input.mp4"),
            **{m: {"control_weight": 0.5} for m in CONTROLS}}  # computed controls (OpenCV), as a user's edge run
    (folder / "spec.json").write_text(json.dumps(spec))
    return folder / "spec.json"


def placement_run(args, world: int, spec: Path, folder: Path) -> dict:
    """``transfer.py`` under torchrun on ``world`` ranks with random weights: wall time and the run's own tables."""
    trace = folder / f"trace{world}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), str(ROOT / "transfer.py"),
           "--num_gpus", str(world), "--controlnet_specs", str(spec), "--video_save_folder", str(folder / f"out{world}"),
           "--random_weights", "--checkpoint_preset", args.preset, "--num_steps", str(args.steps),
           "--num_frames_per_chunk", str(args.frames), "--guardrail", "off", "--trace", str(trace)]
    if args.dtype != "auto":
        cmd += ["--dtype", args.dtype]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - start
    lines = (proc.stdout + proc.stderr).splitlines()
    table = [ln for ln in lines if ln.lstrip().startswith(("rank", "----")) or "busy s" in ln or ln[:4].strip().isdigit()]
    memory = list(dict.fromkeys(ln for ln in lines if "weights on" in ln))  # each rank's line once
    return {"world": world, "rc": proc.returncode, "wall": wall, "table": table, "memory": memory,
            "error": None if proc.returncode == 0 else "\n".join(lines[-15:])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="transfer2.5-2b")
    p.add_argument("--height", type=int, default=704)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--frames", type=int, default=93, help="frames per chunk, 1 + 4k (default: 93)")
    p.add_argument("--steps", type=int, default=2, help="denoising steps measured (default: 2)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--chunks", type=int, default=2, help="chunks of the placement runs' input (default: 2)")
    p.add_argument("--full_steps", type=int, default=36)
    p.add_argument("--full_chunks", type=int, default=5)
    p.add_argument("--placements", default="", help="comma-separated world sizes to run under torchrun, e.g. 4,8")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    p.add_argument("--small", action="store_true",
                   help="CPU check: transfer2.5-2b-small at 9 frames 64x96, 2 steps, placements 1 and 4 (gloo)")
    args = p.parse_args()
    if args.small:
        args.preset, args.height, args.width, args.frames, args.steps = "transfer2.5-2b-small", 64, 96, 9, 2
        args.placements = args.placements or "1,4"
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    dtype = dtype_for(device, args.dtype)
    print(f"{args.preset}, random weights, {device} ({str(dtype).removeprefix('torch.')}), chunk "
          f"{args.frames}x{args.height}x{args.width}, {args.steps} steps measured\n")

    costs = stage_costs(args, device, dtype)
    print("| stage call | seconds | peak memory above resident, MB |")
    print("|---|---:|---:|")
    for name, (seconds, peak) in costs.items():
        print(f"| {name} | {seconds:.3f} | {peak / 2**20:.1f} |")
    proj = projection(costs, args.full_steps, args.full_chunks)
    print(f"\nprojected wall time of a {args.full_chunks}-chunk, 2-control video at {args.full_steps} steps "
          "(from the per-call costs above; not measured):\n")
    print("| placement | projected s |")
    print("|---|---:|")
    for name, seconds in proj.items():
        print(f"| {name} | {seconds:.1f} |")
    print("\nupstream published (Transfer2.5-2B, edge, 720p, H100 NVL): "
          + ", ".join(f"{n} GPU {s} s" for n, s in UPSTREAM_SECONDS.items()))

    worlds = [int(w) for w in args.placements.split(",") if w]
    gpus = torch.cuda.device_count()
    if worlds:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            spec = write_inputs(folder, args.chunks * (args.frames - 1) + 1, args.height, args.width)
            for world in worlds:
                if gpus and world > gpus:
                    print(f"\n{world} ranks: skipped ({gpus} GPU(s) visible)")
                    continue
                run = placement_run(args, world, spec, folder)
                print(f"\n{world} rank(s), transfer.py --random_weights, {args.chunks} chunks x {args.steps} steps: "
                      f"wall {run['wall']:.1f} s" + ("" if run["rc"] == 0 else f", FAILED (exit {run['rc']})"))
                for line in run["table"] + run["memory"]:
                    print("    " + line)
                if run["error"]:
                    print(run["error"])


if __name__ == "__main__":
    main()
