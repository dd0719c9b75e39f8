"""The preset chooser: which placement a run gets (``choose_placement``: a ``--placement`` file, else the preset
``choose_preset`` picks). Planning only: the runtime (``transfer.distributed.rank_loop``) and ``--plan``
(``transfer.plan``) import it; it imports no runtime module.

Presets (``preset``) are chosen per run from the world size, the request count, the guidance, the DiT's attention
heads, ``--context_parallel_size`` and the ranks per node (docs/parallelism.md):

* one video: one group over as many ranks as the heads allow (cfg 2 when guidance > 1), the text encoder and the VAE
  on ranks that the group leaves free, else beside a shard (a single request runs its stages one after another) --
  but only on GPUs of 64 GB or more (``share_stages``): on smaller ones the text encoder and the VAE keep a rank
  each, off the DiT;
* on CPU (gloo) the groups keep sp 1 unless ``--context_parallel_size`` asks for more: bit-identical to one process;
* a batch: every layout of equal groups is costed as ``ceil(requests / groups) * (1 / (cfg * sp * efficiency(sp)) +
  vae)`` and the cheapest wins (ties: fewer idle ranks, fewer groups, then the coordinator on rank 0); replicas never
  share a rank with a stage. ``vae`` is the VAE time a chunk's DiT waits for (``vae_cost``, from the measured shares in
  ``VAE_SHARE``): a VAE group over the DiT group's ranks adds its calls / N, a VAE beside one shard all of them, a VAE
  on a rank of its own only the decode and re-encode of ``roundtrip`` conditioning (control encodes run ahead);
* the VAE group (``--vae_parallel_degree``, docs/parallelism.md): on GPUs, where the VAE would sit beside a shard of
  the first DiT group, every rank of that group (led by its leader; it splits each VAE call by rows between
  denoising); on CPU one rank unless asked.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from transfer.config import RunConfig, cfg_on
from transfer.distributed.placement import DiTGroup, Placement, check_vae_degree, from_file, heads_split
from transfer.errors import TransferError

#: One chunk's VAE calls as a share of its DiT time on one rank (Transfer2.5-2B, 93 x 704 x 1280, bf16, one H200:
#: encode 3.47 s per control, decode 5.12 s, re-encode 2.91 s; a DiT step with CFG 9.57 s x 35 steps): the chooser's
#: VAE term (``vae_cost``).
VAE_SHARE = {"encode": 3.47 / (35 * 9.57), "decode": 5.12 / (35 * 9.57), "reencode": 2.91 / (35 * 9.57)}

#: Assumed cost of sequence parallelism per extra shard (all-to-alls, smaller GEMMs), used only to choose a batch's
#: groups: a group of sp shards runs a forward sp / (1 + SP_OVERHEAD * (sp - 1)) times faster than one rank.
SP_OVERHEAD = 0.03


#: GPUs at least this large (GB) may hold the text encoder or the VAE beside a DiT shard in the presets (Transfer2.5-2B
#: with Reason1-7B: 16.6 GB of text encoder + 9.5 GB of DiT and ControlNets + activations, ``--plan``).
SHARE_STAGES_GB = 64


@dataclass(frozen=True)
class PresetChoice:
    placement: Placement
    why: str


def _layout(world: int, per_node: int, cfg: int, sp: int, groups: int, reserve: int, share: bool) -> Placement | None:
    """``groups`` groups of cfg x sp ranks, each branch inside one node, ranks ``0..reserve-1`` kept for stages; the
    stages go on the ranks left over (coordinator + text on the first, the VAE on the second, preprocessing on the
    third; any further rank idle), else beside the first group's shards. None when it does not fit."""
    branches = []
    for start in range(0, world, per_node):
        free = [r for r in range(start, min(start + per_node, world)) if r >= reserve]
        branches += [tuple(free[i:i + sp]) for i in range(0, len(free) - sp + 1, sp)]
    need = groups * cfg
    if len(branches) < need:
        return None
    dit_groups = tuple(DiTGroup(tuple(r for b in branches[g * cfg:(g + 1) * cfg] for r in b), cfg, sp)
                       for g in range(groups))
    used = {r for g in dit_groups for r in g.ranks}
    hosts = [r for r in range(world) if r not in used]
    if not hosts and groups > 1:
        return None
    hosts, idle = hosts[:3], tuple(hosts[3:])
    if not share and len(hosts) < min(2, world - 1):  # small GPUs: the text encoder and the VAE apart, off the DiT
        return None
    if not hosts:  # one group over every rank: the stages sit beside shards
        hosts = [0, 1] if world > 1 else [0]
    coordinator = text = hosts[0]
    vae = hosts[1] if len(hosts) > 1 else hosts[0]
    preprocess = hosts[2] if len(hosts) > 2 else None
    return Placement(world, coordinator, text, vae, dit_groups, preprocess, idle)


def auto_vae_degree(p: Placement, split_sequence: bool, latent_rows: int | None) -> int:
    """The default VAE group: on GPUs (``split_sequence``), where the VAE sits beside a shard of the first DiT group,
    every rank of that group (at most one per latent row); else 1."""
    group = p.dit_groups[0]
    if not split_sequence or p.vae.leader not in group.ranks:
        return len(p.vae.ranks)
    return min(len(group.ranks), latent_rows or len(group.ranks))


def vae_cost(p: Placement, roundtrip: bool = True, controls: int = 1) -> float:
    """The VAE time one chunk's DiT waits for, as a share of one rank's DiT time (``VAE_SHARE``): a VAE group inside
    the DiT group runs every call between denoising, 1/N each; a VAE on ranks of its own encodes controls ahead, and
    only ``roundtrip``'s decode and re-encode hold up the next chunk."""
    calls = controls * VAE_SHARE["encode"] + VAE_SHARE["decode"] + roundtrip * VAE_SHARE["reencode"]
    if not set(p.vae.ranks) & set(p.dit_groups[0].ranks):
        return roundtrip * (VAE_SHARE["decode"] + VAE_SHARE["reencode"]) / len(p.vae.ranks)
    return calls / len(p.vae.ranks)


def preset(world_size: int, **kwargs) -> Placement:
    """The chosen placement for ``world_size`` ranks (``choose_preset``)."""
    return choose_preset(world_size, **kwargs).placement


def choose_preset(world_size: int, *, requests: int = 1, guidance: float = 3.0, heads: int = 16,
                  sp: int | None = None, per_node: int | None = None, share_stages: bool = True,
                  split_sequence: bool = True, vae_degree: int | None = None, latent_rows: int | None = None,
                  roundtrip: bool = True, controls: int = 1) -> PresetChoice:
    """The placement that ends ``requests`` requests soonest under the cost model in the module docstring, with every
    sequence-parallel degree the heads allow (or only ``sp``: ``--context_parallel_size``). ``share_stages`` False
    (GPUs under 64 GB): the text encoder and the VAE never sit beside a DiT shard. ``split_sequence`` False (CPU
    runs): without ``sp`` the groups keep sp 1, whose outputs equal one process's bit for bit (sequence shards'
    matrix products may round differently, docs/parallelism.md "Equality"). ``vae_degree``: ``--vae_parallel_degree``
    (None: ``auto_vae_degree``); ``latent_rows``: the smallest request's latent height (a VAE group's bound);
    ``roundtrip`` and ``controls`` (per request) weigh the VAE term."""
    check_vae_degree(vae_degree, latent_rows, max(world_size, 1))
    if world_size < 1:
        raise TransferError(f"no placement for {world_size} processes")
    if world_size == 1:
        if sp not in (None, 1):
            raise TransferError(f"--context_parallel_size {sp} needs at least {sp} processes, got 1")
        if vae_degree not in (None, 1):
            raise TransferError(f"--vae_parallel_degree {vae_degree} needs at least {vae_degree} processes, got 1")
        return PresetChoice(Placement(1), "one process holds every stage")
    per_node = min(per_node or world_size, world_size)
    cfgs = (2, 1) if cfg_on(guidance) else (1,)
    degrees = [sp] if sp else [d for d in range(per_node if split_sequence else 1, 0, -1) if heads_split(heads, d)]
    if sp and (sp > per_node or not heads_split(heads, sp)):
        why = (f"more than the {per_node} ranks of a node" if sp > per_node
               else f"does not split the DiT's {heads} attention heads")
        raise TransferError(f"--context_parallel_size {sp}: {why}")
    best = None
    for cfg in cfgs:
        for d in degrees:
            for groups in range(1, world_size // (cfg * d) + 1):
                for reserve in (0, 1, 2):
                    p = _layout(world_size, per_node, cfg, d, groups, reserve, share_stages)
                    if p is None:
                        continue
                    try:
                        p = p.with_vae_degree(auto_vae_degree(p, split_sequence, latent_rows)
                                              if vae_degree is None else vae_degree)
                    except TransferError:  # the VAE group does not fit this layout's groups
                        continue
                    cost = math.ceil(requests / groups) * ((1 + SP_OVERHEAD * (d - 1)) / (cfg * d)
                                                           + vae_cost(p, roundtrip, controls))
                    key = (round(cost, 9), len(p.idle), groups, p.coordinator != 0)  # rank 0 logs: coordinator there
                    if best is None or key < best[0]:
                        best = (key, p, cfg, d, groups, cost)
    if best is None:
        vae = f" and a VAE group of {vae_degree}" if vae_degree not in (None, 1) else ""
        raise TransferError(f"no placement of {world_size} processes has DiT groups of sp {sp}{vae} "
                            f"({per_node} per node, guidance {guidance})")
    _, p, cfg, d, groups, cost = best
    what = "one video" if requests == 1 else f"a batch of {requests} requests"
    why = (f"{what} on {world_size} ranks: {groups} DiT group{'s' if groups > 1 else ''} of cfg {cfg} x sp {d} "
           f"(estimated {cost:.3f} x one rank's DiT time; docs/parallelism.md)")
    return PresetChoice(p, why)


def choose_placement(config: RunConfig, world_size: int, requests: int = 1, heads: int = 16,
                     latent_rows: int | None = None, controls: int = 1) -> PresetChoice:
    """``--placement``, else the preset for this run: request count, guidance, the DiT's heads,
    ``--context_parallel_size``, ``--vae_parallel_degree`` (at most ``latent_rows``), the chunk conditioning, the
    controls per request and the ranks per node (LOCAL_WORLD_SIZE). On CPU the preset splits no sequence and no VAE
    call unless asked (its outputs then equal one process's bit for bit); ``--plan`` plans for GPUs."""
    parallel, plan = config.parallel, config.plan
    if parallel.placement_file:
        if parallel.vae_degree is not None:
            raise TransferError("--vae_parallel_degree and --placement: say the VAE group in the placement file "
                                '("vae": [ranks])')
        placement = from_file(parallel.placement_file, world_size)
        placement.check_runnable()
        check_vae_degree(len(placement.vae.ranks), latent_rows, what=f"placement: a VAE group of "
                         f"{len(placement.vae.ranks)} ranks")
        return PresetChoice(placement, f"--placement {parallel.placement_file}")
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if plan is not None:
        share = plan.gpu_memory_gb >= SHARE_STAGES_GB
    else:
        share = not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory / 1e9 >= SHARE_STAGES_GB
    return choose_preset(world_size, requests=requests, guidance=config.generation.guidance, heads=heads,
                         sp=parallel.sp_degree, per_node=per_node, share_stages=share,
                         split_sequence=plan is not None or torch.cuda.is_available(), vae_degree=parallel.vae_degree,
                         latent_rows=latent_rows, roundtrip=config.generation.chunk_conditioning == "roundtrip",
                         controls=controls)
