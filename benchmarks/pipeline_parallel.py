"""One process vs stage processes on the same batch, side by side, with a ratio table.

    python benchmarks/pipeline_parallel.py [--requests 4] [--nproc 4] [--num_steps 36]

Builds a batch of multi-chunk requests from the example assets (121 frames, 93-frame chunks
-> 2 chunks each, edge + vis controls, one seed per request), runs it once with
``python transfer.py`` and once with ``torchrun --nproc_per_node N transfer.py --num_gpus N
--trace``, checks that both wrote bit-identical ``--save_raw`` arrays, and prints:

- command wall time of each run (process start to exit, what a user waits) and their ratio;
- each stage's busy seconds in the N-process run (from its trace, top-level spans);
- the N-process run's wall time (from process-group start, model loading included) over the
  busiest stage's busy time: 1.0 means everything else hid behind the busiest stage.

Every process uses ``--threads`` torch threads (default 1, torchrun's default), so the stage
processes compute the same numbers as the single process. It is a CPU measure of scheduling
and overlap; on GPUs each stage would have its own device.
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

from transfer.distributed.trace import busy_by_stage, spans_from_chrome_trace  # noqa: E402


def write_batch(folder: Path, requests: int) -> Path:
    assets = ROOT / "assets"
    lines = [
        {"name": f"request_{j}", "prompt": f"request {j}: a yellow ball rolls past a red box",
         "input_video_path": str(assets / "example_input.mp4"), "seed": 100 + j,
         "edge": {"control_weight": 0.7, "input_control": str(assets / "example_edge.mp4")},
         "vis": {"control_weight": 0.5, "input_control": str(assets / "example_vis.mp4")}}
        for j in range(requests)
    ]
    path = folder / "batch.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"benchmark run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=4, help="requests in the batch (default: 4)")
    p.add_argument("--nproc", type=int, default=4, help="stage processes (default: 4 = coordinator, text, vae, dit)")
    p.add_argument("--num_steps", type=int, default=36, help="denoising steps per chunk (default: 36)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default: 1)")
    p.add_argument("--checkpoint_preset", default="tiny", help="embedded checkpoint (default: tiny)")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-pp-"))
    batch = write_batch(work, args.requests)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TRANSFER_LOG_LEVEL": "WARNING"}
    common = ["--cpu_threads", str(args.threads),
              "--batch_input_path", str(batch), "--num_steps", str(args.num_steps), "--save_raw",
              "--checkpoint_preset", args.checkpoint_preset]
    # build the checkpoint outside the timed runs
    subprocess.run([sys.executable, "-c", f"from transfer.embedded_checkpoint import ensure_tiny_checkpoint as e; e({args.checkpoint_preset!r})"],
                   cwd=ROOT, env=env, check=True)

    one = timed([sys.executable, str(ROOT / "transfer.py"), *common, "--video_save_folder", str(work / "one")], env)
    trace = work / "trace.json"
    many = timed([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
                  str(ROOT / "transfer.py"), "--num_gpus", str(args.nproc), *common,
                  "--video_save_folder", str(work / "many"), "--trace", str(trace)], env)

    identical = all(
        all(np.array_equal(a[k], b[k]) for k in ("frames", "latents"))
        for a, b in ((np.load(work / "one" / f"request_{j}.npz"), np.load(work / "many" / f"request_{j}.npz"))
                     for j in range(args.requests))
    )
    spans, other = spans_from_chrome_trace(trace)
    busy = busy_by_stage(spans)
    (busiest_rank, busiest_stage), busiest = max(busy.items(), key=lambda kv: kv[1])
    run_wall = other["wall_s"]

    print(f"\n{args.requests} requests x 2 chunks (93 frames, 160x96, edge+vis), {args.num_steps} steps, "
          f"preset {args.checkpoint_preset}, {args.threads} thread(s)/process, {os.cpu_count()} CPU cores\n")
    print("| run | command wall s | speed-up |")
    print("|---|---:|---:|")
    print(f"| 1 process | {one:.1f} | 1.00 |")
    print(f"| {args.nproc} stage processes | {many:.1f} | {one / many:.2f} |")
    print(f"\n{args.nproc}-process run: wall {run_wall:.1f} s (from process-group start, model loading included)\n")
    print("| rank | stage | busy s | busy / wall |")
    print("|---:|---|---:|---:|")
    for (rank, stage), seconds in sorted(busy.items()):
        print(f"| {rank} | {stage} | {seconds:.1f} | {seconds / run_wall:.0%} |")
    print(f"\nwall / busiest stage ({busiest_stage}, rank {busiest_rank}): {run_wall / busiest:.3f}")
    print(f"--save_raw arrays bit-identical between the two runs: {'yes' if identical else 'NO'}")
    print(f"(outputs and trace kept in {work})")
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
