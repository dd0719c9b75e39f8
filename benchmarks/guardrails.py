"""``--guardrail on`` vs ``async`` with a deliberately slow guard, one process and N stage processes.

    python benchmarks/guardrails.py [--requests 4] [--text_delay 1.0] [--video_delay 6.0] [--nproc 4]

The guards are the shipped ones (blocklist, face pixelation) plus a slow guard that sleeps
``--text_delay`` seconds per prompt checked (prompt and negative prompt) and ``--video_delay``
per video, standing in for a guard LLM or a video classifier. Each mode runs the same batch
(requests of 29 frames, one chunk, edge control, tiny checkpoint). Prints wall times, the guard
time the run contains, how much of it ``async`` hid, whether both modes wrote identical files, and
(stage processes) the coordinator's busy seconds from the trace: in ``on`` mode the guards run in
the coordinator's loop, which is its own process, so they already overlap the other stages'
work; ``async`` takes them off that loop.

The slow guard is installed by running this file as the CLI (``--as-cli``), in every process
(only the coordinator builds guards).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class SlowGuard:
    name = "slow"

    def __init__(self, text_delay: float, video_delay: float):
        self.text_delay, self.video_delay = text_delay, video_delay

    def check_text_safety(self, prompt: str) -> bool:
        time.sleep(self.text_delay)
        return True

    def check_video_safety(self, frames):
        time.sleep(self.video_delay)
        return frames


def as_cli(argv: list[str]) -> int:
    """transfer.py with the slow guard added to whatever guards the options build."""
    import guardrails
    from transfer import cli

    original = guardrails.build_guards
    text_delay, video_delay = float(os.environ["SLOW_TEXT"]), float(os.environ["SLOW_VIDEO"])

    def build_guards(guard, device="cpu"):
        guards = original(guard, device)
        if guards is not None:
            slow = SlowGuard(text_delay, video_delay)
            guards.text_guards.append(slow)
            guards.video_guards.append(slow)
        return guards

    guardrails.build_guards = build_guards
    return cli.main(argv)


def coordinator_busy(trace: Path) -> float:
    from transfer.distributed.trace import busy_by_stage, spans_from_chrome_trace

    spans, _ = spans_from_chrome_trace(trace)
    return busy_by_stage(spans).get((0, "coordinator"), 0.0)


def same_outputs(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if p.suffix == ".npz")
    if names != sorted(p.name for p in b.iterdir() if p.suffix == ".npz"):
        return False
    for name in names:
        with np.load(a / name) as x, np.load(b / name) as y:
            if x.files != y.files or any(not np.array_equal(x[k], y[k]) for k in x.files):
                return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--num_steps", type=int, default=12)
    p.add_argument("--text_delay", type=float, default=1.0, help="seconds per prompt checked (default: 1.0)")
    p.add_argument("--video_delay", type=float, default=6.0, help="seconds per video checked (default: 6.0)")
    p.add_argument("--nproc", type=int, default=4)
    args = p.parse_args()

    from transfer.embedded_checkpoint import ensure_tiny_checkpoint

    ensure_tiny_checkpoint("tiny")
    work = Path(tempfile.mkdtemp(prefix="bench_guard_"))
    lines = [{"name": f"req{j}", "prompt": f"a yellow ball rolls, take {j}", "seed": j,
              "input_video_path": str(ROOT / "assets" / "example_input.mp4"),
              "edge": {"control_weight": 1.0, "input_control": str(ROOT / "assets" / "example_edge.mp4")}}
             for j in range(args.requests)]
    (work / "batch.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFER_LOG_LEVEL": "WARNING",
           "SLOW_TEXT": str(args.text_delay), "SLOW_VIDEO": str(args.video_delay)}
    common = ["--batch_input_path", str(work / "batch.jsonl"), "--num_steps", str(args.num_steps),
              "--num_frames_per_chunk", "29", "--save_raw", "--checkpoint_preset", "tiny"]
    guard_s = args.requests * (2 * args.text_delay + args.video_delay)
    rows = []
    for nproc in (1, args.nproc):
        walls = {}
        for mode in ("on", "async"):
            out = work / f"{mode}_{nproc}"
            launcher = ([sys.executable] if nproc == 1 else
                        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)])
            cmd = [*launcher, str(Path(__file__).resolve()), "--as-cli", *common, "--video_save_folder", str(out),
                   "--guardrail", mode, "--num_gpus", str(nproc)]
            if nproc > 1:
                cmd += ["--trace", str(work / f"{mode}_{nproc}.json")]
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            walls[mode] = time.perf_counter() - start
            if proc.returncode != 0:
                sys.exit(f"benchmark run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
        identical = same_outputs(work / f"on_{nproc}", work / f"async_{nproc}")
        hidden = (walls["on"] - walls["async"]) / guard_s
        busy = {m: coordinator_busy(work / f"{m}_{nproc}.json") if nproc > 1 else None for m in walls}
        rows.append((nproc, walls["on"], walls["async"], walls["async"] / walls["on"], hidden, identical, busy))

    print(f"\n{args.requests} requests x 29 frames, {args.num_steps} steps; slow guard: {args.text_delay} s per prompt "
          f"(2 per request), {args.video_delay} s per video = {guard_s:.1f} s of guard time per run")
    print("| processes | on wall s | async wall s | async / on | guard time hidden | on == async "
          "| coordinator busy s, on / async |")
    print("|---:|---:|---:|---:|---:|---|---|")
    for nproc, on, asy, ratio, hidden, identical, busy in rows:
        busy_s = "-" if busy["on"] is None else f"{busy['on']:.1f} / {busy['async']:.1f}"
        print(f"| {nproc} | {on:.1f} | {asy:.1f} | {ratio:.3f} | {hidden:.0%} | {'yes' if identical else 'NO'} | {busy_s} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--as-cli":
        sys.exit(as_cli(sys.argv[2:]))
    main()
