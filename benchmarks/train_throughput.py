"""Clips per second of the demo's DiT training loop (scripts/train_demo.py), before and after issue 40, side by side.

    python scripts/train_demo.py --work runs/demo40 --stage vae_from
    python scripts/train_demo.py --work runs/demo40 --stage corpus --clips 2048     # or more
    python benchmarks/train_throughput.py --work runs/demo40

For each batch size (4, 16, 64) it runs a few warm-up steps, then times ``--steps`` steps of two loops over the same
models and prints one table of seconds per step by phase and clips per second:

* ``before``: the shipped run's loop: every step renders its clips, computes their edge controls with the project's
  Canny, VAE-encodes video and control a clip at a time (as inference does), runs the T5 once per prompt over 512
  tokens, then the DiT + ControlNet forward and backward, eager;
* ``after``: batches drawn from the corpus (encoded once: the VAE is frozen), the T5 once per batch over the longest
  prompt's tokens (the same embeddings, zero-padded to 512), each DiT and ControlNet block ``torch.compile``d.

The optimizer steps in both (AdamW on DiT, ControlNet and T5), so the models move as in training. Phases are wall
seconds per step on this machine (``--threads`` torch threads).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import train_demo  # noqa: E402

PHASES = ("render scenes", "edge control (Canny)", "VAE encode (video + control)", "corpus batch", "noise draws",
          "T5 forward", "DiT + ControlNet forward", "backward", "optimizer")


def measure(work: Path, after: bool, batch: int, steps: int, warm: int) -> dict:
    """Seconds per step by phase, and clips per second, of one loop at one batch size."""
    args = argparse.Namespace(
        work=work, device="cpu", seed=0, dit_name="bench", patch=None, init_from=None, corpus=after, compile=after,
        shape_weight=1.0, prompt_dropout=0.1, per_prompt_t5=not after, lr=3e-4, init=None)
    timings: dict = {}
    trainer = train_demo.DitTrainer(args, timings)
    stage = argparse.Namespace(step=0, models=trainer.models, optimizer=torch.optim.AdamW(
        [p for m in trainer.models.values() for p in m.parameters()], lr=3e-4))
    for i in range(warm + steps):
        if i == warm:
            timings.clear()
            start = time.perf_counter()
        data = trainer.from_corpus(i, batch) if after else trainer.online(i, batch)
        trainer.step(stage, *data)
    wall = (time.perf_counter() - start) / steps
    row = {phase: timings.get(phase, 0.0) / steps for phase in PHASES}
    row["other (Python, transfers)"] = wall - sum(row.values())
    return {"phases": row, "wall": wall, "clips_per_s": batch / wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "demo40", help="training folder with vae/ and corpus/")
    p.add_argument("--batches", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--steps", type=int, default=3, help="timed steps per cell (default: 3)")
    p.add_argument("--warm", type=int, default=2, help="untimed steps first (compile, caches; default: 2)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for batch in args.batches:
        for after in (False, True):
            results[(batch, after)] = measure(args.work, after, batch, args.steps, args.warm)
            print(f"batch {batch} {'after' if after else 'before'}: {results[(batch, after)]['clips_per_s']:.2f} "
                  "clips/s", file=sys.stderr, flush=True)
    cols = [(b, a) for b in args.batches for a in (False, True)]
    print(f"\nDiT training loop, seconds per step by phase ({args.threads} threads, {args.steps} timed steps after "
          f"{args.warm} warm-up)\n")
    print("| phase | " + " | ".join(f"batch {b} {'after' if a else 'before'}" for b, a in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    names = [*PHASES, "other (Python, transfers)"]
    for name in names:
        print(f"| {name} | " + " | ".join(f"{results[c]['phases'][name]:.3f}" for c in cols) + " |")
    print("| **step (wall)** | " + " | ".join(f"**{results[c]['wall']:.3f}**" for c in cols) + " |")
    print("| **clips / s** | " + " | ".join(f"**{results[c]['clips_per_s']:.1f}**" for c in cols) + " |")
    base = results[(4, False)]["clips_per_s"] if (4, False) in results else None
    if base:
        print("| vs before at batch 4 | " + " | ".join(f"{results[c]['clips_per_s'] / base:.1f}x" for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
