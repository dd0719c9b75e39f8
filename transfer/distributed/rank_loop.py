"""Stage processes: one event loop per rank, dispatching messages to the stages that rank holds.

Flow of one request j with chunks k (``roundtrip`` conditioning)::

    coordinator --text--------> text  --embeds----------> dit leader
    coordinator --chunk_plan--------------------------> dit leader        (plan, seed, weights)
    coordinator --controls----> vae   --control_latents--> dit leader     (encoded ahead, idle time)
                                vae   <--decode (j,k)---- dit leader
    coordinator <--decoded----- vae   --cond (j,k+1)---> dit leader       (decode, re-encode)
    dit leader  --shard_chunk--> other ranks of its DiT group             (cfg x sp > 1: same loop, in lockstep)
    dit rank    <--velocity--> counterpart in the other guidance branch   (cfg 2: every step; it may come before
                                                                           that rank's own shard_chunk: kept)

The DiT picks any request whose next chunk is ready (lowest request first), so while request
j waits for its decode and re-encode, request j+1's chunk runs: the VAE hides behind the DiT
in batches. Noise comes from each request's own generator in chunk order, so the result is
bit-identical to the single-process run whatever the interleaving.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
import traceback
from collections import deque

import torch
import torch.distributed as dist

import guardrails
from loguru import logger

from transfer.config import RunConfig
from transfer.distributed.coordinator import CoordinatorRole
from transfer.distributed.leaving import leave, refuse
from transfer.distributed.dit_group import DiTRole, RequestDropped
from transfer.distributed.encoders import PreprocessRole, TextRole, VAERole
from transfer.distributed.role import Role
from transfer.distributed import sequence_parallel, vae_split
from transfer.distributed.protocol import PROTOCOL, survives_drop
from transfer.distributed.placement import Placement
from transfer.planning.chooser import choose_placement
from transfer.distributed.trace import Tracer, stage_table, write_chrome_trace
from transfer.distributed.transport import Message, PeerFailure, TorchTransport, Transport, direction_groups
from transfer.errors import (STOPPED_CLEANLY, Terminated, TransferError, check_stop, raise_on_stop_signals,
                              report_stop, write_line)
from transfer.device import default_device, dtype_for
from transfer.job import plan_job, request_failure
from transfer.families.transfer25.loading import load_stages
from transfer.residency import describe
from transfer.video_io import freeze_heap

#: Gloo's timeout for one blocking operation. Stages legitimately wait minutes for the DiT;
#: failures are detected by broken connections and abort messages, not by this.
GROUP_TIMEOUT = datetime.timedelta(hours=6)


class RankLoop:
    """One rank's event loop: one ``Role`` object per role the placement gives this rank (``roles``), message
    dispatch to the role that receives each kind (``protocol.KINDS``), the per-request failure rule, shutdown."""

    def __init__(self, rank: int, placement: Placement, job, transport: Transport, tracer: Tracer,
                 branches: dict | None = None, vae_group=None):
        self.rank, self.placement, self.job = rank, placement, job
        self.transport, self.tracer = transport, tracer
        self.stages = placement.stages_of(rank)
        self.deferred: deque[Message] = deque()
        self.running = True
        self.dropped: set[int] = set()
        """Requests a stage failed on: their state is gone and late messages about them are ignored."""
        device = default_device()
        dtype = dtype_for(device, job.runtime.dtype)
        modalities = sorted({m for r in job.requests for m in r.controls})
        held = [s for s in ("text", "vae", "dit") if s in self.stages]
        if held:
            logger.info(f"rank {rank}: {', '.join(held)} on {device} ({dtype})")
        loaded, self.residency = load_stages(job.info, held, modalities, device, dtype, job.runtime)
        roles: list[Role] = []
        if "coordinator" in self.stages:
            roles.append(CoordinatorRole(self))
        if "preprocess" in self.stages:
            roles.append(PreprocessRole(self))
        if "text" in loaded:
            roles.append(TextRole(self, loaded["text"]))
        if "vae" in loaded:
            if vae_group is not None:  # each VAE call split by rows over the group (transfer.distributed.vae_split)
                vae_split.install(loaded["vae"].vae, vae_split.RowSplit(placement.vae.ranks, vae_group, rank))
            roles.append(VAERole(self, loaded["vae"], dtype))
        if "dit" in loaded:
            dit, parallel = loaded["dit"], None
            group = placement.group_of(rank)
            if group.sp_degree > 1:
                models = {"transformer": dit.transformer, **{f"controlnet/{m}": c for m, c in dit.controlnets.items()}}
                parallel = sequence_parallel.enable(models, branches[group.branch_of(rank)])
                dit.shard_tokens = parallel.shard_tokens  # weight maps cut like the residuals
            roles.append(DiTRole(self, dit, parallel))
        self.roles: dict[str, Role] = {role.name: role for role in roles}
        freeze_heap()  # imports and models: out of the collector's view (imageio collects on every video close)

    @property
    def gate(self):
        """The coordinator's output gate (None on other ranks)."""
        coordinator = self.roles.get("coordinator")
        return coordinator.gate if coordinator is not None else None

    # -- message plumbing ---------------------------------------------------------------------
    def next_message(self, timeout: float) -> Message | None:
        if self.deferred:
            return self.deferred.popleft()
        return self.transport.get(timeout)

    def wait_for(self, predicate) -> Message:
        """Block until a message matching ``predicate`` arrives; others wait their turn in ``deferred``."""
        for i, m in enumerate(self.deferred):
            if predicate(m):
                del self.deferred[i]
                return m
        while True:
            check_stop()
            m = self.transport.get(1.0)
            if m is None:
                continue
            if predicate(m):
                return m
            self.deferred.append(m)

    def run(self) -> None:
        if "coordinator" in self.roles:
            self.roles["coordinator"].start_requests()
        while self.running:
            check_stop()
            busy = any(role.has_idle_work for role in self.roles.values())
            msg = self.next_message(0.0 if busy else 0.5)
            if msg is not None:
                self.dispatch(msg)
            else:
                for role in self.roles.values():
                    if role.idle_work():
                        break

    def handler(self, kind: str):
        """The ``on_<kind>`` of the role on this rank that receives ``kind``, or None."""
        spec = PROTOCOL.get(kind)
        if spec is None:
            return None
        owner = self if spec.receiver == "any" else self.roles.get(spec.receiver)  # any: the loop's drop and stop
        return getattr(owner, f"on_{kind}", None)

    def dispatch(self, msg: Message) -> None:
        """Hand one message to the handler of the role receiving its kind, then let the roles do what became ready
        (the DiT's chunks)."""
        j = msg.meta.get("j")
        if j in self.dropped and not survives_drop(msg.kind):
            return
        handler = self.handler(msg.kind)
        if handler is None:  # a protocol bug: say what came from where
            raise RuntimeError(f"rank {self.rank} ({'+'.join(self.stages)}) does not handle a {msg.kind!r} message "
                               f"(from rank {msg.src}, {msg.meta}): protocol.KINDS")
        if PROTOCOL[msg.kind].request_work:
            self.for_request(j, msg.kind, handler, msg)
        else:
            handler(msg)
        for role in self.roles.values():
            role.after_message()

    # -- a request that fails on a stage --------------------------------------------------------------
    def for_request(self, j: int, what: str, work, *args) -> None:
        """Run one request's ``work``; in a batch, an error fails request ``j`` only: this rank forgets it and the
        coordinator records it (``failures.jsonl``) and tells every rank to drop it. A single request's error
        fails the run."""
        coordinator = self.roles.get("coordinator")
        try:
            work(*args)
        except RequestDropped:
            self.forget(j)
            if coordinator is not None:
                coordinator.after_release()
        except PeerFailure:
            raise
        except Exception as e:
            group = self.placement.group_of(self.rank)
            if what in ("denoise", "shard_chunk") and group.sp_degree > 1:
                raise  # a sequence-parallel group's shards are inside collectives together: the run ends
            if what in ("encode_controls", "decode", "vae_work") and len(self.placement.vae.ranks) > 1:
                raise  # so are a VAE group's bands
            stage = "+".join(s for s in self.stages if s != "coordinator") or "coordinator"
            error = request_failure(e, self.job.batch, f"rank {self.rank} ({stage}) failed on it ({what}): ")
            if not isinstance(e, TransferError):
                logger.opt(exception=e).warning(f"request {j}: {error}")
            if coordinator is not None:
                coordinator.fail_request(j, error)
                coordinator.after_release()
            else:
                self.forget(j)
                self.transport.send(self.placement.coordinator, "failed", {"j": j, "error": str(error)})

    def forget(self, j: int) -> None:
        """Drop every piece of state this rank holds for request ``j``."""
        self.dropped.add(j)
        for role in self.roles.values():
            role.forget(j)
        self.deferred = deque(m for m in self.deferred if m.meta.get("j") != j or survives_drop(m.kind))

    def on_drop(self, msg: Message) -> None:
        self.forget(msg.meta["j"])

    def held_parameters(self) -> dict[str, int]:
        """Parameter counts of the models this rank built (proves each rank loads only its stages)."""
        held = {}
        if "text" in self.roles:
            held["text_encoder"] = sum(p.numel() for p in self.roles["text"].text_encoder.model.parameters())
        if "vae" in self.roles:
            held["vae"] = sum(p.numel() for p in self.roles["vae"].vae.vae.parameters())
        if "dit" in self.roles:
            dit = self.roles["dit"].dit
            held["transformer"] = sum(p.numel() for p in dit.transformer.parameters())
            held["controlnets"] = sum(p.numel() for c in dit.controlnets.values() for p in c.parameters())
        return held

    # -- shutdown -------------------------------------------------------------------------------
    def on_stop(self, msg: Message) -> None:
        self.transport.flush(60)
        self.transport.send(msg.src, "trace", {"rank": self.rank, "spans": self.tracer.spans, "guards": list(guardrails.BUILT),
                                               "bytes_sent": self.transport.bytes_sent, "send_seconds": self.transport.send_seconds,
                                               "params": self.held_parameters(),
                                               "memory": self.residency.report()})
        self.transport.flush(60)
        self.residency.close()
        self.running = False


def make_transport(rank: int, world: int, cuda: bool, placement: Placement) -> Transport:
    """Gloo world group for metadata; per-direction groups between the ranks that exchange tensors, for device
    tensors (NCCL) -- or, with ``TRANSFER_TRANSPORT=pairs`` on CPU, for every tensor over gloo (the same path,
    testable here)."""
    forced = os.environ.get("TRANSFER_TRANSPORT", "") == "pairs"
    pairs = direction_groups(placement.talking_pairs(), "nccl" if cuda else "gloo") if cuda or forced else None
    return TorchTransport(rank, world, pairs=pairs, device=default_device(), all_via_pairs=forced and not cuda)


def run_distributed(config: RunConfig) -> None:
    """Entry for WORLD_SIZE > 1 (under torchrun). Never returns: exits the process with its status."""
    raise_on_stop_signals()  # torchrun sends SIGTERM when another rank died or it was itself stopped
    try:
        _run_distributed(config)
    except Terminated as stop:  # before the rank loop (planning, process groups, loading): no output to finish
        message = f"transfer.py: rank {os.environ.get('RANK', '?')} stopped by {stop}"
        report_stop(message)
        leave(stop.exit_code, message)  # not the interpreter's teardown of half-made process groups (2.4 s seen)


def _run_distributed(config: RunConfig) -> None:
    cuda = torch.cuda.is_available()
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            if local_rank == 0 or os.environ.get("RANK") == "0":
                print(f"transfer.py: error: {os.environ.get('LOCAL_WORLD_SIZE', '?')} processes per node but only "
                      f"{torch.cuda.device_count()} GPU(s) visible: one process per GPU", file=sys.stderr)
            leave(2)
        torch.cuda.set_device(local_rank)
    # gloo carries metadata and CPU tensors (any-source receive); NCCL carries CUDA tensors
    # (the backend string names "cpu" so that diffusers' size exchanges of uneven shards go over gloo)
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "cpu:gloo", timeout=GROUP_TIMEOUT)
    rank, world = dist.get_rank(), dist.get_world_size()
    # one time origin for every rank's spans, so the trace lines up across processes
    origin = torch.tensor([time.time()], dtype=torch.float64)
    dist.broadcast(origin, src=0)
    t0 = float(origin)
    if rank != 0:
        logger.remove()
        logger.add(sys.stderr, level="WARNING", format=f"rank {rank} | {{level}} | {{message}}")
    try:
        job = plan_job(config)
        program = job.family.rank_program(job, config, world, rank, cuda)
    except TransferError as e:  # every rank validates the same inputs and fails the same way
        refuse(rank, world, f"transfer.py: error: {e}")
    if program is not None:  # the family's own rank program
        leave(*program())
    try:
        choice = choose_placement(config, world, len(job.requests), job.info.transformer["num_attention_heads"],
                                  job.latent_rows, max(len(r.controls) for r in job.requests))
        placement = choice.placement
        if job.runtime.compile != "none" and any(g.sp_degree > 1 for g in placement.dit_groups):
            raise TransferError(f"--compile {job.runtime.compile} is not supported in sequence-parallel DiT groups (untested "
                                "with diffusers' context-parallel hooks): use --compile none, or --placement / "
                                "--context_parallel_size 1 for groups without sequence parallelism")
        if job.runtime.compile == "tensorrt" and len(placement.vae.ranks) > 1:
            raise TransferError(f"--compile tensorrt builds engines of the whole VAE encoder and decoder, which a VAE "
                                f"group of {len(placement.vae.ranks)} ranks splits by rows: use --vae_parallel_degree 1 "
                                "(or --compile torch, which leaves the VAE eager)")
    except TransferError as e:  # every rank validates the same inputs and fails the same way
        refuse(rank, world, f"transfer.py: error: {e}")
    if rank == 0:
        logger.info(f"placement: {choice.why}")
        logger.info(f"placement: {placement.describe()}")
    transport = make_transport(rank, world, cuda, placement)
    # every rank builds every sequence-parallel branch's mesh, in the same order (process groups are numbered)
    branches = sequence_parallel.branch_meshes([b for g in placement.dit_groups if g.sp_degree > 1 for b in g.branches()],
                                               "cuda" if cuda else "cpu")
    vae_ranks = placement.vae.ranks  # its process group, made on every rank (after the meshes, same order everywhere)
    vae_group = dist.new_group(list(vae_ranks)) if len(vae_ranks) > 1 else None
    tracer = Tracer(rank, t0)
    loop, code, message = None, None, None
    try:
        loop = RankLoop(rank, placement, job, transport, tracer, branches, vae_group)
        loop.run()
    except Terminated as stop:
        code = stop.exit_code
        message = f"transfer.py: rank {rank} stopped by {stop}" + (f": {STOPPED_CLEANLY}" if rank == 0 else "")
        report_stop(message)
    except PeerFailure as e:  # e.g. the other ranks got SIGTERM first and are gone
        message = f"transfer.py: error: {e}"
        if rank == placement.coordinator:
            print(message, file=sys.stderr)
        code = 1
    except TransferError as e:
        transport.abort_all(str(e))
        message = f"transfer.py: error: {e}"
        write_line(message)
        code = 2
    except Exception as e:  # a stage crashed: tell everyone, show the original error
        where = f"rank {rank} ({'+'.join(placement.stages_of(rank))})"
        traceback.print_exc()
        transport.abort_all(f"{where} failed: {type(e).__name__}: {e}")
        message = f"transfer.py: error: {where} failed: {type(e).__name__}: {e}"
        write_line(message)
        code = 1
    if code is not None:
        if loop is not None and loop.gate is not None:
            loop.gate.abort()  # however the run ends: no new releases, the one being written finishes under its name
        if loop is not None:
            loop.residency.close()  # offloaded weights' temp files
        leave(code, message)
    if rank == placement.coordinator:
        wall = time.time() - t0
        traces = loop.roles["coordinator"].traces
        spans = tracer.spans + [s for t in traces for s in t["spans"]]
        sent = {rank: transport.bytes_sent, **{t["rank"]: t["bytes_sent"] for t in traces}}
        wire = {rank: transport.send_seconds, **{t["rank"]: t["send_seconds"] for t in traces}}
        params = {rank: loop.held_parameters(), **{t["rank"]: t["params"] for t in traces}}
        guards = {rank: list(guardrails.BUILT), **{t["rank"]: t["guards"] for t in traces}}
        memory = {rank: loop.residency.report(), **{t["rank"]: t["memory"] for t in traces}}
        if config.runtime.trace:
            write_chrome_trace(config.runtime.trace, spans, {"placement": placement.describe(), "wall_s": wall,
                                                   "bytes_sent_by_rank": {str(r): b for r, b in sorted(sent.items())},
                                                   "send_seconds_by_rank": {str(r): w for r, w in sorted(wire.items())},
                                                   "parameters_by_rank": {str(r): p for r, p in sorted(params.items())},
                                                   "guards_by_rank": {str(r): g for r, g in sorted(guards.items())},
                                                   "memory_by_rank": {str(r): m for r, m in sorted(memory.items())}})
            logger.info(f"trace written to {config.runtime.trace}")
        print(stage_table(spans, wall, sent, wire), file=sys.stderr)
        for r, report in sorted(memory.items()):
            if report["stage_bytes"]:
                print(f"rank {r}: {describe(report)}", file=sys.stderr)
        loop.residency.close()
    transport.flush(60)
    if rank == placement.coordinator:
        status = loop.job.failures.finish()
        loop.job.finish_run_files()  # Transfer2.5 layout: config.yaml, console.log
        leave(status)
    leave(0)
