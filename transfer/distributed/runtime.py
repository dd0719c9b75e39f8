"""Stage processes: one event loop per rank, dispatching messages to the stages that rank holds.

Flow of one request j with chunks k (``roundtrip`` conditioning)::

    coordinator --text--------> text  --embeds----------> dit leader
    coordinator --job---------------------------------> dit leader        (plan, seed, weights)
    coordinator --controls----> vae   --control_latents--> dit leader     (encoded ahead, idle time)
                                vae   <--decode (j,k)---- dit leader
    coordinator <--decoded----- vae   --cond (j,k+1)---> dit leader       (decode, re-encode)
    dit leader  --shard_chunk--> other ranks of its DiT group             (cfg x sp > 1: same loop, in lockstep)
    dit rank    <--velocity--> counterpart in the other guidance branch   (cfg 2: every step)

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
from dataclasses import replace

import numpy as np
import torch
import torch.distributed as dist

import guardrails
from loguru import logger

from transfer.distributed.dit_group import DiTGroupRole, RequestDropped
from transfer.distributed import sequence_parallel
from transfer.distributed.placement import Placement, PresetChoice, choose_preset, from_file
from transfer.distributed.trace import Tracer, stage_table, write_chrome_trace
from transfer.distributed.transport import Message, PeerFailure, Transport, direction_groups
from transfer.errors import Terminated, TransferError, check_stop, raise_on_stop_signals
from transfer.job import default_device, dtype_for, make_gate, plan_job
from transfer.loading import load_stages
from transfer.pipeline import (
    GenerationResult, encode_controls, join_chunks, plan_chunks,
    roundtrip_condition, to_model_video, to_uint8_frames,
)
from transfer.residency import describe

#: Gloo's timeout for one blocking operation. Stages legitimately wait minutes for the DiT;
#: failures are detected by broken connections and abort messages, not by this.
GROUP_TIMEOUT = datetime.timedelta(hours=6)
#: GPUs at least this large (GB) may hold the text encoder or the VAE beside a DiT shard in the presets (Transfer2.5-2B
#: with Reason1-7B: 16.6 GB of text encoder + 9.5 GB of DiT and ControlNets + activations, ``--plan``).
SHARE_STAGES_GB = 64
#: Requests handed out beyond one per DiT group: their text and control latents are made while the
#: DiT works on earlier requests; later ones wait at the coordinator, so memory does not grow with the batch.
LOOKAHEAD = 2


#: Messages that are one request's work on a stage: in a batch, an error while handling one fails that request
#: (recorded in failures.jsonl, the others go on); the coordinator's own work (decoded, released) is not in it.
REQUEST_WORK = {"precompute", "text", "controls", "decode", "job", "embeds", "control_latents", "cond", "shard_chunk"}


class RankLoop(DiTGroupRole):
    """One rank's event loop; the DiT group's part is ``DiTGroupRole`` (transfer/distributed/dit_group.py)."""

    def __init__(self, rank: int, placement: Placement, job, args, transport: Transport, tracer: Tracer,
                 branches: dict | None = None):
        self.rank, self.placement, self.job, self.args = rank, placement, job, args
        self.transport, self.tracer = transport, tracer
        self.stages = placement.stages_of(rank)
        self.deferred: deque[Message] = deque()
        self.running = True
        self.settings = job.settings
        device = default_device()
        dtype = dtype_for(device, job.dtype)
        modalities = sorted({m for r in job.requests for m in r.controls})
        held = [s for s in ("text", "vae", "dit") if s in self.stages]
        if held:
            logger.info(f"rank {rank}: {', '.join(held)} on {device} ({dtype})")
        loaded, self.residency = load_stages(job.info, held, modalities, device, dtype, job.compile, job.offload)
        self.text_encoder, self.vae, self.dit = (loaded.get(s) for s in ("text", "vae", "dit"))
        self.sequence_parallel = None
        """Re-checks this rank's DiT before each chunk when its group is sequence parallel."""
        group = placement.group_of(rank)
        if group is not None and group.sp > 1:
            models = {"transformer": self.dit.transformer, **{f"controlnet/{m}": c for m, c in self.dit.controlnets.items()}}
            sequence_parallel.enable(models, branches[group.branch_of(rank)])
            self.sequence_parallel = lambda: sequence_parallel.check_processors(models, group.sp)
        self.dit_dtype = dtype
        # guards: built on the coordinator only; an asynchronous release wakes this loop with a "released" message
        self.gate = make_gate(args, job, notify=lambda: transport.send(rank, "released")) if "coordinator" in self.stages else None
        # stage state
        self.vae_controls: dict[int, dict] = {}
        self.vae_work: deque[tuple[int, int]] = deque()
        self.dit_jobs: dict[int, dict] = {}
        self.dit_inputs: dict[tuple, object] = {}
        self.results: dict[int, dict] = {}
        self.traces: list[dict] = []
        self.dropped: set[int] = set()
        """Requests a stage failed on: their state is gone and late messages about them are ignored."""

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
        if "coordinator" in self.stages:
            self.start_requests()
        while self.running:
            check_stop()
            msg = self.next_message(0.0 if self.vae_work else 0.5)
            if msg is not None:
                j = msg.meta.get("j")
                if j in self.dropped:
                    continue
                handler = getattr(self, f"on_{msg.kind}")
                if msg.kind in REQUEST_WORK:
                    self.for_request(j, msg.kind, handler, msg)
                else:
                    handler(msg)
                self.run_ready_dit_chunks()
            elif self.vae_work:
                j, k = self.vae_work.popleft()
                self.for_request(j, "encode_controls", self.encode_controls, j, k)

    # -- a request that fails on a stage --------------------------------------------------------------
    def for_request(self, j: int, what: str, work, *args) -> None:
        """Run one request's ``work``; in a batch, an error fails request ``j`` only: this rank forgets it and the
        coordinator records it (``failures.jsonl``) and tells every rank to drop it. A single request's error
        fails the run."""
        try:
            work(*args)
        except RequestDropped:
            self.forget(j)
            if self.gate is not None:
                self.after_release()
        except PeerFailure:
            raise
        except Exception as e:
            group = self.placement.group_of(self.rank)
            if not self.job.batch or (what in ("denoise", "shard_chunk") and group.sp > 1):
                raise  # a sequence-parallel group's shards are inside collectives together: the run ends
            stage = "+".join(s for s in self.stages if s != "coordinator") or "coordinator"
            error = e if isinstance(e, TransferError) else f"rank {self.rank} ({stage}) failed on it ({what}): {type(e).__name__}: {e}"
            if not isinstance(e, TransferError):
                logger.opt(exception=e).warning(f"request {j}: {error}")
            if self.gate is not None:
                self.fail_request(j, error)
                self.after_release()
            else:
                self.forget(j)
                self.transport.send(self.placement.coordinator, "failed", {"j": j, "error": str(error)})

    def forget(self, j: int) -> None:
        """Drop every piece of state this rank holds for request ``j``."""
        self.dropped.add(j)
        self.results.pop(j, None)
        self.vae_controls.pop(j, None)
        self.vae_work = deque(w for w in self.vae_work if w[0] != j)
        self.dit_jobs.pop(j, None)
        for key in [key for key in self.dit_inputs if key[1] == j]:
            del self.dit_inputs[key]
        self.deferred = deque(m for m in self.deferred if m.meta.get("j") != j)

    def fail_request(self, j: int, error) -> None:
        """Coordinator: record request ``j`` as failed and have every rank drop it."""
        self.forget(j)
        self.job.failures.add(self.job.requests[j], error)
        for r in range(self.placement.world_size):
            if r != self.rank:
                self.transport.send(r, "drop", {"j": j})

    def on_failed(self, msg: Message) -> None:
        self.fail_request(msg.meta["j"], msg.meta["error"])
        self.after_release()

    def on_drop(self, msg: Message) -> None:
        self.forget(msg.meta["j"])

    # -- coordinator ----------------------------------------------------------------------------
    def start_requests(self) -> None:
        """Check every request's inputs before any output is written (as the single process does), handing
        the first ``window`` to the stages as soon as each is ready; the rest follow as requests finish."""
        self.window = len(self.placement.dit_groups) + LOOKAHEAD
        self.pending = deque()
        self.job.failures.write()  # bad batch lines found while planning
        todo = self.job.to_do()  # complete ones (manifest.json) are skipped
        requests = [(j, self.job.requests[j]) for j in todo]
        self.gate.start(requests)  # async: every text check starts now, in the background
        remote = self.placement.preprocess_rank != self.rank
        if remote:  # another rank computes missing controls, in request order; we read its files
            self.job.controls = replace(self.job.controls, rank=self.placement.preprocess_rank, compute=False, built={})
            for j, request in requests:
                if self.job.controls.missing(request):
                    self.transport.send(self.placement.preprocess_rank, "precompute", {"j": j})
        for j, request in requests:
            if remote and self.job.controls.missing(request):
                with self.tracer.span("coordinator", "wait for controls", request=j):
                    done = self.wait_for(lambda m: m.kind in ("precomputed", "failed") and m.meta["j"] == j)
                if done.kind == "failed":  # e.g. its input video cannot be read
                    self.fail_request(j, done.meta["error"])
                    continue
            with self.tracer.span("coordinator", "prepare", request=j):
                prepared = self.job.prepare(request)
            if prepared is None:
                continue
            self.job.manifest.hold_folder()  # from the first request ready on, this run owns the folder
            self.pending.append(j)
            self.release_requests({j: prepared})
        self.after_release()

    def in_flight(self) -> int:
        return len(self.results) + self.gate.pending

    def release_requests(self, ready: dict | None = None) -> None:
        """Hand out waiting requests while fewer than ``window`` are in flight (being generated, or waiting for
        their video check): bounds every stage's memory. A request whose prompt is known blocked is skipped."""
        while self.pending and self.in_flight() < self.window:
            j = self.pending.popleft()
            request = self.job.requests[j]
            with self.tracer.span("coordinator", "text guard", request=j):
                self.gate.admit(j, request)  # on: checked before it is handed out
            if self.gate.skip_generation(j):
                self.gate.release(j, request, None)  # its record
                continue
            prepared = (ready or {}).get(j)
            if prepared is None:
                with self.tracer.span("coordinator", "prepare", request=j):  # checked at start, dropped to keep memory flat
                    prepared = self.job.prepare(request)
                if prepared is None:
                    continue
            self.hand_out(j, prepared)

    def after_release(self) -> None:
        """A request left the window: hand out more, or stop everyone when all is written."""
        self.release_requests()
        if not self.results and not self.pending and not self.gate.pending:
            self.finish()

    def on_released(self, msg: Message) -> None:
        self.gate.check()  # a failed background write fails the run
        self.after_release()

    def hand_out(self, j: int, prepared) -> None:
        """Send request ``j`` to the text stage, its DiT group and the VAE."""
        s, request = self.settings, self.job.requests[j]
        chunks = plan_chunks(prepared.num_frames, s.num_frames_per_chunk, s.num_conditional_frames)
        leader = self.placement.dit_group_for(j).leader
        self.results[j] = {"request": request, "num_frames": prepared.num_frames, "frames": {}, "latents": {},
                           "chunks": len(chunks)}
        self.transport.send(self.placement.text, "text", {"j": j, "leader": leader, "prompt": request.prompt,
                                                          "negative": request.negative_prompt})
        self.transport.send(leader, "job", {"j": j, "seed": request.seed, "chunks": chunks,
                                            "height": prepared.height, "width": prepared.width,
                                            "scales": request.scales()})
        u8 = {m: torch.from_numpy(np.ascontiguousarray(v)) for m, v in prepared.controls.items()}
        self.transport.send(self.placement.vae, "controls", {"j": j, "leader": leader, "chunks": chunks}, u8)

    def on_decoded(self, msg: Message) -> None:
        j, k = msg.meta["j"], msg.meta["k"]
        state = self.results[j]
        state["frames"][k], state["latents"][k] = msg.tensors["frames"], msg.tensors["latents"]
        logger.info(f"{state['request'].name}: chunk {k + 1}/{state['chunks']} decoded")
        if len(state["frames"]) < state["chunks"]:
            return
        order = range(state["chunks"])
        frames = join_chunks([state["frames"][i] for i in order], self.settings.num_conditional_frames,
                             state["num_frames"], dim=0)
        result = GenerationResult(frames.numpy(), torch.cat([state["latents"][i] for i in order]).float())
        with self.tracer.span("coordinator", "release", request=j):  # on: video check + write; async: queued
            self.gate.release(j, state["request"], result)
        del self.results[j]
        self.after_release()

    def finish(self) -> None:
        if not self.running:
            return
        self.gate.close()
        others = [r for r in range(self.placement.world_size) if r != self.rank]
        for r in others:
            self.transport.send(r, "stop")
        for _ in others:
            msg = self.wait_for(lambda m: m.kind == "trace")
            self.traces.append(msg.meta)
        self.running = False

    # -- preprocess (only when placed off the coordinator) ------------------------------------------
    def on_precompute(self, msg: Message) -> None:
        j = msg.meta["j"]
        with self.tracer.span("preprocess", "controls", request=j):
            self.job.controls.precompute(self.job.requests[j])
        self.transport.send(self.placement.coordinator, "precomputed", {"j": j})

    # -- text ------------------------------------------------------------------------------------
    def on_text(self, msg: Message) -> None:
        j = msg.meta["j"]
        with self.tracer.span("text", "encode", request=j):
            tensors = {"prompt": self.text_encoder.encode(msg.meta["prompt"])}
            if self.settings.guidance > 1.0:
                tensors["negative"] = self.text_encoder.encode(msg.meta["negative"])
        self.transport.send(msg.meta["leader"], "embeds", {"j": j}, tensors)

    # -- vae -------------------------------------------------------------------------------------
    def on_controls(self, msg: Message) -> None:
        j = msg.meta["j"]  # kept as uint8; each chunk's window is converted when it is encoded
        self.vae_controls[j] = {"frames": msg.tensors, "chunks": msg.meta["chunks"], "leader": msg.meta["leader"],
                                "left": len(msg.meta["chunks"])}
        self.vae_work.extend((j, k) for k in range(len(msg.meta["chunks"])))

    def encode_controls(self, j: int, k: int) -> None:
        state = self.vae_controls[j]
        start, end = state["chunks"][k]
        with self.tracer.span("vae", "encode_controls", request=j, chunk=k):
            videos = {m: to_model_video(v[start:end].numpy()) for m, v in state["frames"].items()}
            latents = encode_controls(self.vae, videos, (0, end - start), self.settings.num_frames_per_chunk, self.dit_dtype)
        self.transport.send(state["leader"], "control_latents", {"j": j, "k": k}, latents)
        state["left"] -= 1
        if state["left"] == 0:
            del self.vae_controls[j]

    def on_decode(self, msg: Message) -> None:
        j, k, last = msg.meta["j"], msg.meta["k"], msg.meta["last"]
        with self.tracer.span("vae", "decode", request=j, chunk=k):
            video = self.vae.decode(msg.tensors["latents"])
        frames = torch.from_numpy(to_uint8_frames(video))
        self.transport.send(self.placement.coordinator, "decoded", {"j": j, "k": k},
                            {"frames": frames, "latents": msg.tensors["latents"].cpu()})
        if not last and self.settings.reencodes_condition:
            with self.tracer.span("vae", "reencode", request=j, chunk=k + 1):
                cond = roundtrip_condition(self.vae, video, self.settings.num_conditional_frames)
            self.transport.send(msg.src, "cond", {"j": j, "k": k + 1}, {"cond": cond})

    def held_parameters(self) -> dict[str, int]:
        """Parameter counts of the models this rank built (proves each rank loads only its stages)."""
        held = {}
        if self.text_encoder is not None:
            held["text_encoder"] = sum(p.numel() for p in self.text_encoder.model.parameters())
        if self.vae is not None:
            held["vae"] = sum(p.numel() for p in self.vae.vae.parameters())
        if self.dit is not None:
            held["transformer"] = sum(p.numel() for p in self.dit.transformer.parameters())
            held["controlnets"] = sum(p.numel() for c in self.dit.controlnets.values() for p in c.parameters())
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


def placement_from_args(args, world_size: int, requests: int = 1, heads: int = 16) -> PresetChoice:
    """``--placement``, else the preset for this run: request count, guidance, the DiT's heads,
    ``--context_parallel_size`` and the ranks per node (LOCAL_WORLD_SIZE)."""
    if args.placement:
        return PresetChoice(from_file(args.placement, world_size), f"--placement {args.placement}")
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if args.plan:
        share = args.gpu_memory_gb >= SHARE_STAGES_GB
    else:
        share = not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory / 1e9 >= SHARE_STAGES_GB
    return choose_preset(world_size, requests=requests, guidance=args.guidance, heads=heads,
                         sp=args.context_parallel_size, per_node=per_node, share_stages=share)


def _exit(code: int) -> None:
    """Leave without tearing down the process group: receiver threads may still block in recv."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def make_transport(rank: int, world: int, cuda: bool, placement: Placement) -> Transport:
    """Gloo world group for metadata; per-direction groups between the ranks that exchange tensors, for device
    tensors (NCCL) -- or, with ``TRANSFER_TRANSPORT=pairs`` on CPU, for every tensor over gloo (the same path,
    testable here)."""
    forced = os.environ.get("TRANSFER_TRANSPORT", "") == "pairs"
    pairs = direction_groups(placement.talking_pairs(), "nccl" if cuda else "gloo") if cuda or forced else None
    return Transport(rank, world, pairs=pairs, device=default_device(), all_via_pairs=forced and not cuda)


def run_distributed(args) -> None:
    """Entry for WORLD_SIZE > 1 (under torchrun). Never returns: exits the process with its status."""
    raise_on_stop_signals()  # torchrun sends SIGTERM when another rank died or it was itself stopped
    cuda = torch.cuda.is_available()
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            if local_rank == 0 or os.environ.get("RANK") == "0":
                print(f"transfer.py: error: {os.environ.get('LOCAL_WORLD_SIZE', '?')} processes per node but only "
                      f"{torch.cuda.device_count()} GPU(s) visible: one process per GPU", file=sys.stderr)
            _exit(2)
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
        job = plan_job(args)
        choice = placement_from_args(args, world, len(job.requests), job.info.transformer["num_attention_heads"])
        placement = choice.placement
    except TransferError as e:  # every rank validates the same inputs and fails the same way
        if rank == 0:
            print(f"transfer.py: error: {e}", file=sys.stderr)
        _exit(2)
    if rank == 0:
        logger.info(f"placement: {choice.why}")
        logger.info(f"placement: {placement.describe()}")
    transport = make_transport(rank, world, cuda, placement)
    # every rank builds every sequence-parallel branch's mesh, in the same order (process groups are numbered)
    branches = sequence_parallel.branch_meshes([b for g in placement.dit_groups if g.sp > 1 for b in g.branches()],
                                               "cuda" if cuda else "cpu")
    tracer = Tracer(rank, t0)
    loop, code = None, None
    try:
        loop = RankLoop(rank, placement, job, args, transport, tracer, branches)
        loop.run()
    except Terminated as stop:
        code = stop.exit_code
    except PeerFailure as e:  # e.g. the other ranks got SIGTERM first and are gone
        if rank == placement.coordinator:
            print(f"transfer.py: error: {e}", file=sys.stderr)
        code = 1
    except TransferError as e:
        transport.abort_all(str(e))
        print(f"transfer.py: error: {e}", file=sys.stderr)
        code = 2
    except Exception as e:  # a stage crashed: tell everyone, show the original error
        where = f"rank {rank} ({'+'.join(placement.stages_of(rank))})"
        traceback.print_exc()
        transport.abort_all(f"{where} failed: {type(e).__name__}: {e}")
        print(f"transfer.py: error: {where} failed: {type(e).__name__}: {e}", file=sys.stderr)
        code = 1
    if code is not None:
        if loop is not None and loop.gate is not None:
            loop.gate.abort()  # however the run ends: no new releases, the one being written finishes under its name
        if loop is not None:
            loop.residency.close()  # offloaded weights' temp files
        _exit(code)
    if rank == placement.coordinator:
        wall = time.time() - t0
        spans = tracer.spans + [s for t in loop.traces for s in t["spans"]]
        sent = {rank: transport.bytes_sent, **{t["rank"]: t["bytes_sent"] for t in loop.traces}}
        wire = {rank: transport.send_seconds, **{t["rank"]: t["send_seconds"] for t in loop.traces}}
        params = {rank: loop.held_parameters(), **{t["rank"]: t["params"] for t in loop.traces}}
        guards = {rank: list(guardrails.BUILT), **{t["rank"]: t["guards"] for t in loop.traces}}
        memory = {rank: loop.residency.report(), **{t["rank"]: t["memory"] for t in loop.traces}}
        if args.trace:
            write_chrome_trace(args.trace, spans, {"placement": placement.describe(), "wall_s": wall,
                                                   "bytes_sent_by_rank": {str(r): b for r, b in sorted(sent.items())},
                                                   "send_seconds_by_rank": {str(r): w for r, w in sorted(wire.items())},
                                                   "parameters_by_rank": {str(r): p for r, p in sorted(params.items())},
                                                   "guards_by_rank": {str(r): g for r, g in sorted(guards.items())},
                                                   "memory_by_rank": {str(r): m for r, m in sorted(memory.items())}})
            logger.info(f"trace written to {args.trace}")
        print(stage_table(spans, wall, sent, wire), file=sys.stderr)
        for r, report in sorted(memory.items()):
            if report["stage_bytes"]:
                print(f"rank {r}: {describe(report)}", file=sys.stderr)
        loop.residency.close()
    transport.flush(60)
    _exit(loop.job.failures.finish() if rank == placement.coordinator else 0)
