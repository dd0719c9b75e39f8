"""One Cosmos 3 transfer denoise step at real size: this fork's transformer vs diffusers' own, side by side on one
device, random weights (no download).

    python benchmarks/cosmos3_step.py                       # Cosmos3-Nano, 720x1280, 121 frames, two hints, GPU 0
    python benchmarks/cosmos3_step.py --small               # the same code on cosmos3-tiny at 64x64, 9 frames (CPU)

A step is the transformer passes diffusers' ``Cosmos3TransferLoopDenoiser`` runs for it (cond, cond without hints,
uncond: guidance 3, control guidance 1.5), each with the inputs diffusers' blocks pack for the chunk
(``transfer.families.cosmos3.plan.pass_inputs``). The same weights run twice:

* ``diffusers``: the transformer as diffusers' loader leaves it (``Cosmos3AttnProcessor``: grouped-query attention);
* ``ours``: with the expanded-KV processor this fork gives every Cosmos 3 transformer on CUDA
  (``transfer.families.cosmos3.attention.expand_kv_heads``: the KV heads repeated, the understanding stream's causal mask
  explicit, so that torch picks a flash / cuDNN kernel at ~86k tokens instead of the math fallback).

Prints each pass's seconds for both, the step's total, the ratio, and the largest difference between the two
outputs (the processors compute the same attention). bf16 on CUDA, fp32 on CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.call_costs import timed  # noqa: E402
from benchmarks.cosmos3_costs import CONTROL_GUIDANCE, HINTS, _to  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cosmos3-nano")
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--frames", type=int, default=121)
    p.add_argument("--repeats", type=int, default=2, help="timed calls per pass (after one warm-up)")
    p.add_argument("--small", action="store_true", help="cosmos3-tiny at 64x64, 9 frames, on the CPU")
    args = p.parse_args()
    if args.small:
        args.preset, args.height, args.width, args.frames = "cosmos3-tiny", 64, 64, 9
    from diffusers.modular_pipelines.cosmos.denoise import Cosmos3TransferLoopDenoiser

    from transfer.families.cosmos3.attention import expand_kv_heads
    from transfer.families.cosmos3.checkpoint import cosmos3_preset_info
    from transfer.families.cosmos3.pipeline import load_cosmos3
    from transfer.families.cosmos3.plan import pass_inputs

    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe = load_cosmos3(cosmos3_preset_info(args.preset), "cpu" if device.type == "cpu" else device, dtype)
    if device.type == "cuda":  # load_cosmos3 expanded the heads on CUDA: put diffusers' own processor back first
        from diffusers.models.transformers.transformer_cosmos3 import Cosmos3AttnProcessor

        from transfer.families.cosmos3.attention import ExpandedCosmos3Processor

        for module in pipe.transformer.modules():
            if isinstance(getattr(module, "processor", None), ExpandedCosmos3Processor):
                module.set_processor(Cosmos3AttnProcessor())
    passes = {name: tuple(_to(v, device) for v in (static, tokens, timesteps)) + (kwargs,)
              for name, (static, tokens, timesteps, kwargs) in
              pass_inputs(HINTS, args.frames, args.height, args.width, 3.0, CONTROL_GUIDANCE, dtype).items()}
    results = {}
    for label in ("diffusers", "ours"):
        if label == "ours":
            expand_kv_heads(pipe.transformer)
        rows = {}
        with torch.no_grad():
            for name, (static, tokens, timesteps, kwargs) in passes.items():
                def run(s=static, t=tokens, ts=timesteps, n=name, k=kwargs):
                    return Cosmos3TransferLoopDenoiser._forward(pipe, s, t, ts, n, **k)

                run()  # warm-up (kernels, caches)
                rows[name] = timed(device, run, args.repeats)
        results[label] = rows
    print(f"\nOne Cosmos 3 transfer denoise step, {args.preset} (random weights), {args.frames} x {args.height} x "
          f"{args.width}, hints {', '.join(HINTS)}, guidance 3, control guidance {CONTROL_GUIDANCE}; {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), {dtype}\n")
    print("| pass | diffusers s | ours s | diffusers / ours | max abs diff of the outputs |")
    print("|---|---:|---:|---:|---:|")
    for name in passes:
        (a, out_a), (b, out_b) = results["diffusers"][name], results["ours"][name]
        diff = max(float((x.float() - y.float()).abs().max()) for x, y in zip(_tensors(out_a), _tensors(out_b)))
        print(f"| {name} | {a:.3f} | {b:.3f} | {a / b:.2f}x | {diff:.2e} |")
    a = sum(s for s, _ in results["diffusers"].values())
    b = sum(s for s, _ in results["ours"].values())
    print(f"| **step** | **{a:.3f}** | **{b:.3f}** | **{a / b:.2f}x** | |")
    return 0


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return [t for v in vars(value).values() for t in _tensors(v)] if hasattr(value, "__dict__") else []


if __name__ == "__main__":
    sys.exit(main())
