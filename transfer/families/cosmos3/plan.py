"""``--plan`` for Cosmos 3: each rank's peak memory for a layout (``transfer.families.cosmos3.ranks.cosmos3_layout``) at a chunk size,
from configs alone, in seconds.

Weights: the transformer and the VAE built under ``FakeTensorMode`` (shapes, no storage), counted at the plan dtype.
Activations (``transfer.memory.TensorMemory`` over fake tensors, as Transfer2.5's plan): the VAE's encode of one hint
chunk and decode of one chunk; one transformer pass of each kind (cond, cond without hints, uncond) with the very
inputs diffusers' blocks pack for that chunk: the text (about ``TEXT_TOKENS`` tokens, an upsampled prompt's length),
the hints' and the target's latents, captured by running the blocks up to the transformer with the embedded
``cosmos3-tiny`` components (the packing depends on the geometry and the latent channels, 48 in both) and a recording
in place of the transformer call. The real transformer's pass then runs on fake tensors.
"""

from __future__ import annotations

import types

import torch

from transfer.families.cosmos3.checkpoint import Cosmos3Info
from transfer.families.cosmos3.ranks import Cosmos3Layout, cosmos3_layout
from transfer.errors import TransferError
from transfer.device import default_dtype
from transfer.plan import GB, _bytes, _init_kwargs, band_height, gathered_bytes, vae_calls_at, vae_degree_lines

#: GPU sizes a Cosmos 3 plan reports against (H100 80 GB, H200 141 GB).
COSMOS3_GPU_SIZES_GB = (80, 141)
#: Characters of the planned prompt: about 1,100 tokens with the chat template (an upsampled JSON prompt's length).
TEXT_CHARS = 1000


def _fake(cls, config: dict, dtype: torch.dtype):
    with default_dtype(dtype):
        return cls(**_init_kwargs(config)).eval()


def pass_inputs(hints, frames: int, height: int, width: int, guidance: float, control_guidance: float,
                dtype: torch.dtype) -> dict[str, tuple]:
    """``{pass: (static, vision_tokens, vision_timesteps, kwargs)}`` of one step of a chunk, as diffusers' blocks
    pack them for the transformer (recorded, not run)."""
    from transfer.families.cosmos3.pipeline import load_cosmos3_pipeline
    from transfer.families.cosmos3.blocks import DIT_BLOCKS, execution_blocks, initial_state, run_blocks
    from transfer.embedded_checkpoint import ensure_tiny_checkpoint

    pipe = load_cosmos3_pipeline(ensure_tiny_checkpoint("cosmos3-tiny"), dtype=dtype)
    latent = (1, 48, (frames - 1) // 4 + 1, height // 16, width // 16)
    blocks = execution_blocks(pipe, {h: None for h in hints})
    words = "a robot arm lifts a red cube from a wooden table in warm light; "
    state = initial_state(blocks, dict(prompt=(words * (TEXT_CHARS // len(words) + 1))[:TEXT_CHARS],
                                       negative_prompt=words, control_videos={h: None for h in hints}, height=height,
                                       width=width, num_inference_steps=1, guidance_scale=guidance,
                                       control_guidance=control_guidance, generator=torch.Generator().manual_seed(0)))
    state = run_blocks(pipe, blocks, ("text_encoder.transfer_text", "denoise.prepare_text_segments"), state)
    state.set("x0_tokens_vision", torch.zeros(latent))
    state.set("control_latents", [torch.zeros(latent) for _ in hints])
    state.set("current_conditional_frames", 0)
    calls = {}

    def record(components, static, tokens, timesteps, name, **kwargs):
        calls[name] = (static, tokens, timesteps, kwargs)
        return torch.zeros(latent)

    blocks.sub_blocks["denoise.chunk_denoise.denoise"].sub_blocks["denoiser"]._forward = record
    run_blocks(pipe, blocks, DIT_BLOCKS, state)
    return calls


def estimate(info: Cosmos3Info, hints, frames: int, height: int, width: int, guidance: float,
             control_guidance: float, dtype: torch.dtype, target: str = "cuda", vae_degrees=(1,)) -> dict:
    """Weights (bytes per component), activation peaks (bytes per call) and tokens per pass of one chunk, and the
    VAE calls' peaks on a rank of a VAE group of each of ``vae_degrees`` (the band's calls plus the gathered result,
    ``transfer.plan.gathered_bytes``); ``target`` ``cpu`` adds the im2col workspace of CPU's slow convolutions
    (``transfer.memory.TensorMemory``)."""
    from diffusers import AutoencoderKLWan, Cosmos3OmniTransformer
    from diffusers.modular_pipelines.cosmos.denoise import Cosmos3TransferLoopDenoiser
    from torch._subclasses.fake_tensor import FakeTensorMode

    from transfer.memory import TensorMemory

    passes = pass_inputs(hints, frames, height, width, guidance, control_guidance, dtype)
    calls: dict[str, dict[str, int]] = {"vae": {}, "dit": {}}
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        transformer = _fake(Cosmos3OmniTransformer, info.transformer, dtype)
        vae = _fake(AutoencoderKLWan, info.vae, dtype)
        weights = {"transformer": _bytes(transformer, dtype), "vae": _bytes(vae, dtype)}
        by_degree = {}
        for degree in vae_degrees:
            band = band_height(height, 16, degree)
            latent = (1, info.vae["z_dim"], (frames - 1) // 4 + 1, band // 16, width // 16)
            peaks = {}
            for name, run in (("encode (one hint)", lambda: vae.encode(torch.zeros(1, 3, frames, band, width, dtype=dtype))),
                              ("decode (one chunk)", lambda: vae.decode(torch.zeros(latent, dtype=dtype)))):
                with TensorMemory(workspace=target == "cpu") as memory:
                    run()
                peaks[name] = memory.peak
            if degree > 1:
                size = gathered_bytes(info.vae["z_dim"], frames, height, width, 16, dtype)
                peaks = {name: b + size["latents" if name.startswith("encode") else "frames"] for name, b in peaks.items()}
            by_degree[degree] = peaks
        calls["vae"] = by_degree[1]
        holder = types.SimpleNamespace(transformer=transformer)  # what diffusers' pass reads of its components
        for name, (static, tokens, timesteps, kwargs) in passes.items():
            with TensorMemory(workspace=target == "cpu") as memory:
                Cosmos3TransferLoopDenoiser._forward(holder, static, tokens, timesteps, name, **kwargs)
            calls["dit"][f"pass {name}"] = memory.peak
    tokens = {f"pass {name}": int(call[0]["sequence_length"]) for name, call in passes.items()}
    return {"weights": weights, "calls": calls, "tokens": tokens, "vae_degrees": by_degree}


def rank_peaks(layout: Cosmos3Layout, est: dict) -> list[tuple[int, str, int, int]]:
    """``(rank, stages, weight bytes, activation bytes)``: a DiT rank holds the whole transformer and about 1/sp of
    its largest pass's activations (a lower bound: the streams are gathered whole after the last norm); rank 0 adds
    the VAE and its largest call; a VAE group's ranks (``layout.vae_ranks``) hold the VAE and its calls' peak at that
    degree (``estimate``'s ``vae_degrees``; an upper bound, the nearest estimated degree below, where it is not one)."""
    w, calls, by_degree = est["weights"], est["calls"], est.get("vae_degrees", {1: est["calls"]["vae"]})
    dit_act = max(calls["dit"].values()) // layout.sp
    vae_act = max(vae_calls_at(by_degree, len(layout.vae_ranks)).values())
    rows = []
    for rank in range(layout.world):
        stages, weights, act = ["coordinator"] if rank == 0 else [], 0, 0
        if rank in layout.vae_ranks:
            stages, weights, act = stages + ["vae"], w["vae"], vae_act
        if rank in layout.dit_ranks:
            stages.append("dit")
            weights += w["transformer"]
            act = max(act, dit_act)
        rows.append((rank, "+".join(stages), weights, act))
    return rows


def layouts(worlds=(1, 2, 4, 8), heads: int = 32) -> list[Cosmos3Layout]:
    """Every layout ``cosmos3_layout`` accepts for these world sizes (sp a power of two)."""
    out = []
    for world in worlds:
        for sp in (1, 2, 4, 8):
            for passes in (1, 2, 3):
                try:
                    layout = cosmos3_layout(world, sp, passes, heads).with_vae(None, True, None)
                except TransferError:
                    continue
                if layout not in out:
                    out.append(layout)
    return out


def cosmos3_plan_report(config, info: Cosmos3Info, name: str) -> str:
    from transfer.device import DTYPES

    plan, world = config.plan, config.parallel.num_gpus or 1
    frames = plan.frames or config.generation.num_frames_per_chunk
    if frames < 5 or (frames - 1) % 4:
        raise TransferError(f"--frames must be 1 + 4k and at least 5, got {frames}")
    info.limits().check_resolution(plan.height, plan.width, "--height/--width")
    heads = info.transformer.get("num_attention_heads", 32)
    rows = plan.height // 16
    layout = cosmos3_layout(world, config.parallel.sp_degree, config.parallel.pass_degree, heads).with_vae(
        config.parallel.vae_degree, True, rows)
    guidance = config.generation.guidance
    hints = ("edge", "depth")
    degrees = sorted({d for d in (1, 2, 4, 8, len(layout.vae_ranks)) if d <= rows})
    est = estimate(info, hints, frames, plan.height, plan.width, guidance, 1.5, DTYPES[plan.dtype], vae_degrees=degrees)
    sizes = "".join(f"{f'{g} GB':>8}" for g in COSMOS3_GPU_SIZES_GB)
    lines = [f"memory plan: {name} (Cosmos 3), hints {'+'.join(hints)}, {plan.dtype}, chunk {frames}x{plan.height}x"
             f"{plan.width}, guidance {guidance:g}, control guidance 1.5, {world} rank(s), {plan.gpu_memory_gb:g} GB "
             f"per GPU", f"layout: {layout.describe()}", ""]
    head = f"{'rank':>4}  {'stages':<22}{'weights GB':>11}{'activ. GB':>11}{'peak GB':>9}{'free GB':>9}  fits"
    lines += [head + sizes, "-" * len(head + sizes)]
    for rank, stages, weights, act in rank_peaks(layout, est):
        peak = (weights + act) / GB
        lines.append(f"{rank:>4}  {stages:<22}{weights / GB:>11.2f}{act / GB:>11.2f}{peak:>9.2f}"
                     f"{plan.gpu_memory_gb - peak:>9.2f}  {'yes' if peak < plan.gpu_memory_gb else 'NO':<4}"
                     + "".join(f"{'yes' if peak < g else 'NO':>8}" for g in COSMOS3_GPU_SIZES_GB))
    lines += ["", "components (weights):"] + [f"  {k:<30}{v / GB:>9.2f} GB" for k, v in est["weights"].items()]
    lines += ["", "activation peak of each call (one chunk; tokens per pass):"]
    for stage, calls in est["calls"].items():
        for call, b in calls.items():
            extra = f"  ({est['tokens'][call]:,} tokens)" if call in est["tokens"] else ""
            lines.append(f"  {stage:<4} {call:<26}{b / GB:>9.2f} GB{extra}")
    lines += vae_degree_lines({d: {f"VAE {k}": b for k, b in p.items()} for d, p in est["vae_degrees"].items()},
                              len(layout.vae_ranks), GB, "GB")
    lines += ["", "layouts (rank 0: coordinator + VAE; DiT group: pass branches x sp; on GPUs every rank in the VAE "
              "group): largest rank peak, fits",
              f"{'ranks':>5}  {'DiT group':<28}{'largest GB':>11}{sizes}"]
    for option in layouts(heads=heads):
        peak = max(w + a for _, _, w, a in rank_peaks(option, est)) / GB
        group = f"{len(option.dit_ranks)} rank(s): {option.passes} x sp {option.sp}"
        lines.append(f"{option.world:>5}  {group:<28}{peak:>11.2f}"
                     + "".join(f"{'yes' if peak < g else 'NO':>8}" for g in COSMOS3_GPU_SIZES_GB))
    lines += ["", "a DiT rank holds the whole transformer (the DiT group splits passes and tokens, not weights) and about "
              "1/sp of a pass's activations (a lower bound). Not counted: the CUDA context (about 0.5 GB a process), "
              "allocator slack, hint pixels on rank 0 (a 720p 121-frame hint is 0.6 GB in bf16), guardrail and "
              "preprocessor models; keep headroom."]
    return "\n".join(lines)
