"""Sequence parallelism: one forward of the DiT and of every ControlNet split over the ``sp`` ranks of a branch.

Built on diffusers' context-parallel machinery, with the models left unmodified:

* ``cp_plan(model)``: where the token sequence is split (``ContextParallelInput``) for ``CosmosTransformer3DModel``
  and ``CosmosControlNetModel``. The patchified hidden states are split at the first block; every per-token input a
  block receives is split the same way at every block (``temb`` and ``embedded_timestep`` arrive expanded to
  ``[B, T*H*W, C]``; the ControlNet's base ``latents``), the RoPE tables (and learnable positional embedding) at the
  output of the module that makes them, and ``norm_out``'s inputs. ControlNet residuals stay split: they are added
  token by token to DiT blocks that hold the same partition. The DiT's output is gathered after ``proj_out``.
* ``SequenceParallelAttnProcessor``: the Cosmos self-attention with the parallel config passed to diffusers'
  ``dispatch_attention_fn`` (Ulysses all-to-all over heads). Cross-attention needs none: its queries are local and
  its keys and values (the text and image context) are whole on every rank. **The stock processors ignore the
  parallel config and attend within one shard: a plausible, wrong video.** ``check_processors`` refuses such a model
  at start-up and before every chunk.
* ``branch_meshes(branches, device_type)``: one ``DeviceMesh`` ("ring" = 1, "ulysses" = sp) per sequence-parallel branch, built
  and flattened on *every* rank in the same order (process groups are named from a global counter; a rank that
  skipped one would hang the next world-wide group).

Uneven sizes: a chunk whose token count (or a model whose head count) does not divide by ``sp`` takes diffusers'
``ulysses_anything`` path (``tensor_split``: shards differ by at most one token; missing heads are padded; an 8-byte
size exchange before each all-to-all), chosen per chunk (``SequenceParallelDiT.before_chunk``); even sizes take the
standard Ulysses path (the same partition, no size exchanges). The final gather pads each shard to the largest,
gathers, and trims (gloo's ``all_gather`` refuses unequal sizes).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.hooks.context_parallel import EquipartitionSharder, PartitionAnythingSharder
from diffusers.models._modeling_parallel import ContextParallelConfig, ContextParallelInput
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.utils import logging as diffusers_logging
from torch.distributed.device_mesh import DeviceMesh

from transfer.errors import TransferError

_PER_TOKEN = ContextParallelInput(split_dim=1, expected_dims=3)
_TABLE = ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)


def cp_plan(model: torch.nn.Module) -> dict:
    """diffusers context-parallel plan for a ``CosmosTransformer3DModel`` or ``CosmosControlNetModel``."""
    control = hasattr(model, "control_blocks")
    blocks = "control_blocks" if control else "transformer_blocks"
    every_block = {"embedded_timestep": _PER_TOKEN, "temb": _PER_TOKEN}
    if control:
        every_block["latents"] = _PER_TOKEN  # the base latents, added to the control stream in the first block
    plan = {
        "rope": {0: _TABLE, 1: _TABLE},  # (cos, sin), [T*H*W, D] each
        f"{blocks}.0": {"hidden_states": _PER_TOKEN},
        f"{blocks}.*": every_block,
    }
    if getattr(model, "learnable_pos_embed", None) is not None:
        plan["learnable_pos_embed"] = {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)}
    if not control:
        plan["norm_out"] = {"embedded_timestep": _PER_TOKEN, "temb": _PER_TOKEN}
    return plan


class SequenceParallelAttnProcessor:
    """Cosmos self-attention (``CosmosAttnProcessor2_0``'s arithmetic, op for op) that attends over the whole
    sequence of a sequence-parallel branch: ``dispatch_attention_fn`` gets the parallel config that diffusers'
    ``enable_parallelism`` writes into ``_parallel_config``."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None) -> torch.Tensor:
        if self._parallel_config is None or encoder_hidden_states is not None:
            raise TransferError("SequenceParallelAttnProcessor is for the self-attention of a sequence-parallel model")
        if image_rotary_emb is not None and image_rotary_emb[0].shape[0] != hidden_states.shape[1]:
            raise TransferError(f"sequence parallel: RoPE covers {image_rotary_emb[0].shape[0]} tokens but this shard "
                                f"holds {hidden_states.shape[1]} (the plan does not split it)")
        query, key, value = (f(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
                             for f in (attn.to_q, attn.to_k, attn.to_v))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, use_real=True, use_real_unbind_dim=-2)
            key = apply_rotary_emb(key, image_rotary_emb, use_real=True, use_real_unbind_dim=-2)
        out = dispatch_attention_fn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                    attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                    parallel_config=self._parallel_config)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def self_attention_modules(model: torch.nn.Module):
    """``(name, module)`` of every self-attention module (the ones that must attend across shards)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Attention) and not m.is_cross_attention]


def install_processors(model: torch.nn.Module) -> None:
    """A processor instance of its own for every self-attention module (``enable_parallelism`` writes the config into
    the processors present when it runs; one shared between models would keep the last config)."""
    for _, module in self_attention_modules(model):
        module.set_processor(SequenceParallelAttnProcessor())


def check_processors(models: dict[str, torch.nn.Module], sp: int) -> None:
    """Refuse a model whose self-attention would attend within one shard (a stock processor, or a config missing)."""
    for model_name, model in models.items():
        for name, module in self_attention_modules(model):
            proc = module.processor
            config = getattr(proc, "_parallel_config", None)
            cp = getattr(config, "context_parallel_config", None)
            if not isinstance(proc, SequenceParallelAttnProcessor) or cp is None or cp._flattened_mesh.size() != sp:
                raise TransferError(
                    f"sequence parallel (sp {sp}): {model_name}.{name} uses {type(proc).__name__}, which does not attend "
                    "across the sequence shards and would give a wrong video; its processor must be "
                    "transfer.distributed.sequence_parallel.SequenceParallelAttnProcessor, set before enable_parallelism")


@contextlib.contextmanager
def _one_accelerator():
    """diffusers' ``enable_parallelism`` computes ``rank % torch.accelerator.device_count()`` for a device it does not
    use on the context-parallel path; on a host without one that is a division by zero."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def gathered_sizes(x: torch.Tensor, dim: int, group) -> list[int]:
    """Every rank's size of its shard along ``dim``, in rank order."""
    size = torch.tensor([x.shape[dim]], dtype=torch.int64, device=x.device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    return [int(s) for s in sizes]


def padded_gather(x: torch.Tensor, dim: int, group, sizes: list[int] | None = None) -> torch.Tensor:
    """All-gather shards that may differ in size along ``dim``: exchange sizes (unless given, ``gathered_sizes``), pad
    to the largest, gather, trim."""
    n = dist.get_world_size(group)
    sizes = sizes or gathered_sizes(x, dim, group)
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, max(sizes) - x.shape[dim]]
    x = F.pad(x, pad).contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=group)
    return torch.cat([p.narrow(dim, 0, s) for p, s in zip(parts, sizes)], dim=dim)


@dataclass(frozen=True)
class Branch:
    """The sp ranks that run one guidance branch of a DiT group together, and their mesh."""

    ranks: tuple[int, ...]
    mesh: DeviceMesh


def branch_meshes(branches: list[tuple[int, ...]], device_type: str) -> dict[tuple[int, ...], Branch]:
    """Build (on every rank, in the same order) one ("ring", "ulysses") mesh per sequence-parallel branch, flattened
    up front so that diffusers' own ``_flatten`` on the member ranks finds it made."""
    out = {}
    for ranks in branches:
        mesh = DeviceMesh(device_type, torch.tensor(ranks).reshape(1, len(ranks)), mesh_dim_names=("ring", "ulysses"))
        mesh._flatten()
        out[tuple(ranks)] = Branch(tuple(ranks), mesh)
    return out


@dataclass
class SequenceParallelDiT:
    """What ``enable`` made: the models, their configs and the branch's degree."""

    models: dict[str, torch.nn.Module]
    configs: dict[str, ContextParallelConfig]
    sp: int

    def before_chunk(self, latent_shape) -> None:
        """Check the processors again, and use diffusers' standard Ulysses path where the chunk's tokens and a model's
        heads divide by sp (no size exchanges), its ``ulysses_anything`` path where they do not."""
        check_processors(self.models, self.sp)
        for name, model in self.models.items():
            p_t, p_h, p_w = model.config.patch_size
            tokens = (latent_shape[-3] // p_t) * (latent_shape[-2] // p_h) * (latent_shape[-1] // p_w)
            self.configs[name].ulysses_anything = bool(tokens % self.sp or model.config.num_attention_heads % self.sp)

    def shard_tokens(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's share of a per-token tensor ``[B, tokens, ...]`` (a control's weight map), cut as diffusers cuts
        the ControlNets' sequence for this chunk (``before_chunk``'s path), so it lines up with their residuals."""
        name = next(n for n in self.models if n.startswith("controlnet/"))
        config = self.configs[name]
        if config.ulysses_anything:
            return PartitionAnythingSharder.shard_anything(tensor, 1, config._flattened_mesh)
        return EquipartitionSharder.shard(tensor, 1, config._flattened_mesh)


def enable(models: dict[str, torch.nn.Module], branch: Branch, plan=cp_plan) -> SequenceParallelDiT:
    """Split every forward of ``models`` (the DiT and its ControlNets) over ``branch``'s ranks; checks the result.
    ``plan(model)`` is the context-parallel plan (a test passes an incomplete one to see it fail). Until
    ``before_chunk`` says otherwise the models take the ``ulysses_anything`` path (any sizes)."""
    sp = len(branch.ranks)
    configs = {}
    for name, model in models.items():
        install_processors(model)
        config = configs[name] = ContextParallelConfig(ulysses_degree=sp, ring_degree=1, ulysses_anything=True,
                                                       mesh=branch.mesh)
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # its "experimental feature" warning, once per model and rank
        try:
            with _one_accelerator():
                model.enable_parallelism(config=config, cp_plan=plan(model))
        finally:
            diffusers_logging.set_verbosity(verbosity)
        if not hasattr(model, "control_blocks"):  # the DiT's velocity is gathered whole on every rank of the branch
            group = config._flattened_mesh.get_group()
            model.proj_out.register_forward_hook(lambda module, inputs, out: padded_gather(out, 1, group))
    check_processors(models, sp)
    return SequenceParallelDiT(dict(models), configs, sp)
