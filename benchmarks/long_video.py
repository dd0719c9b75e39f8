"""``roundtrip`` vs ``latent`` chunk conditioning on a long input, one process and N stage processes.

    python benchmarks/long_video.py [--num_frames_per_chunk 29] [--num_steps 12] [--nproc 4]

The example input (121 frames, 160x96, edge + vis) in 29-frame chunks with 1 conditioning
frame is 5 chunks. Each mode runs once in one process and twice under torchrun with a trace:
the CPU preset (the VAE on a rank of its own), and with ``--vae_parallel_degree 2`` (the DiT
group's two ranks also form the VAE group and split each VAE call between denoising: the
layout GPUs get by default). Prints wall times, the DiT leader's waits between chunks (VAE
work on the critical path), and quality figures of ``latent`` against ``roundtrip``: PSNR
between the two outputs, and seam continuity per mode (mean absolute frame-to-frame difference
across chunk boundaries divided by the same within chunks; 1.0 = seams look like any other cut
between consecutive frames). Random tiny weights: the quality figures describe this model's
behaviour, not a trained one's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transfer.distributed.trace import spans_from_chrome_trace  # noqa: E402
from transfer.chunks import plan_chunks  # noqa: E402


def run(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"benchmark run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def seam_ratio(frames: np.ndarray, boundaries: list[int]) -> float:
    diffs = np.abs(np.diff(frames.astype(np.float64), axis=0)).mean(axis=(1, 2, 3))  # diffs[t] = |f[t+1] - f[t]|
    at = np.array([b - 1 for b in boundaries])
    inside = np.setdiff1d(np.arange(len(diffs)), at)
    return float(diffs[at].mean() / diffs[inside].mean())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_frames_per_chunk", type=int, default=29)
    p.add_argument("--num_steps", type=int, default=12)
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default: 1)")
    args = p.parse_args()
    F, C = args.num_frames_per_chunk, 1
    chunks = plan_chunks(121, F, C)
    boundaries = [start + C for start, _ in chunks[1:]]  # first output frame of each later chunk

    work = Path(tempfile.mkdtemp(prefix="bench-long-"))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TRANSFER_LOG_LEVEL": "WARNING"}
    common = ["--cpu_threads", str(args.threads),
              "--controlnet_specs", str(ROOT / "assets" / "example_multi_spec.json"), "--num_steps", str(args.num_steps),
              "--num_frames_per_chunk", str(F), "--num_conditional_frames", str(C), "--save_raw",
              "--checkpoint_preset", "tiny"]
    subprocess.run([sys.executable, "-c", "from transfer.embedded_checkpoint import ensure_tiny_checkpoint as e; e('tiny')"],
                   cwd=ROOT, env=env, check=True)
    layouts = {"VAE rank of its own (CPU preset)": [], "VAE group over the DiT group": ["--vae_parallel_degree", "2"]}
    rows, frames = {}, {}
    for mode in ("roundtrip", "latent"):
        one = run([sys.executable, str(ROOT / "transfer.py"), *common, "--chunk_conditioning", mode,
                   "--video_save_folder", str(work / f"{mode}-1")], env)
        a = np.load(work / f"{mode}-1" / "output.npz")
        frames[mode] = a["frames"]
        for i, (layout, extra) in enumerate(layouts.items()):
            trace, out = work / f"{mode}-{i}.json", work / f"{mode}-{args.nproc}-{i}"
            many = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
                        str(ROOT / "transfer.py"), "--num_gpus", str(args.nproc), *common, "--chunk_conditioning", mode,
                        "--video_save_folder", str(out), "--trace", str(trace), *extra], env)
            b = np.load(out / "output.npz")
            diff = float(np.abs(a["latents"] - b["latents"]).max())
            spans, other = spans_from_chrome_trace(trace)
            dit = sorted((s for s in spans if s["stage"] == "dit" and s["name"] == "denoise"), key=lambda s: s["start"])
            waits = sum(b["start"] - a["end"] for a, b in zip(dit, dit[1:]))  # the leader's, between its chunks
            vae_busy = max(sum(s["end"] - s["start"] for s in spans if s["stage"] == "vae" and s["rank"] == r
                               and not s["args"].get("nested")) for r in {s["rank"] for s in spans})
            rows[mode, layout] = (one, many, other["wall_s"], waits, vae_busy, diff)

    print(f"\n121 frames, 160x96, edge+vis, {len(chunks)} chunks of {F} frames (C = {C}), {args.num_steps} steps, "
          f"tiny checkpoint, {args.threads} thread(s)/process, {os.cpu_count()} CPU cores\n")
    print(f"| mode | {args.nproc}-process layout | 1 process wall s | {args.nproc} processes wall s | DiT leader's waits "
          f"between chunks s | VAE busy s (busiest rank) | max abs latent diff vs 1 proc |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (mode, layout), (one, many, wall, waits, vae, diff) in rows.items():
        print(f"| {mode} | {layout} | {one:.1f} | {many:.1f} (run {wall:.1f}) | {waits:.2f} | {vae:.1f} | {diff:.1e} |")
    print()
    for layout in layouts:
        r, lt = rows["roundtrip", layout], rows["latent", layout]
        print(f"latent / roundtrip wall, {layout}: 1 process {lt[0] / r[0]:.3f}, {args.nproc} processes "
              f"{lt[1] / r[1]:.3f} (runs {lt[2] / r[2]:.3f})")
    print(f"PSNR latent vs roundtrip output: {psnr(frames['latent'], frames['roundtrip']):.2f} dB")
    print(f"seam continuity (boundary / within-chunk frame difference): roundtrip "
          f"{seam_ratio(frames['roundtrip'], boundaries):.3f}, latent {seam_ratio(frames['latent'], boundaries):.3f}")
    print(f"(outputs and traces kept in {work})")


if __name__ == "__main__":
    main()
