"""Cosmos 3's part of ``benchmarks/real_size.py`` (``--preset cosmos3-nano``): the real-size cost of each call with
random weights, one process, beside ``--plan``'s estimate, and the projected wall time of a video.

Calls: the VAE encoding one hint chunk, its decode of a chunk, and one transformer pass of each kind (cond, cond
without hints, uncond) with the inputs diffusers' blocks pack for the chunk (``transfer.families.cosmos3.plan.pass_inputs``).
"""

from __future__ import annotations

import time

import torch

from benchmarks.call_costs import add_totals, timed
from transfer.families.cosmos3.checkpoint import cosmos3_preset_info
from transfer.families.cosmos3.pipeline import load_cosmos3
from transfer.families.cosmos3.plan import estimate, pass_inputs
from transfer.memory import measured_peak

HINTS = ("edge", "depth")
CONTROL_GUIDANCE = 1.5


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    return value


def cosmos3_costs(args, device: torch.device, dtype: torch.dtype) -> dict:
    """``{call: (seconds, measured peak bytes, estimated peak bytes)}``, as ``real_size.stage_costs``."""
    from diffusers.modular_pipelines.cosmos.denoise import Cosmos3TransferLoopDenoiser

    info = cosmos3_preset_info(args.preset)
    est = estimate(info, HINTS, args.frames, args.height, args.width, 3.0, CONTROL_GUIDANCE, dtype, device.type)
    estimates = {name: peak for calls in est["calls"].values() for name, peak in calls.items()}
    start = time.perf_counter()
    pipe = load_cosmos3(info, device, dtype)
    load = time.perf_counter() - start
    latent = (1, info.vae["z_dim"], (args.frames - 1) // 4 + 1, args.height // 16, args.width // 16)
    video = torch.zeros(1, 3, args.frames, args.height, args.width, dtype=dtype, device=device)
    z = torch.zeros(latent, dtype=dtype, device=device)
    runs = {"encode (one hint)": lambda: pipe.vae.encode(video), "decode (one chunk)": lambda: pipe.vae.decode(z)}
    for name, (static, tokens, timesteps, kwargs) in pass_inputs(HINTS, args.frames, args.height, args.width, 3.0,
                                                                 CONTROL_GUIDANCE, dtype).items():
        static, tokens, timesteps = _to(static, device), _to(tokens, device), _to(timesteps, device)
        runs[f"pass {name}"] = (lambda s=static, t=tokens, ts=timesteps, n=name, k=kwargs:
                                Cosmos3TransferLoopDenoiser._forward(pipe, s, t, ts, n, **k))
    costs = {}
    with torch.no_grad():
        for name, run in runs.items():
            seconds = timed(device, run, args.repeats)[0]
            costs[name] = (seconds, measured_peak(device, run)[0], estimates[name])
    return add_totals(costs, estimates, load, sum(est["weights"].values()), "load (transformer + VAE)",
                      "weights (resident)")


def cosmos3_projection(costs: dict, steps: int, chunks: int) -> dict[str, float]:
    """Projected seconds of a ``chunks``-chunk, two-hint video at ``steps`` steps with text and control guidance
    (three passes a step), from the per-call costs. One GPU: everything in turn. Rank 0 + a DiT group dealing the
    passes over 3 branches: a step takes its longest pass, rank 0's two hint encodes, seed encode and decode per
    chunk stay on the critical path (this runtime runs in lockstep). Projections, not measurements."""
    c = {k: v[0] for k, v in costs.items()}
    passes = [c["pass cond"], c["pass cond_no_control"], c["pass uncond"]]
    vae = (len(HINTS) + 1) * c["encode (one hint)"] + c["decode (one chunk)"]
    return {"1 GPU, all stages": chunks * (steps * sum(passes) + vae),
            "rank 0 + DiT group, 3 pass branches": chunks * (steps * max(passes) + vae)}
