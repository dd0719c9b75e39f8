"""``--plan``: each rank's peak memory for a placement at a request size, from configs alone.

Weights: every model a stage holds is built on the ``meta`` device (shapes, no storage), so planning
the real Transfer2.5-2B with a 7B or 11B text encoder takes seconds and no weights. Bytes are
counted per parameter and buffer at the run dtype (floating tensors) or their own dtype.

Activations: each stage's calls run on fake tensors at the request's size (``transfer.memory``); a
rank's peak is its weights plus the biggest activation peak of the calls its stages make (a process
runs its stages' calls one at a time). The CUDA context and allocator slack come on top.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from transfer.checkpoint import CheckpointInfo
from transfer.config import cfg_on
from transfer.distributed.placement import Placement

GB = 1e9


def _bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    return sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
               for t in [*module.parameters(), *module.buffers()])


def _on_meta(build):
    with torch.device("meta"):
        return build()


def component_bytes(info: CheckpointInfo, modalities, dtype: torch.dtype) -> dict[str, dict[str, int]]:
    """``{stage: {component: bytes}}`` for the text, vae and dit stages, built on the meta device."""
    from diffusers import AutoencoderKLWan, CosmosControlNetModel, CosmosTransformer3DModel

    from transfer.families.transfer25.text_encoding import text_encoder_class

    text = _on_meta(lambda: text_encoder_class(info.text_encoder_type)(info.text_config))
    vae = _on_meta(lambda: AutoencoderKLWan(**_init_kwargs(info.vae)))
    transformer = _on_meta(lambda: CosmosTransformer3DModel(**_init_kwargs(info.transformer)))
    dit = {"transformer": _bytes(transformer, dtype)}
    for m in modalities:
        cfg = info.controlnets[m]
        net = _on_meta(lambda: CosmosControlNetModel(**_init_kwargs(cfg)))
        dit[f"controlnet/{m}"] = _bytes(net, dtype)
    return {"text": {f"text_encoder ({info.text_encoder_type})": _bytes(text, dtype)},
            "vae": {"vae": _bytes(vae, dtype)}, "dit": dit}


def _init_kwargs(config: dict) -> dict:
    """A saved diffusers config without its bookkeeping keys (``_class_name``, ``_diffusers_version``)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


@dataclass
class RankPlan:
    rank: int
    stages: list[str]
    components: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.components.values())


def plan_ranks(placement: Placement, by_stage: dict[str, dict[str, int]]) -> list[RankPlan]:
    """What each rank holds: the components of its stages (every rank of a DiT group holds a full DiT)."""
    out = []
    for rank in range(placement.world_size):
        stages = placement.stages_of(rank)
        held = {}
        for stage in stages:
            held.update(by_stage.get(stage, {}))
        out.append(RankPlan(rank, stages, held))
    return out


def dit_call(cfg: int, guidance: float) -> str:
    """The DiT call a rank of a DiT group makes: with cfg 1 it runs both CFG branches, with cfg 2 one."""
    return "DiT step, CFG (2 branches)" if cfg_on(guidance) and cfg == 1 else "DiT step, no CFG"


def rank_activations(placement: Placement, calls: dict[str, dict[str, int]], guidance: float,
                     vae_calls: dict[str, int] | None = None) -> list[int]:
    """Each rank's activation peak: the biggest of the calls its stages make (``vae_calls``: a VAE group rank's, for
    the placement's VAE degree; default the whole calls')."""
    out = []
    for rank in range(placement.world_size):
        stages = placement.stages_of(rank)
        peaks = [0]
        if "text" in stages:
            peaks += calls["text"].values()
        if "vae" in stages:
            peaks += (vae_calls or calls["vae"]).values()
        group = placement.group_of(rank)
        if group is not None:  # a sequence shard holds 1/sp of the per-token activations (approximately)
            peaks.append(calls["dit"][dit_call(group.cfg_degree, guidance)] // group.sp_degree)
        out.append(max(peaks))
    return out


#: GPU sizes every plan reports against.
GPU_SIZES_GB = (24, 48, 80)


def rank_totals(placement: Placement, by_stage, calls, guidance: float,
                vae_calls: dict[str, int] | None = None) -> list[tuple[RankPlan, int]]:
    return list(zip(plan_ranks(placement, by_stage), rank_activations(placement, calls, guidance, vae_calls)))


#: The VAE's calls in ``transfer.memory.CALLS``, and the result each gathers in a VAE group.
VAE_CALLS = {"VAE encode (one control)": "latents", "VAE decode (one chunk)": "frames"}


def vae_group_calls(info, chunk, dtype, device: str, degree: int, whole: dict[str, int]) -> dict[str, int]:
    """One rank's VAE call peaks in a VAE group of ``degree`` (``transfer.distributed.vae_split``): the calls at the
    height of the largest band (the halo rows, one per convolution, left out), plus the whole result gathered on
    every rank (the ranks' padded bands and the joined result: twice its size). ``whole``: the calls at degree 1."""
    from transfer.memory import estimate_calls
    from transfer.prepare import ModelLimits

    if degree == 1:
        return dict(whole)
    limits = ModelLimits.from_info(info)
    f = limits.spatial_factor
    band = replace(chunk, height=band_height(chunk.height, f, degree))
    peaks = estimate_calls(info, band, dtype, device, names=list(VAE_CALLS))["vae"]
    size = gathered_bytes(info.vae["z_dim"], chunk.frames, chunk.height, chunk.width, f, dtype)
    return {name: peak + size[VAE_CALLS[name]] for name, peak in peaks.items()}


def vae_calls_at(vae_degrees: dict[int, dict[str, int]] | None, degree: int) -> dict[str, int] | None:
    """The VAE call peaks of a rank in a VAE group of ``degree``: those estimated at the largest degree not above it
    (an upper bound where ``degree`` itself was not estimated); None without estimates."""
    near = max((d for d in (vae_degrees or {}) if d <= degree), default=None)
    return None if near is None else vae_degrees[near]


def band_height(height: int, factor: int, degree: int) -> int:
    """The pixel height of the largest band of a VAE group of ``degree`` (``vae_split.bands``: whole latent rows)."""
    return -(-(height // factor) // degree) * factor


def gathered_bytes(z_dim: int, frames: int, height: int, width: int, factor: int, dtype: torch.dtype) -> dict:
    """What a VAE group rank holds of a call's whole result once gathered: every rank's padded band and the joined
    whole, twice the result (``latents`` of an encode, ``frames`` of a decode)."""
    latent = z_dim * (1 + (frames - 1) // 4) * (height // factor) * (width // factor)
    return {"latents": 2 * latent * dtype.itemsize, "frames": 2 * 3 * frames * height * width * dtype.itemsize}


def vae_degree_lines(vae_degrees: dict[int, dict[str, int]], current: int, scale: float, unit: str) -> list[str]:
    """The plan's lines of the VAE's activation peak per rank by the VAE group's degree."""
    lines = ["", "VAE group: each rank's activation peak by the group's degree (--vae_parallel_degree; each call split "
             "by rows, the result gathered on every rank):"]
    for degree, peaks in sorted(vae_degrees.items()):
        mark = "  <- this placement" if degree == current else ""
        lines.append(f"  {degree:>2} rank{'s' if degree > 1 else ' '} "
                     + ", ".join(f"{name.split(' (')[0]} {b / scale:.2f} {unit}" for name, b in peaks.items()) + mark)
    return lines


def format_plan(title: str, placement: Placement, by_stage, calls, guidance: float, gpu_memory_gb: float,
                presets: dict[int, Placement], vae_degrees: dict[int, dict[str, int]] | None = None) -> str:
    """The report: per rank weights, activations, peak and fit; components; call peaks; the VAE's per rank by VAE
    group degree (``vae_degrees``: degree -> call peaks, the placement's degree among them); the preset
    placements."""
    vae_calls = vae_calls_at(vae_degrees, len(placement.vae.ranks))
    ranks = rank_totals(placement, by_stage, calls, guidance, vae_calls)
    replicated = sum(sum(c.values()) for c in by_stage.values())
    one = Placement(1)  # every stage in one process: what upstream holds on each GPU
    replicated_act = rank_activations(one, calls, guidance)[0]
    unit, scale = ("GB", GB) if replicated >= 0.1 * GB else ("MB", 1e6)  # the tiny presets are a few MB
    lines = [title, ""]
    sizes = "".join(f"{f'{g} GB':>7}" for g in GPU_SIZES_GB)
    head = f"{'rank':>4}  {'stages':<24}{'weights ' + unit:>11}{'activ. ' + unit:>11}{'peak ' + unit:>10}{'free GB':>9}  fits"
    lines += [head + sizes, "-" * len(head + sizes)]
    rows = [(str(r.rank), "+".join(r.stages), r.total, act) for r, act in ranks]
    rows.append(("", "replicated (upstream)", replicated, replicated_act))
    for rank, stages, weights, act in rows:
        peak = weights + act
        free = gpu_memory_gb - peak / GB
        fits = "".join(f"{'yes' if peak / GB < g else 'NO':>7}" for g in GPU_SIZES_GB)
        lines.append(f"{rank:>4}  {stages:<24}{weights / scale:>11.2f}{act / scale:>11.2f}{peak / scale:>10.2f}"
                     f"{free:>9.2f}  {'yes' if free > 0 else 'NO':<4}{fits}")
    lines += ["", "components (weights):"]
    for stage, comps in by_stage.items():
        for name, b in comps.items():
            lines.append(f"  {stage:<5} {name:<30}{b / scale:>9.2f} {unit}")
    lines += ["", "activation peak of each call (one chunk):"]
    for stage, peaks in calls.items():
        for name, b in peaks.items():
            lines.append(f"  {stage:<5} {name:<30}{b / scale:>9.2f} {unit}")
    groups = "; ".join(g.describe() for g in placement.dit_groups)
    lines += ["", f"DiT groups: {groups}; a sequence-parallel rank (sp > 1) holds the whole DiT and ControlNets and "
              "about 1/sp of a step's activations (the expanded timestep embedding and the gathered velocity stay "
              "whole: a lower bound)"]
    if vae_degrees:
        lines += vae_degree_lines(vae_degrees, len(placement.vae.ranks), scale, unit)
    lines += ["", f"preset placements for one video: DiT groups, largest rank peak ({unit}), whether every rank fits"]
    lines.append(f"{'ranks':>5}  {'DiT groups':<28}{'largest':>9}{sizes}")
    for world, p in presets.items():
        peak = max(r.total + act for r, act in rank_totals(p, by_stage, calls, guidance,
                                                           vae_calls_at(vae_degrees, len(p.vae.ranks))))
        shape = ", ".join(f"{g.cfg_degree}x{g.sp_degree}" for g in p.dit_groups)
        lines.append(f"{world:>5}  {'cfg x sp ' + shape:<28}{peak / scale:>9.2f}"
                     + "".join(f"{'yes' if peak / GB < g else 'NO':>7}" for g in GPU_SIZES_GB))
    lines += ["", "not counted: the CUDA context (about 0.5 GB a process), allocator slack, cuDNN workspaces, tensors "
              "queued between stages (latent-sized), guardrail and depth/seg/keypoint preprocessor models (loaded on "
              "first use, on the coordinator or the preprocess rank); keep headroom."]
    return "\n".join(lines)


def run_plan(config) -> str:
    """The ``--plan`` report for ``config`` (``transfer.config.RunConfig`` with ``plan`` set; no process group, no
    weights, no inputs read)."""
    from configs.models import preset
    from transfer.checkpoint import info_from_preset, inspect_checkpoint, require_modalities
    from transfer.planning.chooser import SHARE_STAGES_GB, choose_placement
    from transfer.planning.chooser import preset as placement_preset
    from transfer.errors import TransferError
    from transfer.checkpoint import resolve_checkpoint
    from transfer.device import DTYPES
    from transfer.requests import requests_from
    from transfer.memory import ChunkSize, estimate_calls
    from transfer.prepare import ModelLimits

    plan, choice, inputs, guidance = config.plan, config.checkpoint, config.inputs, config.generation.guidance
    if plan.gpu_memory_gb <= 0:
        raise TransferError(f"--gpu_memory_gb must be positive, got {plan.gpu_memory_gb}")
    if choice.dir or preset(choice.preset).embedded:
        info = inspect_checkpoint(resolve_checkpoint(choice))  # the directory's own configs (tokenizer-sized vocab)
        name = str(info.root)
    else:
        info = info_from_preset(preset(choice.preset))
        name = f"preset {choice.preset}"
    if inputs.controlnet_specs or inputs.batch_input_path:
        modalities = sorted({m for r in requests_from(inputs, config.generation.chunk_conditioning)
                             for m in r.controls})
        require_modalities(info, modalities)
    else:
        modalities = list(info.modalities)
    frames = plan.frames or config.generation.num_frames_per_chunk
    limits = ModelLimits.from_info(info)
    tf = limits.temporal_factor
    if frames < tf + 1 or (frames - 1) % tf:
        raise TransferError(f"--frames must be 1 + {tf}k and at least {tf + 1}, got {frames}")
    limits.check_resolution(plan.height, plan.width, "--height/--width")
    heads = info.transformer["num_attention_heads"]
    rows = plan.height // limits.spatial_factor
    placement = choose_placement(config, config.parallel.num_gpus or 1, 1, heads, rows, len(modalities)).placement
    dtype = DTYPES[plan.dtype]
    by_stage = component_bytes(info, modalities, dtype)
    chunk = ChunkSize(plan.height, plan.width, frames, tuple(modalities), guidance)
    calls = estimate_calls(info, chunk, dtype, plan.device)
    degrees = sorted({d for d in (1, 2, 4, 8, len(placement.vae.ranks)) if d <= rows})
    vae_degrees = {d: vae_group_calls(info, chunk, dtype, plan.device, d, calls["vae"]) for d in degrees}
    title = (f"memory plan: {name}, controls {'+'.join(modalities)}, {plan.dtype}, chunk {frames}x{plan.height}x"
             f"{plan.width}, guidance {guidance:g}, {placement.world_size} rank(s), {plan.gpu_memory_gb:g} GB per "
             f"GPU ({plan.device})")
    share = plan.gpu_memory_gb >= SHARE_STAGES_GB
    presets = {w: placement_preset(w, guidance=guidance, heads=heads, share_stages=share) for w in range(1, 9)}
    return format_plan(title, placement, by_stage, calls, guidance, plan.gpu_memory_gb, presets, vae_degrees)
