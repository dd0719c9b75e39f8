"""Cosmos 3 transfer over stage processes (issue 33): the coordinator with the tokenizer and the VAE, and one DiT
group whose ranks deal each step's passes among ``--cfgp-size`` branches and split each pass over ``--cp-size``
ranks (``transfer.families.cosmos3.parallel``).

Every rank runs the blocks of its stage from diffusers' modular pipeline (``transfer.families.cosmos3.blocks``: the same
lists and boundaries as the single process's ``run_staged``), in lockstep, request after request::

    rank 0 (coordinator, tokenizer, VAE)      DiT group (every rank of it)
    request loop: inputs checked, admitted
    text blocks: hint frames, token ids  ---> text segments, the request's settings
    per chunk: hint + seed latents       ---> prepare, pack, the step loop (passes dealt, each over sp ranks)
               decode                    <--- latents (from the group's first rank)
    stitch, guard, write

Fields cross as ``blocks.pack_fields`` packs them (structure as JSON-able meta, tensors by path), over the
world group (gloo; CPU copies). The DiT group is ranks 1.. (``cfgp x cp = WORLD_SIZE - 1``), or every rank with rank 0
sharing its GPU (``cfgp x cp = WORLD_SIZE``).

Rank 0 outside the DiT group encodes chunk k+1's hints while the group denoises chunk k (``hint_latents``, then only
the seed waits for the decode). Not yet here (the Transfer2.5 runtime has them; docs/cosmos3.md): several requests in
flight, several DiT groups.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from loguru import logger

from transfer.families.cosmos3.pipeline import finish, load_cosmos3, per_pass, pipeline_inputs
from transfer.families.cosmos3.blocks import (DECODE_BLOCKS, DIT_BLOCKS, DIT_TO_VAE, ENCODE_BLOCKS, STITCH_BLOCKS,
                                     TEXT_BLOCKS, TEXT_TO_DIT, TEXT_TO_VAE, VAE_TO_DIT, VAE_TO_STITCH, copy_fields,
                                     execution_blocks, hint_latents, initial_state, pack_fields, run_blocks,
                                     seed_latents, unpack_fields)
from transfer.device import default_device, dtype_for
from transfer.distributed import sequence_parallel, vae_split
from transfer.families.cosmos3.parallel import check_processors, enable_ulysses, install_pass_split
from transfer.distributed.placement import check_vae_degree, read_placement_file
from transfer.errors import TransferError, check_stop
from transfer.outputs import make_gate
from transfer.request_loop import generate_requests
from transfer.video_io import freeze_heap

#: Most passes a step runs (cond, cond_no_control, uncond): more pass branches would idle.
MAX_PASSES = 3


@dataclass(frozen=True)
class Cosmos3Layout:
    world: int
    dit_ranks: tuple[int, ...]
    passes: int
    """Pass branches (``--cfgp-size``)."""
    sp: int
    """Ranks per pass (``--cp-size`` / ``--context_parallel_size``)."""
    vae_ranks: tuple[int, ...] = (0,)
    """The VAE group: rank 0 and the ranks after it (``--vae_parallel_degree``), each VAE call split by rows."""

    def branches(self) -> list[tuple[int, ...]]:
        return [self.dit_ranks[b * self.sp:(b + 1) * self.sp] for b in range(self.passes)]

    def describe(self) -> str:
        where = "ranks " + ",".join(map(str, self.dit_ranks))
        shared = " (rank 0 shares its device)" if 0 in self.dit_ranks and self.world > 1 else ""
        vae = f"; VAE group {list(self.vae_ranks)}" if len(self.vae_ranks) > 1 else ""
        return (f"rank 0: coordinator + tokenizer + VAE; DiT group on {where}{shared}: {self.passes} pass branch(es) "
                f"x sp {self.sp}{vae}")

    def with_vae(self, degree: int | None, gpu: bool, latent_rows: int | None) -> "Cosmos3Layout":
        """This layout with its VAE group: ``degree`` ranks from rank 0 (``--vae_parallel_degree``), by default every
        rank on GPUs (the calls run between denoising, 1/N each; rank 0 then no longer encodes hints ahead), one on
        CPU; at most one rank per latent row of the smallest request."""
        check_vae_degree(degree, latent_rows, self.world)
        if degree is None:
            degree = min(self.world, latent_rows or self.world) if gpu else len(self.vae_ranks)
        return replace(self, vae_ranks=tuple(range(degree)))


def cosmos3_layout(world: int, sp: int | None, passes: int | None, heads: int) -> Cosmos3Layout:
    """The ranks of a Cosmos 3 run: rank 0 holds the coordinator, the tokenizer and the VAE; the DiT group (pass
    branches x sp ranks) is ranks 1.. or every rank. Degrees left unset are chosen among the groups that fit: sp
    dividing the attention heads first (no padded heads), then the most ranks (the ranks run in lockstep: rank 0
    idles in the DiT's time unless it is in the group), then the most pass branches (a pass split is exact and costs
    one broadcast of a prediction; sp costs all-to-alls in every layer)."""
    if world == 1:
        if (sp or 1) > 1 or (passes or 1) > 1:
            raise TransferError("--cp-size / --cfgp-size above 1 need as many processes (torchrun --nproc_per_node)")
        return Cosmos3Layout(1, (0,), 1, 1)
    if sp is not None and sp < 1:
        raise TransferError(f"--cp-size must be at least 1, got {sp}")
    if passes is not None and not 1 <= passes <= MAX_PASSES:
        raise TransferError(f"--cfgp-size must be 1 to {MAX_PASSES} (a step runs at most {MAX_PASSES} passes), got "
                            f"{passes}")
    fits = [(size, b, size // b) for size in (world, world - 1) for b in range(1, MAX_PASSES + 1)
            if size % b == 0 and (passes is None or b == passes) and (sp is None or size // b == sp)]
    if not fits:
        given = " x ".join(f"{flag} {v}" for flag, v in (("--cfgp-size", passes), ("--cp-size", sp)) if v is not None)
        raise TransferError(f"{given}: with {world} processes the DiT group (pass branches x cp-size ranks, at most "
                            f"{MAX_PASSES} branches) must hold {world - 1} ranks (rank 0 apart) or {world}")
    size, passes, sp = max(fits, key=lambda f: (heads % f[2] == 0, f[0], f[1]))
    return Cosmos3Layout(world, tuple(range(world - size, world)), passes, sp)


def cosmos3_layout_file(path, world: int) -> Cosmos3Layout:
    """``--placement`` for Cosmos 3, in the Transfer2.5 file's vocabulary: ``{"coordinator": 0, "vae": 0,
    "dit_groups": [{"ranks": [1, 2, 3, 4], "cfg": 2, "sp": 2}]}``; ``cfg`` counts the pass branches (1-3, also
    ``cfgp``), ``sp`` the ranks per pass (also ``cp``). The coordinator, tokenizer (``text``) and VAE are rank 0; one DiT
    group, which may include rank 0; every rank takes part."""
    where = f"placement file {path} (Cosmos 3)"
    data = read_placement_file(path, ("coordinator", "text", "vae", "dit_groups"), where)
    for key in ("coordinator", "text"):
        if data.get(key, 0) not in (0, [0]):
            raise TransferError(f"{where}: {key} must be rank 0 (rank 0 holds the coordinator, the tokenizer and the VAE)")
    vae = data.get("vae", 0)
    vae = vae if isinstance(vae, list) else [vae]
    if not vae or vae[0] != 0 or len(set(vae)) != len(vae) or not all(isinstance(r, int) and 0 <= r < world for r in vae):
        raise TransferError(f"{where}: vae must be rank 0 or a VAE group led by rank 0 (distinct ranks below {world}), "
                            f"got {data.get('vae')}")
    groups = data.get("dit_groups", [[0]])
    if not isinstance(groups, list) or len(groups) != 1:
        raise TransferError(f"{where}: one DiT group (several are not supported for Cosmos 3 yet)")
    group = groups[0] if isinstance(groups[0], dict) else {"ranks": groups[0]}
    bad = sorted(set(group) - {"ranks", "cfg", "cfgp", "sp", "cp"})
    ranks = group.get("ranks")
    if bad or not isinstance(ranks, list) or not ranks or not all(isinstance(r, int) for r in ranks):
        raise TransferError(f'{where}: a DiT group is {{"ranks": [...], "cfg": N, "sp": M}}, got {group}')
    passes = group.get("cfg", group.get("cfgp", 1))
    sp = group.get("sp", group.get("cp", len(ranks) // passes if passes in (1, 2, 3) else 1))
    if not 1 <= passes <= MAX_PASSES or sp < 1 or passes * sp != len(ranks):
        raise TransferError(f"{where}: DiT group {ranks} must have cfg (1 to {MAX_PASSES} pass branches) x sp ranks, "
                            f"got cfg {passes}, sp {sp}")
    if len(set(ranks)) != len(ranks) or not all(0 <= r < world for r in ranks):
        raise TransferError(f"{where}: DiT ranks {ranks} must be distinct ranks below {world}")
    idle = sorted(set(range(1, world)) - set(ranks))
    if idle:
        raise TransferError(f"{where}: rank {idle[0]} has no stage (every rank but 0 is in the DiT group)")
    return Cosmos3Layout(world, tuple(ranks), passes, sp, tuple(vae))


def layout_for(parallel, world: int, heads: int, latent_rows: int | None = None, gpu: bool = False) -> Cosmos3Layout:
    """The run's layout from its ``ParallelConfig``: a ``--placement`` file, or ``--cp-size`` / ``--cfgp-size`` and
    ``--vae_parallel_degree`` (``latent_rows``: the smallest request's; ``gpu``: the default VAE group is every
    rank)."""
    if parallel.placement_file and (parallel.sp_degree or parallel.pass_degree or parallel.vae_degree):
        raise TransferError("give --placement or --cp-size / --cfgp-size / --vae_parallel_degree, not both")
    if parallel.placement_file:
        layout = cosmos3_layout_file(parallel.placement_file, world)
        check_vae_degree(len(layout.vae_ranks), latent_rows, what=f"placement: a VAE group of {len(layout.vae_ranks)} "
                         "ranks")
        return layout
    return cosmos3_layout(world, parallel.sp_degree, parallel.pass_degree, heads).with_vae(parallel.vae_degree, gpu,
                                                                                          latent_rows)


def _send(obj, src: int):
    """``obj`` from rank ``src`` to every rank (the world group, on the CPU); returns it everywhere."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=torch.device("cpu"))
    return box[0]


def _fields(state, names) -> dict:
    meta, tensors = pack_fields(state, names)
    return {"meta": meta, "tensors": {k: t.detach().cpu() for k, t in tensors.items()}}


def _take(fields: dict, state, device) -> None:
    unpack_fields(fields["meta"], {k: t.to(device) for k, t in fields["tensors"].items()}, state)


class Cosmos3Ranks:
    """One rank of a Cosmos 3 run: loads the models of its stages, then follows rank 0's requests in lockstep."""

    def __init__(self, job, layout: Cosmos3Layout, rank: int):
        self.job, self.layout, self.rank = job, layout, rank
        self.device = default_device()
        dtype = dtype_for(self.device, job.runtime.dtype)
        self.dit = rank in layout.dit_ranks
        parts = (("transformer",) if self.dit else ()) + (("vae",) if rank in layout.vae_ranks else ())
        logger.info(f"rank {rank}: {' + '.join(parts)} on {self.device} ({dtype})")
        self.pipe = load_cosmos3(job.info, self.device, dtype, parts)
        # every rank makes every group, in the same order (process groups are numbered)
        meshes = sequence_parallel.branch_meshes(layout.branches() if layout.sp > 1 else [],
                                                 "cuda" if self.device.type == "cuda" else "cpu")
        self.group = dist.new_group(list(layout.dit_ranks)) if layout.passes > 1 else None
        self.vae_service = None
        """With a VAE group: rank 0's VAE calls made on every rank of it (``vae_split.VAEService``)."""
        if len(layout.vae_ranks) > 1:
            vae_group = dist.new_group(list(layout.vae_ranks))
            if rank in layout.vae_ranks:
                split = vae_split.RowSplit(layout.vae_ranks, vae_group, rank)
                vae_split.install(self.pipe.vae, split)
                self.vae_service = vae_split.VAEService(self.pipe.vae, split)
        if self.dit and layout.sp > 1:
            enable_ulysses(self.pipe.transformer, next(b for r, b in meshes.items() if rank in r))
        freeze_heap()

    def blocks(self, hints):
        blocks = execution_blocks(self.pipe, {h: None for h in hints})
        if self.dit and self.layout.passes > 1:
            install_pass_split(blocks, self.layout.dit_ranks, self.layout.sp, self.group)
        return blocks

    # -- rank 0 ------------------------------------------------------------------------------------
    ends_run = True
    """A request failing mid-way ends the run: the other ranks are inside its chunk loop (``generate_requests``)."""

    def coordinate(self) -> None:
        """The request loop (``transfer.request_loop``, as one process runs it), each request generated by every
        rank; then the others are told to leave."""
        generate_requests(self.job, make_gate(self.job), lambda modalities: self)
        _send(None, 0)

    def generate(self, prepared):
        settings = prepared.request.settings or self.job.settings
        inputs = pipeline_inputs(prepared, settings, self.job.config.output.fps)
        blocks = self.blocks(inputs["control_videos"])
        text = run_blocks(self.pipe, blocks, TEXT_BLOCKS, initial_state(blocks, inputs))
        vae = initial_state(blocks, inputs)
        copy_fields(text, vae, TEXT_TO_VAE)
        vae.set("output_chunks", [])
        vae.set("previous_output", None)
        chunks = []
        plain = {k: v for k, v in inputs.items() if k not in ("control_videos", "generator")}
        _send({"j": prepared.request.name, "inputs": plain, "seed": prepared.request.seed, "hints": list(inputs["control_videos"]),
               "num_chunks": text.get("num_chunks"), "text": _fields(text, TEXT_TO_DIT)}, 0)
        dit = None
        if self.dit:
            dit = initial_state(blocks, inputs)
            copy_fields(text, dit, TEXT_TO_DIT)
        # outside the DiT group rank 0 encodes chunk k+1's hints while the group denoises chunk k; in it, it runs
        # diffusers' encode block as one process does
        ahead = not self.dit and inputs.get("video") is None and self.vae_service is None
        hints = hint_latents(self.pipe, vae, 0) if ahead else None
        num_chunks = text.get("num_chunks")
        with per_pass(self.pipe.transformer, prepared.request.name):
            for chunk in range(num_chunks):
                vae.set("chunk_id", chunk)
                if ahead:
                    seed_latents(self.pipe, vae)
                    vae.set("control_latents", hints)
                else:
                    with self.vae_calls():
                        vae = run_blocks(self.pipe, blocks, ENCODE_BLOCKS, vae)
                encoded = _send(_fields(vae, VAE_TO_DIT), 0)
                if ahead and chunk + 1 < num_chunks:
                    hints = hint_latents(self.pipe, vae, chunk + 1)  # the DiT group works meanwhile
                latents = self.denoise(blocks, dit, chunk, encoded)
                _take(latents, vae, self.device)
                chunks.append(vae.get("latents"))
                with self.vae_calls():
                    vae = run_blocks(self.pipe, blocks, DECODE_BLOCKS, vae)
                logger.info(f"{prepared.request.name}: chunk {chunk + 1}/{num_chunks} decoded")
        stitch = initial_state(blocks, inputs)
        copy_fields(vae, stitch, VAE_TO_STITCH)
        return finish(prepared, run_blocks(self.pipe, blocks, STITCH_BLOCKS, stitch).get("videos"), chunks)

    def vae_calls(self):
        """Rank 0: the VAE calls inside run on every rank of the VAE group (or here alone)."""
        return self.vae_service.session() if self.vae_service is not None else nullcontext()

    def serve_vae(self) -> None:
        """A VAE group rank other than 0: rank 0's calls of one encode or decode block, on this rank's band."""
        if self.vae_service is not None:
            self.vae_service.serve()

    # -- the DiT group ---------------------------------------------------------------------------------
    def dit_state(self, blocks, inputs: dict, text: dict):
        """A DiT rank's state for a request: its inputs, and the text fields rank 0 sent."""
        state = initial_state(blocks, inputs)
        _take(text, state, self.device)
        return state

    def denoise(self, blocks, state, chunk: int, encoded: dict):
        """One chunk: rank 0's encoded fields (``encoded``, sent to every rank) into the DiT blocks on the group's
        ranks; returns the latents, sent from the group's first rank to every rank."""
        latents = None
        if self.dit:
            _take(encoded, state, self.device)
            state.set("chunk_id", chunk)
            if chunk > 0:
                self.pipe.transformer._reset_stateful_cache()
            check_processors(self.pipe.transformer, self.layout.sp)
            run_blocks(self.pipe, blocks, DIT_BLOCKS, state)
            if self.rank == self.layout.dit_ranks[0]:
                latents = _fields(state, DIT_TO_VAE)
        return _send(latents, self.layout.dit_ranks[0])

    def follow(self) -> None:
        """A rank other than 0: each request rank 0 sends, until it sends None."""
        while True:
            check_stop()
            request = _send(None, 0)
            if request is None:
                return
            inputs = {**request["inputs"], "generator": torch.Generator().manual_seed(request["seed"]),
                      "control_videos": {h: None for h in request["hints"]}}
            blocks = self.blocks(request["hints"])
            state = self.dit_state(blocks, inputs, request["text"]) if self.dit else None
            with per_pass(self.pipe.transformer, f"request {request['j']}", progress=False):
                for chunk in range(request["num_chunks"]):
                    self.serve_vae()  # the chunk's encode block
                    self.denoise(blocks, state, chunk, _send(None, 0))
                    self.serve_vae()  # its decode block


def run_cosmos3(job, layout: Cosmos3Layout, rank: int) -> tuple[int, str | None]:
    """This rank's part of the run: ``(exit status, the line it printed)``. A failure on any rank ends the run (the
    others, waiting in a collective, see the broken connection or torchrun's SIGTERM)."""
    import traceback

    from transfer.errors import STOPPED_CLEANLY, Terminated, report_stop, write_line

    if rank == 0:
        logger.info(f"placement: {layout.describe()}")
    try:
        ranks = Cosmos3Ranks(job, layout, rank)
        if rank == 0:
            try:
                ranks.coordinate()
                return job.failures.finish(), None
            finally:
                job.finish_run_files()  # Transfer2.5 layout: config.yaml, console.log
                job.manifest.release_folder()
        ranks.follow()
        return 0, None
    except Terminated as stop:
        message = f"transfer.py: rank {rank} stopped by {stop}" + (f": {STOPPED_CLEANLY}" if rank == 0 else "")
        report_stop(message)
        return stop.exit_code, message
    except TransferError as e:
        message = f"transfer.py: error: {e}"
        write_line(message)
        return 2, message
    except Exception as e:
        traceback.print_exc()
        message = f"transfer.py: error: rank {rank} failed: {type(e).__name__}: {e}"
        write_line(message)
        return 1, message
