"""A Cosmos 3 DiT group: each step's transformer passes split over the group's branches, each pass over ``sp`` ranks
(Ulysses on diffusers' context-parallel hooks).

**Passes.** A transfer step runs up to three passes (diffusers' ``Cosmos3TransferLoopDenoiser``): ``cond`` (text +
hints + target), ``cond_no_control`` (text + target, when ``control_guidance != 1``) and ``uncond`` (negative text +
hints + target, when ``guidance_scale > 1``), switched on and off per step by the guidance intervals, and of unequal
length (``cond`` holds every hint's tokens, ``cond_no_control`` none). ``PassSplitDenoiser`` asks diffusers' own
block which passes this step needs (a dry run of its ``__call__`` that records them), deals them to the branches
longest first, each to the least-loaded branch by token count (``deal_passes``: on a step with fewer passes than
branches some branches idle; with more, a branch runs two), runs this branch's, broadcasts each pass's prediction from
its branch to the group, and lets diffusers' block combine them (its velocity formula, unchanged).

**Sequence.** ``enable_ulysses`` splits every forward over a branch's ranks: the understanding and generation streams
and the rotary tables are split at the decoder layers (diffusers' hooks, a hand plan: the model has none), each layer
attends with ``transfer.families.cosmos3.attention.ExpandedCosmos3Processor`` (KV heads expanded for the all-to-all, the
understanding stream's causal mask built explicitly over the gathered length, ragged shards through diffusers'
``ulysses_anything``), and the
streams are gathered after the final norms through the model's ``_cp_gather_fn`` seam (padded: gloo's all-gather
refuses unequal sizes). **The stock ``Cosmos3AttnProcessor`` attends within one shard under these hooks: a wrong video
(measured max diff 0.62, ../shared/COSMOS3.md)**; ``check_processors`` refuses it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from diffusers.models._modeling_parallel import ContextParallelConfig, ContextParallelInput
from diffusers.models.transformers.transformer_cosmos3 import Cosmos3AttnProcessor
from diffusers.modular_pipelines.cosmos.denoise import Cosmos3TransferLoopDenoiser
from diffusers.utils import logging as diffusers_logging

from transfer.families.cosmos3.attention import ExpandedCosmos3Processor, expand_kv_heads
from transfer.distributed.sequence_parallel import Branch, _one_accelerator, padded_gather
from transfer.errors import TransferError

#: Where diffusers' hooks split a ``Cosmos3OmniTransformer``'s sequence: both streams once before the first decoder
#: layer, the (cos, sin) tables of both streams at every layer. The gather is the model's ``_cp_gather_fn`` seam.
_ROWS = ContextParallelInput(split_dim=0, expected_dims=2)
CP_PLAN = {"layers.0": {"und_seq": _ROWS, "gen_seq": _ROWS}, "layers.*": {"rotary_emb": [_ROWS] * 4}}


def attention_modules(transformer):
    return [(name, m) for name, m in transformer.named_modules() if hasattr(m, "processor")
            and isinstance(m.processor, Cosmos3AttnProcessor)]


def check_processors(transformer, sp: int) -> None:
    """Refuse a sequence-parallel transformer whose attention would stay within one shard (the stock processor, or a
    missing parallel config)."""
    if sp <= 1:
        return
    for name, module in attention_modules(transformer):
        proc = module.processor
        cp = getattr(getattr(proc, "_parallel_config", None), "context_parallel_config", None)
        if not isinstance(proc, ExpandedCosmos3Processor) or cp is None or cp._flattened_mesh.size() != sp:
            raise TransferError(
                f"sequence parallel (sp {sp}): transformer.{name} uses {type(proc).__name__}, which attends within "
                "one shard under the context-parallel hooks and would give a wrong video; its processor must be "
                "transfer.families.cosmos3.attention.ExpandedCosmos3Processor, set before enable_parallelism")


def enable_ulysses(transformer, branch: Branch) -> None:
    """Split every forward of ``transformer`` over ``branch``'s ranks; checks the result."""
    sp = len(branch.ranks)
    expand_kv_heads(transformer)
    config = ContextParallelConfig(ulysses_degree=sp, ring_degree=1, ulysses_anything=True, mesh=branch.mesh)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its "experimental feature" warning, once per rank
    try:
        with _one_accelerator():
            transformer.enable_parallelism(config=config, cp_plan=CP_PLAN)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    group = config._flattened_mesh.get_group()
    transformer._cp_gather_fn = lambda und, gen: (padded_gather(und, 0, group), padded_gather(gen, 0, group))
    check_processors(transformer, sp)


def deal_passes(passes: list[tuple[str, int]], branches: int) -> dict[str, int]:
    """Each pass (name, tokens) to a branch: longest first, each to the branch with the fewest tokens so far (the
    lowest index on a tie). Deterministic: every rank of the group computes the same deal."""
    load = [0] * branches
    deal = {}
    for name, tokens in sorted(passes, key=lambda p: -p[1]):
        b = min(range(branches), key=lambda i: (load[i], i))
        deal[name] = b
        load[b] += tokens
    return deal


class PassSplitDenoiser(Cosmos3TransferLoopDenoiser):
    """diffusers' transfer denoiser with its passes dealt over a DiT group's branches (``deal_passes``); set
    ``group_ranks`` (the group's ranks, branch after branch), ``sp`` and ``group`` (its process group) before use."""

    group_ranks: tuple[int, ...] = ()
    sp: int = 1
    group = None

    @property
    def branches(self) -> int:
        return len(self.group_ranks) // self.sp

    @torch.no_grad()
    def __call__(self, components, block_state, i, t):
        if self.branches <= 1:
            return super().__call__(components, block_state, i, t)
        calls = {}

        def record(components, static, vision_tokens, vision_timesteps, context_name, **kwargs):
            calls[context_name] = (static, vision_tokens, vision_timesteps, kwargs)
            return torch.zeros(())  # the dry run's formula on placeholders; its velocity is overwritten below

        self._forward = record
        try:
            super().__call__(components, block_state, i, t)
        finally:
            del self._forward
        deal = deal_passes([(name, int(call[0]["sequence_length"])) for name, call in calls.items()], self.branches)
        mine = self.group_ranks.index(dist.get_rank()) // self.sp
        dtype = components.transformer.dtype
        outputs = {}
        for name, (static, tokens, timesteps, kwargs) in calls.items():  # diffusers' order: the same on every rank
            if deal[name] == mine:
                out = Cosmos3TransferLoopDenoiser._forward(components, static, tokens, timesteps, name, **kwargs)
                if out.shape != block_state.latents.shape or out.dtype != dtype:
                    raise RuntimeError(f"pass {name}: prediction {tuple(out.shape)} {out.dtype}, expected the latents' "
                                       f"{tuple(block_state.latents.shape)} in {dtype}")
                out = out.contiguous()
            else:
                out = torch.empty(block_state.latents.shape, dtype=dtype, device=block_state.latents.device)
            dist.broadcast(out, src=self.group_ranks[deal[name] * self.sp], group=self.group)
            outputs[name] = out
        self._forward = lambda components, static, tokens, timesteps, name, **kwargs: outputs[name]
        try:
            return super().__call__(components, block_state, i, t)
        finally:
            del self._forward


def install_pass_split(blocks, group_ranks: tuple[int, ...], sp: int, group) -> PassSplitDenoiser:
    """Replace the transfer denoise loop's ``denoiser`` in ``blocks`` (the execution blocks) with a
    ``PassSplitDenoiser`` for this group."""
    loop = blocks.sub_blocks["denoise.chunk_denoise.denoise"]
    block = PassSplitDenoiser()
    block.group_ranks, block.sp, block.group = tuple(group_ranks), sp, group
    loop.sub_blocks["denoiser"] = block
    return block
