"""Cosmos 3's dual-stream attention with the KV heads expanded, for the two places the stock processor fails.

* **A long sequence on a GPU.** diffusers' ``Cosmos3AttnProcessor`` calls SDPA with ``enable_gqa=True`` (8 KV heads
  for 32 query heads in Nano); at the ~86k tokens of a 720p two-hint pass that falls to the math kernel (diffusers'
  Cosmos 3 docs), a sequence-squared score matrix. With the KV heads repeated to the query heads, flash / cuDNN /
  memory-efficient kernels run. ``transfer.families.cosmos3.pipeline.load_cosmos3`` installs this processor on CUDA.
* **A sequence split over ranks** (``transfer.families.cosmos3.parallel``): diffusers' context-parallel dispatch
  takes neither GQA nor ``is_causal``; here the heads are expanded and the understanding stream's causal mask is built
  explicitly over its gathered length; the generation stream attends to both streams without a mask (the order of
  keys across shards does not matter to it).

On CPU one process keeps the stock processor: its output is then diffusers' pipeline's, bit for bit.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_cosmos3 import Cosmos3AttnProcessor, _rotate_half


def _rope(x, cos, sin):
    return x * cos + _rotate_half(x) * sin


class ExpandedCosmos3Processor(Cosmos3AttnProcessor):
    """``Cosmos3AttnProcessor``'s arithmetic with KV heads repeated and the causal mask explicit; whole-sequence
    attention across a branch when diffusers' ``enable_parallelism`` has set ``_parallel_config``."""

    _parallel_config = None

    def __call__(self, attn, und_seq, gen_seq, rotary_emb):
        config = self._parallel_config
        q_und = attn.norm_q(attn.to_q(und_seq).view(-1, attn.num_attention_heads, attn.head_dim))
        k_und = attn.norm_k(attn.to_k(und_seq).view(-1, attn.num_key_value_heads, attn.head_dim))
        v_und = attn.to_v(und_seq).view(-1, attn.num_key_value_heads, attn.head_dim)
        k_und_for_gen = attn.k_norm_und_for_gen(k_und) if attn.k_norm_und_for_gen is not None else k_und
        q_gen = attn.norm_added_q(attn.add_q_proj(gen_seq).view(-1, attn.num_attention_heads, attn.head_dim))
        k_gen = attn.norm_added_k(attn.add_k_proj(gen_seq).view(-1, attn.num_key_value_heads, attn.head_dim))
        v_gen = attn.add_v_proj(gen_seq).view(-1, attn.num_key_value_heads, attn.head_dim)
        cos_und, sin_und, cos_gen, sin_gen = (r.unsqueeze(1) for r in rotary_emb)
        q_und, k_und, k_und_for_gen = (_rope(x, cos_und, sin_und) for x in (q_und, k_und, k_und_for_gen))
        q_gen, k_gen = _rope(q_gen, cos_gen, sin_gen), _rope(k_gen, cos_gen, sin_gen)
        repeat = attn.num_attention_heads // attn.num_key_value_heads
        k_und, v_und, k_und_for_gen, k_gen, v_gen = (x.repeat_interleave(repeat, 1)
                                                     for x in (k_und, v_und, k_und_for_gen, k_gen, v_gen))
        s_und = q_und.shape[0]
        if config is not None:  # the understanding stream's whole length, over the branch's (ragged) shards
            group = config.context_parallel_config._flattened_mesh.get_group()
            lengths = [torch.zeros(1, dtype=torch.int64, device=q_und.device) for _ in range(dist.get_world_size(group))]
            dist.all_gather(lengths, torch.tensor([s_und], device=q_und.device), group=group)
            s_und = int(sum(int(n) for n in lengths))
        causal = torch.ones(s_und, s_und, dtype=torch.bool, device=q_und.device).tril_().view(1, 1, s_und, s_und)

        def attend(q, k, v, mask):
            out = dispatch_attention_fn(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask,
                                        is_causal=False, backend=self._attention_backend, parallel_config=config)
            return out.squeeze(0).flatten(-2)

        und_out = attend(q_und, k_und, v_und, causal)
        gen_out = attend(q_gen, torch.cat([k_und_for_gen, k_gen]), torch.cat([v_und, v_gen]), None)
        return attn.to_out(und_out), attn.to_add_out(gen_out)


def expand_kv_heads(transformer) -> None:
    """Give every attention layer of ``transformer`` an ``ExpandedCosmos3Processor`` of its own."""
    for module in transformer.modules():
        if isinstance(getattr(module, "processor", None), Cosmos3AttnProcessor):
            module.set_processor(ExpandedCosmos3Processor())
