"""Stage placement: which rank runs the coordinator, the text encoder, the VAE and the DiT.

Placement is data, validated against WORLD_SIZE before anything loads. Presets:

=====  ===========  =====  =====  ===========================================
ranks  coordinator  text   vae    dit groups
=====  ===========  =====  =====  ===========================================
1      0            0      0      [0]
2      0            0      0      [1]
3      0            0      1      [2]
4      0            1      2      [3]
5      0            1      2      [3, 4]                  (one CFG-parallel pair)
6      0            1      2      [3, 4], [5]             (a pair and a replica)
7      0            1      2      [3, 4], [5, 6]          (two pairs)
8      0            1      2      [3, 4], [5, 6], [7]
=====  ===========  =====  =====  ===========================================

Computed controls (preprocessors) run on the coordinator unless ``preprocess`` names another rank.

A DiT group of two ranks is a CFG-parallel pair: the first rank runs the conditional
branch, the second the unconditional one, combined every step. Groups serve different
requests of a batch (request j goes to group j mod groups).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from transfer.errors import TransferError

STAGES = ("coordinator", "text", "vae", "dit")


@dataclass(frozen=True)
class Placement:
    world_size: int
    """Number of processes (torchrun --nproc_per_node)."""
    coordinator: int = 0
    """Rank that parses specs, runs preprocessors and guardrails, and writes outputs."""
    text: int = 0
    """Rank holding the text encoder."""
    vae: int = 0
    """Rank holding the VAE (control encode, decode, re-encode)."""
    dit_groups: tuple[tuple[int, ...], ...] = field(default=((0,),))
    """DiT + ControlNet ranks: each group serves whole requests; a 2-rank group splits the CFG branches."""
    preprocess: int | None = None
    """Rank computing controls a spec leaves out (depth, seg and keypoint models); default: the coordinator."""

    @property
    def preprocess_rank(self) -> int:
        return self.coordinator if self.preprocess is None else self.preprocess

    def __post_init__(self):
        ranks = [self.coordinator, self.text, self.vae, self.preprocess_rank, *(r for g in self.dit_groups for r in g)]
        bad = [r for r in ranks if not isinstance(r, int) or not 0 <= r < self.world_size]
        if bad:
            raise TransferError(f"placement names rank {bad[0]!r}, outside 0..{self.world_size - 1} (WORLD_SIZE {self.world_size})")
        if not self.dit_groups or any(len(g) not in (1, 2) for g in self.dit_groups):
            raise TransferError("placement: every DiT group must have 1 rank or 2 (a CFG-parallel pair)")
        dit = [r for g in self.dit_groups for r in g]
        if len(set(dit)) != len(dit):
            raise TransferError("placement: a rank appears in two DiT groups")
        if len(self.dit_groups) > 1 and any(r in (self.coordinator, self.text, self.vae) for r in dit):
            raise TransferError("placement: DiT replicas must not share a rank with another stage")
        unused = set(range(self.world_size)) - set(ranks)
        if unused:
            raise TransferError(f"placement leaves rank {min(unused)} without a stage")

    def stages_of(self, rank: int) -> list[str]:
        """The stages a rank runs, in STAGES order."""
        out = [s for s in ("coordinator", "text", "vae") if getattr(self, s) == rank]
        if self.preprocess_rank == rank != self.coordinator:
            out.append("preprocess")
        return out + (["dit"] if any(rank in g for g in self.dit_groups) else [])

    def talking_pairs(self) -> list[tuple[int, int]]:
        """The ordered ``(src, dst)`` rank pairs that exchange tensors, sorted (the same list on every rank): the
        coordinator with every other stage; the text and VAE ranks with every DiT rank (embeddings, control and
        condition latents, latents to decode); the two ranks of a CFG pair. 16 ranks as coordinator, text, vae and
        six pairs + one replica: 94 of the 240 ordered pairs (8-rank preset: 38 of 56)."""
        edges: set[tuple[int, int]] = set()

        def link(a: int, b: int) -> None:
            if a != b:
                edges.update({(a, b), (b, a)})

        for r in (self.text, self.vae, self.preprocess_rank, *(r for g in self.dit_groups for r in g)):
            link(self.coordinator, r)
        for group in self.dit_groups:
            for r in group:
                link(self.text, r)
                link(self.vae, r)
            if len(group) == 2:
                link(*group)
        return sorted(edges)

    def dit_group_for(self, request_index: int) -> tuple[int, ...]:
        return self.dit_groups[request_index % len(self.dit_groups)]

    def describe(self) -> str:
        return ", ".join(f"rank {r}: {'+'.join(self.stages_of(r))}" for r in range(self.world_size))


def preset(world_size: int) -> Placement:
    """The documented placement for ``world_size`` ranks (1-8)."""
    if not 1 <= world_size <= 8:
        raise TransferError(f"no placement preset for {world_size} processes (1 to 8 are supported)")
    if world_size == 1:
        return Placement(1)
    if world_size == 2:
        return Placement(2, dit_groups=((1,),))
    if world_size == 3:
        return Placement(3, vae=1, dit_groups=((2,),))
    extra = list(range(3, world_size))
    groups = tuple(tuple(extra[i : i + 2]) for i in range(0, len(extra), 2))
    return Placement(world_size, coordinator=0, text=1, vae=2, dit_groups=groups)


def from_file(path: str | Path, world_size: int) -> Placement:
    """A placement from JSON: ``{"coordinator": 0, "text": 1, "vae": 2, "dit_groups": [[3]]}``, optionally
    ``"preprocess": RANK``."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise TransferError(f"cannot read placement file {path}: {e}") from None
    unknown = set(data) - {"coordinator", "text", "vae", "dit_groups", "preprocess"}
    if unknown:
        raise TransferError(f"placement file {path}: unknown key {sorted(unknown)[0]!r}")
    groups = tuple(tuple(g) for g in data.get("dit_groups", [[0]]))
    return Placement(world_size, data.get("coordinator", 0), data.get("text", 0), data.get("vae", 0), groups,
                     data.get("preprocess"))

