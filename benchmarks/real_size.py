"""Real-size cost of every stage with random weights (``--random_weights``): no download, one command, any machine.

    python benchmarks/real_size.py                      # Transfer2.5-2B, 704x1280, 93-frame chunks, on GPU 0
    python benchmarks/real_size.py --placements 4       # also the 4-rank preset under torchrun (needs 4 GPUs)
    python benchmarks/real_size.py --small              # the same code, reduced layers and size, on CPU (a test runs it)
    python benchmarks/real_size.py --preset cosmos3-nano --height 720 --frames 121   # Cosmos 3 (benchmarks/cosmos3_costs.py)

Part 1, one process, the product's stage classes (``transfer.checkpoint`` loaders with random weights, the run dtype):
seconds per call of the text encoder (one prompt), the VAE encoding one chunk of one control, a DiT step with CFG
(two branches) and without, the VAE decode of a chunk and its re-encode (roundtrip chunk conditioning); the peak
memory of each call above what was allocated before it (``transfer.memory.measured_peak``:
``torch.cuda.max_memory_allocated`` on CUDA, the profiler's allocation events on CPU) beside ``--plan``'s estimate of
it from shapes (``transfer.memory.estimate_calls``), and the same for the whole process (weights + its largest call).
From the times, the projected wall time of a full video (``--full_steps`` steps, ``--full_chunks`` chunks, two
controls) next to upstream's published 1/4/8-GPU times (docs/performance.md).

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
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.call_costs import add_totals, timed  # noqa: E402
from benchmarks.cosmos3_costs import cosmos3_costs, cosmos3_projection  # noqa: E402
from configs.cosmos3 import COSMOS3_PRESETS  # noqa: E402
from configs.models import preset  # noqa: E402
from transfer.checkpoint import info_from_preset, load_stage  # noqa: E402
from transfer.device import dtype_for  # noqa: E402
from transfer.memory import CALLS, ChunkSize, call_inputs, estimate_calls, measured_peak  # noqa: E402
from transfer.residency import stage_modules, tensor_bytes  # noqa: E402

#: Upstream's published times for one Transfer2.5-2B edge-control video, 720p, 93 frames per chunk (H100 NVL).
UPSTREAM_SECONDS = {1: 502.6, 4: 154.5, 8: 92.5}
CONTROLS = ("edge", "vis")


def stage_costs(args, device: torch.device, dtype: torch.dtype) -> dict:
    """``{call: (seconds, measured peak bytes, estimated peak bytes)}`` for each stage call, one process; the
    memory of each call measured in a call of its own (``transfer.memory.measured_peak``), beside ``--plan``'s
    estimate of it (``estimate_calls``)."""
    info = info_from_preset(preset(args.preset))
    request = ChunkSize(args.height, args.width, args.frames, CONTROLS)
    estimates = {name: peak for calls in estimate_calls(info, request, dtype, device.type).values()
                 for name, peak in calls.items()}
    inputs = call_inputs(info, request, dtype)
    costs, weights, load = {}, 0, 0.0
    for stage in args.stages.split(","):
        start = time.perf_counter()
        obj = load_stage(info, stage, CONTROLS, device, dtype)
        load += time.perf_counter() - start
        weights += sum(tensor_bytes(t) for m in stage_modules(stage, obj).values() for t in [*m.parameters(), *m.buffers()])
        for call in (c for c in CALLS if c.stage == stage):
            seconds, result = timed(device, lambda: call.run(obj, inputs), args.repeats)
            if stage == "dit":  # per step of a real denoising loop (scheduler included) over --steps steps
                guidance = request.guidance if "CFG (2" in call.name else 1.0
                seconds = timed(device, lambda: obj.denoise(
                    inputs["noise"], None, 0, inputs["controls"], inputs["scales"], inputs["embeds"], inputs["embeds"],
                    args.steps, guidance, inputs["pixels"]))[0] / args.steps
            peak = measured_peak(device, lambda: call.run(obj, inputs))[0]
            costs[call.name] = (seconds, peak, estimates[call.name])
            if call.name.startswith("VAE decode"):  # roundtrip conditioning encodes decoded frames again
                frames = result.to(device)
                seconds = timed(device, lambda: obj.encode(frames, dtype), args.repeats)[0]
                peak = measured_peak(device, lambda: obj.encode(frames, dtype))[0]
                costs["VAE re-encode (roundtrip)"] = (seconds, peak, estimates["VAE encode (one control)"])
        obj = None  # the next stage loads without this one beside it
    return add_totals(costs, estimates, load, weights, "load (all stages)", "weights of every stage (resident)")


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


def write_inputs(folder: Path, frames: int, height: int, width: int, weight: float = 0.5) -> Path:
    """A two-control spec over synthetic video of the given size (written with the product's writer)."""
    from transfer.video_io import write_mp4

    y, x = np.mgrid[0:height, 0:width]
    video = np.stack([np.stack([(x + 3 * t) % 256, (y + 2 * t) % 256, (x + y) % 256], -1) for t in range(frames)])
    write_mp4(folder / "input.mp4", video.astype(np.uint8), 24)
    spec = {"prompt": "a robot arm picks up a red cube", "input_video_path": str(folder / "input.mp4"),
            **{m: {"control_weight": weight} for m in CONTROLS}}  # computed controls (OpenCV); Cosmos 3 takes weight 1 only
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
    p.add_argument("--stages", default="text,vae,dit",
                   help="stages whose calls part 1 measures (default: text,vae,dit; benchmarks/dit_step.py measures the "
                   "DiT step per attention backend)")
    p.add_argument("--small", action="store_true",
                   help="CPU check: transfer2.5-2b-small at 9 frames 64x96, 2 steps, placements 1 and 4 (gloo)")
    args = p.parse_args()
    cosmos3 = args.preset in COSMOS3_PRESETS
    if args.small:
        args.preset, args.height, args.width, args.frames, args.steps = (
            ("cosmos3-tiny", 32, 48, 9, 2) if cosmos3 else ("transfer2.5-2b-small", 64, 96, 9, 2))
        args.placements = args.placements or "1,4"
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    dtype = dtype_for(device, args.dtype)
    print(f"{args.preset}, random weights, {device} ({str(dtype).removeprefix('torch.')}), chunk "
          f"{args.frames}x{args.height}x{args.width}, {args.steps} steps measured\n")

    costs = cosmos3_costs(args, device, dtype) if cosmos3 else stage_costs(args, device, dtype)
    print("| stage call | seconds | peak MB, measured | peak MB, --plan estimate | estimate / measured |")
    print("|---|---:|---:|---:|---:|")
    for name, (seconds, peak, estimate) in costs.items():
        ratio = f"{estimate / peak:.3f}" if peak else "-"
        print(f"| {name} | {seconds:.3f} | {peak / 1e6:.2f} | {estimate / 1e6:.2f} | {ratio} |")
    if cosmos3:
        proj = cosmos3_projection(costs, args.full_steps, args.full_chunks)
    elif "dit" not in args.stages:
        proj = {}
    else:
        proj = projection(costs, args.full_steps, args.full_chunks)
    if proj:
        print(f"\nprojected wall time of a {args.full_chunks}-chunk, 2-control video at {args.full_steps} steps "
          "(from the per-call costs above; not measured):\n")
        print("| placement | projected s |")
        print("|---|---:|")
        for name, seconds in proj.items():
            print(f"| {name} | {seconds:.1f} |")
    if not cosmos3:
        print("\nupstream published (Transfer2.5-2B, edge, 720p, H100 NVL): "
              + ", ".join(f"{n} GPU {s} s" for n, s in UPSTREAM_SECONDS.items()))

    worlds = [int(w) for w in args.placements.split(",") if w and int(w) > 0]
    gpus = torch.cuda.device_count()
    if worlds:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            spec = write_inputs(folder, args.chunks * (args.frames - 1) + 1, args.height, args.width,
                                1.0 if cosmos3 else 0.5)
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
