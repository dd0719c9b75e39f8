"""Quality of the shipped demo checkpoint on held-out scenes of its world, the random-weight tiny one as the floor.

    python benchmarks/quality.py                    # 16 scenes x 9 frames; 4 scenes x 41 frames (5 chunks) per mode
    python benchmarks/quality.py --sweep            # also other steps and guidance for the demo (its defaults)
    python benchmarks/quality.py --checkpoint_dir DIR ...   # also other checkpoints (training snapshots: the curve)
    python benchmarks/quality.py --step_cache       # also each --step_cache method and setting against the exact run

Each row is one ``transfer.py --batch_input_path`` run (a subprocess, as a user runs it) over held-out scenes
(``demo.world.HELD_OUT_SEEDS``: never seen in training): the input video rendered, the edge control computed from it
by the tool, the scene's prompt. Metrics (``demo.metrics``) on the output mp4s, averaged over scenes: edge F1 of the
output's Canny edges against the control (2 px tolerance), prompt color accuracy (dominant color inside each shape,
the world's 6 colors: chance 17%), background color accuracy, and for 5-chunk videos the seam ratio (mean frame-to-frame
difference across chunk boundaries / within chunks; the input video's own ratio beside it) for ``roundtrip`` and
``latent`` chunk conditioning. A first table scores the README's own scene in both its forms (``demo.evaluate.
score_readme``: frames whose background is >= 90% blue, each shape's frames in its colour; ``--readme_only``: that
table alone, the quick score of a training snapshot). Color accuracy is also split by the number of shapes in the scene, and a last row
passes the inputs through the demo VAE alone: the ceiling a DiT on that VAE could reach. ``--step_cache`` adds a
table of the lossy step caches (``transfer.families.transfer25.step_cache``) on the same scenes: the share of DiT forwards saved (from
each chunk's logged computed steps), the metrics, and the PSNR of the output frames against the exact (uncached)
run's. Prints markdown tables (docs/demo.md, docs/long_video.md, docs/performance.md).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.models import DEMO_CHECKPOINT  # noqa: E402
import numpy as np  # noqa: E402

from demo.evaluate import (README_FORMS, generate, held_out, mean, readme_scene, round_trip, score,  # noqa: E402
                           write_batch)
from transfer.chunks import plan_chunks  # noqa: E402
from transfer.video_io import read_video  # noqa: E402

CHUNK, LONG = 9, 41  # the demo's chunk length; 5 chunks of 9 frames overlapping by 1


def run_row(batch, cases, work: Path, checkpoint: str | Path, flags: list[str], threads: int, boundaries=None) -> dict:
    label = checkpoint.name if isinstance(checkpoint, Path) else checkpoint
    out = work / f"{label}-{'_'.join(f.strip('-') for f in flags) or 'defaults'}"
    start = time.perf_counter()
    generate(batch, out, checkpoint, *flags, threads=threads)
    seconds = time.perf_counter() - start
    return {**mean([score(out, case, boundaries) for case in cases]), "seconds": seconds}


#: ``--step_cache`` settings the cache table runs (each a row), from mild to aggressive.
CACHE_SETTINGS = (
    ["--step_cache", "taylorseer", "--step_cache_interval", "2"],
    ["--step_cache", "taylorseer", "--step_cache_interval", "3"],
    ["--step_cache", "taylorseer", "--step_cache_interval", "4"],
    ["--step_cache", "adaptive", "--step_cache_threshold", "0.03"],
    ["--step_cache", "adaptive", "--step_cache_threshold", "0.05"],
    ["--step_cache", "adaptive", "--step_cache_threshold", "0.1"],
    ["--step_cache", "adaptive", "--step_cache_threshold", "0.2"],
)
COMPUTED = re.compile(r"step cache .*: computed (\d+) of (\d+) steps")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def cache_row(batch, cases, work: Path, exact: Path, flags: list[str], threads: int) -> dict:
    """One cached run of the scenes: its metrics, the forwards saved, the PSNR against the exact run's frames."""
    out = work / f"demo-{'_'.join(f.strip('-') for f in flags)}"
    start = time.perf_counter()
    log = generate(batch, out, "demo", *flags, threads=threads, log_level="INFO")
    seconds = time.perf_counter() - start
    counts = [(int(c), int(n)) for c, n in COMPUTED.findall(log)]
    saved = 1 - sum(c for c, _ in counts) / max(sum(n for _, n in counts), 1)
    frames = [(read_video(out / f"{c.name}.mp4")[0], read_video(exact / f"{c.name}.mp4")[0]) for c in cases]
    return {**mean([score(out, case) for case in cases]), "seconds": seconds, "saved": saved,
            "psnr": float(np.mean([psnr(a, b) for a, b in frames]))}


def ceiling_row(cases, work: Path) -> dict:
    """The inputs through the demo VAE and back: the best any DiT on this VAE could score."""
    out = work / "vae-round-trip"
    start = time.perf_counter()
    round_trip(out, cases, DEMO_CHECKPOINT)
    return {**mean([score(out, case) for case in cases]), "seconds": time.perf_counter() - start}


def readme_table(work: Path, folders: list[Path]) -> None:
    """The README's scene in both its forms through the demo and each checkpoint folder, as the README states it."""
    print("\nThe README scene (a black circle and a yellow square on a blue background; 41 frames, 5 chunks of 9)\n")
    print("| checkpoint | form | edge F1 | frames, background >= 90% blue | background blue (mean / frame 0 / worst "
          "frame) | black circle black (frames) | yellow square yellow (frames) | background holds at boundaries |")
    print("|---|---|---:|---:|---|---:|---:|---:|")
    for name, checkpoint in [("demo", "demo"), *((str(f), f.resolve()) for f in folders)]:
        for form in README_FORMS:
            r = readme_scene(work / f"readme-{Path(name).name}-{form}", checkpoint, form)
            s = r["shape_frames"]
            print(f"| {name} | {form} | {r['edge_f1']:.3f} | {r['background_frames_90']:.0%} | "
                  f"{r['background_mean']:.0%} / {r['background_frame0']:.0%} / {r['background_worst']:.0%} | "
                  f"{s['black circle']:.0%} | {s['yellow square']:.0%} | {r['background_holds']:.0%} |", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", type=int, default=16, help="held-out scenes of one chunk (default: 16)")
    p.add_argument("--long_scenes", type=int, default=4, help="held-out 5-chunk scenes per mode (default: 4; 0: skip)")
    p.add_argument("--sweep", action="store_true",
                   help="also the demo at guidance 2, 3, 5 and at 10 steps (how its defaults were chosen)")
    p.add_argument("--checkpoint_dir", type=Path, action="append", default=[],
                   help="also this checkpoint at its own defaults (repeatable: e.g. training snapshots)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of each run")
    p.add_argument("--readme_only", action="store_true",
                   help="only the README scene's table (the quick score of a training snapshot)")
    p.add_argument("--step_cache", action="store_true",
                   help="also the demo with each step cache setting (CACHE_SETTINGS) against its exact run")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    readme_table(work, args.checkpoint_dir)
    if args.readme_only:
        return 0
    batch, cases = write_batch(work / "short", held_out(args.scenes), CHUNK)
    rows = [("demo", "defaults", run_row(batch, cases, work, "demo", [], args.threads)),
            ("tiny (random weights)", "--num_frames_per_chunk 9",
             run_row(batch, cases, work, "tiny", ["--num_frames_per_chunk", "9"], args.threads))]
    for folder in args.checkpoint_dir:
        rows.append((str(folder), "defaults", run_row(batch, cases, work, folder.resolve(), [], args.threads)))
    if args.sweep:
        for flags in (["--guidance", "2"], ["--guidance", "3"], ["--guidance", "5"], ["--num_steps", "10"]):
            rows.append(("demo", " ".join(flags), run_row(batch, cases, work, "demo", flags, args.threads)))
    rows.append(("demo VAE round trip of the input (the ceiling)", "", ceiling_row(cases, work)))
    counts = sorted({len(case.scene.shapes) for case in cases})

    print(f"\n{args.scenes} held-out scenes x {CHUNK} frames at 64 x 64 ({os.cpu_count()} CPU cores, "
          f"{args.threads} threads)\n")
    by_count = " | ".join(f"color, {n} shape{'s' * (n > 1)} ({sum(len(c.scene.shapes) == n for c in cases)} scenes)"
                          for n in counts)
    print(f"| checkpoint | flags | edge F1 | color accuracy | background accuracy | {by_count} "
          "| frames, background >= 90% its color | shapes in color in >= 90% of frames | run s |")
    print("|---|---|---:|---:|---:|" + "---:|" * len(counts) + "---:|---:|---:|")
    for name, flags, r in rows:
        split = " | ".join(f"{r[f'color_{n}']:.1%}" for n in counts)
        print(f"| {name} | {flags} | {r['edge_f1']:.3f} | {r['color']:.1%} | {r['background']:.1%} | {split} "
              f"| {r['background_frames_90']:.1%} | {r['shapes_90']:.1%} | {r['seconds']:.0f} |")

    if args.step_cache:
        exact = work / "demo-defaults"
        print(f"\nstep caches ({args.scenes} held-out scenes x {CHUNK} frames, demo defaults: 20 steps, no CFG); PSNR of "
              "the output frames against the exact run's\n")
        print("| --step_cache | DiT forwards saved | edge F1 | color accuracy | background accuracy | PSNR vs exact (dB) "
              "| run s |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        r = rows[0][2]
        print(f"| off (exact) | 0% | {r['edge_f1']:.3f} | {r['color']:.1%} | {r['background']:.1%} | inf | "
              f"{r['seconds']:.0f} |")
        for flags in CACHE_SETTINGS:
            r = cache_row(batch, cases, work, exact, flags, args.threads)
            label = " ".join(flags[1:]).replace("--step_cache_", "")
            print(f"| {label} | {r['saved']:.0%} | {r['edge_f1']:.3f} | {r['color']:.1%} | {r['background']:.1%} | "
                  f"{r['psnr']:.1f} | {r['seconds']:.0f} |", flush=True)

    if args.long_scenes:
        batch, cases = write_batch(work / "long", held_out(args.long_scenes, start=args.scenes), LONG)
        chunks = plan_chunks(LONG, CHUNK, 1)
        boundaries = [start + 1 for start, _ in chunks[1:]]
        print(f"\n{args.long_scenes} held-out scenes x {LONG} frames: {len(chunks)} chunks of {CHUNK} frames, "
              "1 conditional frame (demo defaults)\n")
        print("| checkpoint | chunk conditioning | seam ratio (output) | seam ratio (input) | edge F1 | color accuracy "
              "| background accuracy | videos whose background colour holds at every boundary | run s |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, checkpoint in [("demo", "demo"), *((str(f), f.resolve()) for f in args.checkpoint_dir)]:
            for mode in ("roundtrip", "latent"):
                r = run_row(batch, cases, work, checkpoint, ["--chunk_conditioning", mode], args.threads, boundaries)
                print(f"| {name} | {mode} | {r['seam']:.3f} | {r['seam_input']:.3f} | {r['edge_f1']:.3f} "
                      f"| {r['color']:.1%} | {r['background']:.1%} | {r['background_holds']:.0%} | {r['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
