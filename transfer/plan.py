"""``--plan``: each rank's weight memory for a placement, from configs alone.

Every model a stage holds is built on the ``meta`` device (shapes, no storage), so planning
the real Transfer2.5-2B with a 7B or 11B text encoder takes seconds and no weights. Bytes are
counted per parameter and buffer at the run dtype (floating tensors) or their own dtype.
Activations, the CUDA context and allocator slack come on top: the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from transfer.checkpoint import CheckpointInfo
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

    from transfer.text_encoding import text_encoder_class

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


def format_plan(info_name: str, placement: Placement, by_stage, dtype_name: str, gpu_memory_gb: float) -> str:
    ranks = plan_ranks(placement, by_stage)
    replicated = sum(sum(c.values()) for c in by_stage.values())
    unit, scale = ("GB", GB) if replicated >= 0.1 * GB else ("MB", 1e6)  # the tiny presets are a few MB
    lines = [f"memory plan: {info_name}, {dtype_name} weights, {placement.world_size} rank(s), "
             f"{gpu_memory_gb:g} GB per GPU", ""]
    lines.append(f"{'rank':>4}  {'stages':<22}{'weights ' + unit:>11}{'free GB':>9}  fits")
    lines.append("-" * 56)
    rows = [(str(r.rank), "+".join(r.stages), r.total) for r in ranks] + [("", "replicated (upstream)", replicated)]
    for rank, stages, total in rows:
        free = gpu_memory_gb - total / GB
        lines.append(f"{rank:>4}  {stages:<22}{total / scale:>11.2f}{free:>9.2f}  {'yes' if free > 0 else 'NO'}")
    lines += ["", "components:"]
    for stage, comps in by_stage.items():
        for name, b in comps.items():
            lines.append(f"  {stage:<5} {name:<28}{b / scale:>8.2f} {unit}")
    lines.append("")
    lines.append("weights only: activations (a 720p 93-frame DiT chunk needs several GB more), the CUDA context "
                 "and allocator slack come on top; keep headroom.")
    return "\n".join(lines)


def run_plan(args) -> str:
    """The ``--plan`` report for the CLI arguments (no process group, no weights, no inputs read)."""
    from configs.models import preset
    from transfer.checkpoint import info_from_preset, inspect_checkpoint, require_modalities
    from transfer.distributed.runtime import placement_from_args
    from transfer.errors import TransferError
    from transfer.job import DTYPES, requests_from_args, resolve_checkpoint

    if args.gpu_memory_gb <= 0:
        raise TransferError(f"--gpu_memory_gb must be positive, got {args.gpu_memory_gb}")
    if args.checkpoint_dir or preset(args.checkpoint_preset).embedded:
        info = inspect_checkpoint(resolve_checkpoint(args))  # the directory's own configs (tokenizer-sized vocab)
        name = str(info.root)
    else:
        info = info_from_preset(preset(args.checkpoint_preset))
        name = f"preset {args.checkpoint_preset}"
    if args.controlnet_specs or args.batch_input_path:
        modalities = sorted({m for r in requests_from_args(args) for m in r.controls})
        require_modalities(info, modalities)
    else:
        modalities = list(info.modalities)
    placement = placement_from_args(args, args.num_gpus)
    by_stage = component_bytes(info, modalities, DTYPES[args.plan_dtype])
    return format_plan(f"{name}, controls {'+'.join(modalities)}", placement, by_stage, args.plan_dtype, args.gpu_memory_gb)
