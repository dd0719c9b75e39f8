"""Encode time and size of the project's video writers at a real size, before and after pinning the settings.

    python benchmarks/video_encode.py                       # 1280x720, 1000 frames (about 10 minutes on 2 cores)
    python benchmarks/video_encode.py --frames 100 --repeats 3

Rows:

- ``imageio default (before)``: what ``write_mp4`` did before: imageio's PyAV writer, libx264 with its defaults
  (one slice thread per CPU core, macroblock-tree rate control on). Its bytes were not a function of the frames.
- ``write_mp4 (after)``: ``transfer.video_io.write_mp4``: libx264, ``ENCODER_THREADS`` slice threads, ``mbtree=0``,
  ``bitexact`` container.
- ``write_mp4, N threads``: the same settings at other slice-thread counts (any constant is reproducible; each
  count gives its own bytes).
- ``write_lossless_mp4 (edge|vis)``: the lossless cache of a computed control (libx264rgb, qp 0), for Canny edges and
  for the vis preprocessor's blur of the same frames; ``exact`` says the decoded frames equal the written ones.

``hashes`` is the number of distinct file digests over ``--repeats`` encodes of the same frames (1 = reproducible).
The frames are synthetic: smooth moving gradients, two moving shapes, mild noise (a stand-in for camera video).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transfer import video_io  # noqa: E402


def synthetic(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width * 160 + 40, y / height * 120 + 60, (x + y) / (width + height) * 100 + 80], -1)
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        f = base + 30 * np.sin((x[..., None] + 4 * t) / 97.0)
        for k, color in enumerate(([230, 40, 40], [40, 200, 90])):
            cx, cy = int((0.2 + 0.3 * k) * width + 3 * t * (1 + k)) % width, int(0.5 * height + 0.3 * height * np.sin(t / 40 + k))
            f[max(cy - height // 8, 0):cy + height // 8, max(cx - width // 12, 0):cx + width // 12] = color
        f += rng.normal(0, 2, f.shape).astype(np.float32)
        out[t] = np.clip(f, 0, 255)
    return out


def imageio_default(path: Path, frames: np.ndarray, fps: float) -> None:
    import imageio.v3 as iio

    with video_io.atomic_path(path) as tmp:
        iio.imwrite(tmp, frames, plugin="pyav", codec="libx264", fps=fps, in_pixel_format="rgb24")


def with_threads(n: int):
    def write(path: Path, frames: np.ndarray, fps: float) -> None:
        saved, video_io.ENCODER_THREADS = video_io.ENCODER_THREADS, n
        try:
            video_io.write_mp4(path, frames, fps)
        finally:
            video_io.ENCODER_THREADS = saved
    return write


def measure(write, frames: np.ndarray, repeats: int, folder: Path, check_exact: bool = False) -> dict:
    path, times, digests = folder / "bench.mp4", [], set()
    for _ in range(repeats):
        start = time.perf_counter()
        write(path, frames, 24.0)
        times.append(time.perf_counter() - start)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    row = {"s": min(times), "fps": len(frames) / min(times), "MB": path.stat().st_size / 1e6, "hashes": len(digests)}
    if check_exact:
        row["exact"] = bool(np.array_equal(video_io.read_video(path, max_frames=len(frames) + 1)[0], frames))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", default="1,4", help="other thread counts to time with the pinned settings")
    args = parser.parse_args()

    import cv2
    from preprocessors import vis

    frames = synthetic(args.frames, args.height, args.width)
    edges = np.stack([np.repeat(cv2.Canny(f, 100, 200)[..., None], 3, -1) for f in frames])
    blurred = vis.Preprocessor(vis.Config.from_options({"blur_strength": "medium"}))(frames, None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows.append(("imageio default (before)", measure(imageio_default, frames, args.repeats, folder)))
        rows.append((f"write_mp4 (after, {video_io.ENCODER_THREADS} slice threads)", measure(video_io.write_mp4, frames, args.repeats, folder)))
        for n in [int(t) for t in args.threads.split(",") if t]:
            rows.append((f"write_mp4, {n} threads", measure(with_threads(n), frames, args.repeats, folder)))
        rows.append(("write_lossless_mp4 (edge)", measure(video_io.write_lossless_mp4, edges, args.repeats, folder, True)))
        rows.append(("write_lossless_mp4 (vis)", measure(video_io.write_lossless_mp4, blurred, args.repeats, folder, True)))
    before = rows[0][1]["s"]
    print(f"\n{args.frames} frames {args.width}x{args.height}, best of {args.repeats}\n")
    print("| writer | s | frames/s | vs before | MB | hashes | exact |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, r in rows:
        print(f"| {name} | {r['s']:.1f} | {r['fps']:.1f} | {r['s'] / before:.2f}x | {r['MB']:.1f} | {r['hashes']} | "
              f"{r.get('exact', '-')} |")


if __name__ == "__main__":
    main()
