"""Stage placement: which rank runs the coordinator, the text encoder, the VAE and the DiT groups.

Placement is data, validated against WORLD_SIZE before anything loads. A **DiT group** (``DiTGroup``) serves whole
requests with ``cfg x sp`` ranks: ``cfg`` = 2 splits the two classifier-free-guidance branches (the conditional
branch's ``sp`` ranks first), ``sp`` > 1 splits every DiT and ControlNet forward of a branch over ``sp`` ranks along
the token sequence (``transfer.distributed.sequence_parallel``). Groups serve different requests of a batch (request
j goes to group j mod groups).

Which preset a run gets: ``transfer.planning.chooser``.

Sequence-parallel branches stay inside a node (consecutive ranks of one node); CFG branches, replicas and stages may
span nodes. Computed controls (preprocessors) run on the coordinator unless ``preprocess`` names another rank.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from transfer.errors import TransferError

STAGES = ("coordinator", "text", "vae", "dit")

def heads_split(heads: int, sp: int) -> bool:
    """Whether diffusers' Ulysses (``ulysses_anything``) can split ``heads`` attention heads over ``sp`` ranks: evenly,
    or with padding heads fewer than each rank's share."""
    pad = -heads % sp
    return sp <= heads and pad < (heads + pad) // sp


@dataclass(frozen=True)
class StageGroup:
    """The ranks that run one stage together; the first, the leader, takes the stage's messages. The text encoder runs
    on one rank (``Placement.check_runnable`` refuses a group of several); a VAE group of several splits each VAE call
    by rows (``transfer.distributed.vae_split``)."""

    ranks: tuple[int, ...]

    def __post_init__(self):
        if not self.ranks or len(set(self.ranks)) != len(self.ranks):
            raise TransferError(f"placement: a stage group needs distinct ranks, got {list(self.ranks)}")

    @classmethod
    def parse(cls, entry) -> "StageGroup":
        """A group from a placement: a rank ``r`` or a list of ranks ``[a, b, ...]``."""
        if isinstance(entry, StageGroup):
            return entry
        return cls(tuple(entry) if isinstance(entry, (list, tuple)) else (entry,))

    @property
    def leader(self) -> int:
        return self.ranks[0]


@dataclass(frozen=True)
class DiTGroup(StageGroup):
    """``cfg_degree x sp_degree`` ranks that denoise one request together; ranks cfg-major (the conditional branch's
    first)."""

    cfg_degree: int = 1
    sp_degree: int = 1

    def __post_init__(self):
        cfg, sp = self.cfg_degree, self.sp_degree
        if cfg not in (1, 2) or sp < 1 or len(self.ranks) != cfg * sp:
            raise TransferError(f"placement: DiT group {list(self.ranks)} must have cfg (1 or 2) x sp ranks, "
                                f"got cfg {cfg}, sp {sp}")
        super().__post_init__()

    @classmethod
    def parse(cls, entry) -> "DiTGroup":
        """A group from a placement file: ``[r]`` (one rank), ``[a, b]`` (a CFG pair), or
        ``{"ranks": [...], "cfg": 1|2, "sp": N}``."""
        if isinstance(entry, DiTGroup):
            return entry
        if isinstance(entry, dict):
            unknown = set(entry) - {"ranks", "cfg", "sp"}
            if unknown or "ranks" not in entry:
                raise TransferError(f"placement: a DiT group is {{\"ranks\": [...], \"cfg\": 1|2, \"sp\": N}}, got {entry}")
            ranks = tuple(entry["ranks"])
            cfg = entry.get("cfg", 1)
            return cls(ranks, cfg, entry.get("sp", len(ranks) // cfg if cfg in (1, 2) else 1))
        ranks = tuple(entry)
        if len(ranks) not in (1, 2):
            raise TransferError("placement: a DiT group given as a list has 1 rank or 2 (a CFG-parallel pair); "
                                'larger groups are {"ranks": [...], "cfg": 1|2, "sp": N}')
        return cls(ranks, len(ranks), 1)

    def branches(self) -> list[tuple[int, ...]]:
        """The sp ranks of each guidance branch (conditional first)."""
        sp = self.sp_degree
        return [self.ranks[b * sp:(b + 1) * sp] for b in range(self.cfg_degree)]

    def branch_of(self, rank: int) -> tuple[int, ...]:
        return next(b for b in self.branches() if rank in b)

    def counterpart(self, rank: int) -> int:
        """The rank at the same sequence shard in the other guidance branch (cfg 2)."""
        i = self.ranks.index(rank)
        return self.ranks[(i + self.sp_degree) % len(self.ranks)]

    def describe(self) -> str:
        return f"{list(self.ranks)} (cfg {self.cfg_degree} x sp {self.sp_degree})"


@dataclass(frozen=True)
class Placement:
    world_size: int
    """Number of processes (torchrun --nproc_per_node x --nnodes)."""
    coordinator: int = 0
    """Rank that parses specs, runs preprocessors and guardrails, and writes outputs."""
    text: StageGroup | int = 0
    """Rank(s) holding the text encoder (a ``StageGroup``; a rank is read as a group of one)."""
    vae: StageGroup | int = 0
    """Rank(s) holding the VAE (control encode, decode, re-encode; a ``StageGroup``, a rank read as a group of one)."""
    dit_groups: tuple[DiTGroup, ...] = field(default=((0,),))
    """DiT + ControlNet groups (``DiTGroup``; a list ``[r]`` or ``[a, b]`` is read as one rank or a CFG pair)."""
    preprocess: int | None = None
    """Rank computing controls a spec leaves out (depth, seg and keypoint models); default: the coordinator."""
    idle: tuple[int, ...] = ()
    """Ranks a preset leaves without work (more ranks than the DiT's heads can split one video over)."""

    @property
    def preprocess_rank(self) -> int:
        return self.coordinator if self.preprocess is None else self.preprocess

    def __post_init__(self):
        if not self.dit_groups:
            raise TransferError("placement: at least one DiT group is needed")
        object.__setattr__(self, "dit_groups", tuple(DiTGroup.parse(g) for g in self.dit_groups))
        object.__setattr__(self, "text", StageGroup.parse(self.text))
        object.__setattr__(self, "vae", StageGroup.parse(self.vae))
        stage_ranks = {self.coordinator, *self.text.ranks, *self.vae.ranks}
        ranks = [*stage_ranks, self.preprocess_rank, *self.dit_ranks()]
        bad = [r for r in ranks if not isinstance(r, int) or not 0 <= r < self.world_size]
        if bad:
            raise TransferError(f"placement names rank {bad[0]!r}, outside 0..{self.world_size - 1} (WORLD_SIZE {self.world_size})")
        dit = self.dit_ranks()
        if len(set(dit)) != len(dit):
            raise TransferError("placement: a rank appears in two DiT groups (or twice in one)")
        if len(self.dit_groups) > 1 and any(r in stage_ranks for r in dit):
            raise TransferError("placement: DiT replicas must not share a rank with another stage")
        for group in self.dit_groups:  # two ranks in both would enter the two groups' collectives in either order
            shared = set(group.ranks) & set(self.vae.ranks)
            if len(self.vae.ranks) > 1 and len(shared) > 1 and self.vae.leader != group.leader:
                raise TransferError(f"placement: the VAE group {list(self.vae.ranks)} shares ranks with the DiT group "
                                    f"{list(group.ranks)}: it must be led by that group's leader (rank {group.leader}), "
                                    "which orders both groups' work")
        if set(self.idle) & set(ranks):
            raise TransferError("placement: an idle rank has a stage")
        unused = set(range(self.world_size)) - set(ranks) - set(self.idle)
        if unused:
            raise TransferError(f"placement leaves rank {min(unused)} without a stage")

    def check_runnable(self) -> None:
        """What the runtime cannot run, refused in one line: a text encoder group of several ranks (the placement can
        say it; one prompt is not split over ranks)."""
        if len(self.text.ranks) > 1:
            raise TransferError(f"placement: the text stage on ranks {list(self.text.ranks)}: it runs on one rank "
                                "(a group of several is not run)")

    def dit_ranks(self) -> list[int]:
        return [r for g in self.dit_groups for r in g.ranks]

    def group_of(self, rank: int) -> DiTGroup | None:
        return next((g for g in self.dit_groups if rank in g.ranks), None)

    def stages_of(self, rank: int) -> list[str]:
        """The stages a rank runs, in STAGES order."""
        out = ["coordinator"] if rank == self.coordinator else []
        out += [s for s in ("text", "vae") if rank in getattr(self, s).ranks]
        if self.preprocess_rank == rank != self.coordinator:
            out.append("preprocess")
        return out + (["dit"] if self.group_of(rank) is not None else [])

    def talking_pairs(self) -> list[tuple[int, int]]:
        """The ordered ``(src, dst)`` rank pairs that exchange tensors through the transport, sorted (the same list on
        every rank): the coordinator with every other stage; the text and VAE ranks with each group's leader
        (embeddings, control and condition latents, latents to decode); a leader with the other ranks of its group
        (each chunk's inputs); counterparts of the two guidance branches (velocities). 16 ranks as coordinator, text,
        vae and six pairs + one replica: 70 of the 240 ordered pairs (8-rank one-group preset: 24 of 56). The
        sequence-parallel collectives run on their own mesh groups."""
        edges: set[tuple[int, int]] = set()

        def link(a: int, b: int) -> None:
            if a != b:
                edges.update({(a, b), (b, a)})

        for r in (*self.text.ranks, *self.vae.ranks, self.preprocess_rank, *self.dit_ranks()):
            link(self.coordinator, r)
        for r in self.vae.ranks:  # a VAE group's leader tells the others each call to make
            link(self.vae.leader, r)
        for group in self.dit_groups:
            link(self.text.leader, group.leader)
            link(self.vae.leader, group.leader)
            for r in group.ranks:
                link(group.leader, r)
                if group.cfg_degree == 2:
                    link(r, group.counterpart(r))
        return sorted(edges)

    def dit_group_for(self, request_index: int) -> DiTGroup:
        return self.dit_groups[request_index % len(self.dit_groups)]

    def describe(self) -> str:
        ranks = ", ".join(f"rank {r}: {'+'.join(self.stages_of(r)) or 'idle'}" for r in range(self.world_size))
        groups = "; ".join(g.describe() for g in self.dit_groups if len(g.ranks) > 1)
        vae = f"; VAE group {list(self.vae.ranks)}" if len(self.vae.ranks) > 1 else ""
        return ranks + (f"; DiT groups {groups}" if groups else "") + vae

    def with_vae_degree(self, degree: int) -> "Placement":
        """This placement with the VAE on the first ``degree`` ranks of the first DiT group (its leader leading), or
        unchanged for 1."""
        if degree == len(self.vae.ranks) == 1:
            return self
        group = self.dit_groups[0]
        if degree > len(group.ranks):
            raise TransferError(f"--vae_parallel_degree {degree}: the VAE group is the first DiT group's ranks, which "
                                f"has {len(group.ranks)}")
        vae = StageGroup(group.ranks[:degree])
        busy = {self.coordinator, *self.text.ranks, *vae.ranks, self.preprocess_rank, *self.dit_ranks()}
        freed = tuple(sorted(set(range(self.world_size)) - busy))  # the rank the VAE had to itself, if any
        return replace(self, vae=vae, idle=freed)


def check_vae_degree(degree: int | None, latent_rows: int | None = None, world: int | None = None,
                     what: str | None = None) -> None:
    """A VAE group's size (``--vae_parallel_degree``, or ``what`` names it) against the processes started and the
    smallest request's latent rows (each rank of the group needs one); None checks nothing."""
    if degree is None:
        return
    what = what or f"--vae_parallel_degree {degree}"
    if world is not None and not 1 <= degree <= world:
        raise TransferError(f"{what} must be between 1 and the {world} process(es) started")
    if latent_rows is not None and degree > latent_rows:
        raise TransferError(f"{what}: the smallest request has {latent_rows} latent rows (each rank of the VAE group "
                            "needs one)")


def read_placement_file(path: str | Path, keys: tuple[str, ...], where: str | None = None) -> dict:
    """A ``--placement`` file's JSON object, with none but ``keys`` (both families' parsers read it here)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise TransferError(f"cannot read placement file {path}: {e}") from None
    unknown = sorted(set(data) - set(keys)) if isinstance(data, dict) else ["?"]
    if unknown:
        raise TransferError(f"{where or f'placement file {path}'}: unknown key {unknown[0]!r} ({', '.join(keys)})")
    return data


def from_file(path: str | Path, world_size: int) -> Placement:
    """A placement from JSON: ``{"coordinator": 0, "text": 1, "vae": 2, "dit_groups": [[3]]}``, optionally
    ``"preprocess": RANK``; a DiT group is ``[r]``, ``[a, b]`` (CFG pair) or ``{"ranks": [...], "cfg": 1|2, "sp": N}``;
    ``text`` and ``vae`` a rank or a list of ranks (a stage group)."""
    data = read_placement_file(path, ("coordinator", "text", "vae", "dit_groups", "preprocess"))
    groups = tuple(DiTGroup.parse(g) for g in data.get("dit_groups", [[0]]))
    return Placement(world_size, data.get("coordinator", 0), StageGroup.parse(data.get("text", 0)),
                     StageGroup.parse(data.get("vae", 0)), groups, data.get("preprocess"))
