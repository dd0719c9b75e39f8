"""The coordinator's part of a stage process: requests in, a bounded window out to the stages, videos written.

The coordinator checks every request's inputs before any output is written, hands requests to the text stage, their
DiT group's leader and the VAE in a window (one per DiT group + ``LOOKAHEAD``), assembles each request's decoded
chunks, releases it through the guardrail gate (check + write), and stops every rank when all is written.

A request that a stage fails on is recorded here (``failures.jsonl``) and every rank is told to drop it.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from loguru import logger

from transfer.distributed.role import Role
from transfer.distributed.transport import Message
from transfer.outputs import make_gate
from transfer.request_loop import RequestLoop
from transfer.chunks import ChunkSchedule

#: Requests handed out beyond one per DiT group: their text and control latents are made while the DiT works on
#: earlier requests; later ones wait at the coordinator, so memory does not grow with the batch.
LOOKAHEAD = 2


class CoordinatorRole(Role):
    name = "coordinator"

    def __init__(self, loop):
        super().__init__(loop)
        # guards: built here only; an asynchronous release wakes the loop with a "released" message
        self.gate = make_gate(loop.job, notify=lambda: loop.transport.send(loop.rank, "released"))
        self.results: dict[int, dict] = {}
        """Per request in flight: its decoded chunks so far."""
        self.traces: list[dict] = []
        """Every other rank's report at the end (``trace`` messages)."""
        self.window = 0
        self.requests: RequestLoop | None = None
        """The request loop (``start_requests``)."""

    def forget(self, j: int) -> None:
        self.results.pop(j, None)

    def fail_request(self, j: int, error) -> None:
        """Record request ``j`` as failed and have every rank drop it."""
        self.loop.forget(j)
        self.job.failures.add(self.job.requests[j], error)
        for r in range(self.placement.world_size):
            if r != self.rank:
                self.transport.send(r, "drop", {"j": j})

    def on_failed(self, msg: Message) -> None:
        self.fail_request(msg.meta["j"], msg.meta["error"])
        self.after_release()

    def start_requests(self) -> None:
        """Check every request's inputs before any output is written (``transfer.request_loop``, as the single
        process does), handing the first ``window`` to the stages as soon as each is ready; the rest follow as
        requests finish."""
        self.window = len(self.placement.dit_groups) + LOOKAHEAD
        self.job.failures.write()  # bad batch lines found while planning
        self.requests = RequestLoop(self.job, self.gate,
                                    span=lambda name, **ids: self.tracer.span("coordinator", name, **ids))
        remote = self.placement.preprocess_rank != self.rank
        wait = None
        if remote:  # another rank computes missing controls, in request order; we read its files
            self.job.controls = replace(self.job.controls, rank=self.placement.preprocess_rank, compute=False, built={})
            for j, request in self.requests.todo:
                if self.job.controls.needs(request):
                    self.transport.send(self.placement.preprocess_rank, "precompute", {"j": j})
            wait = self.wait_for_controls
        for _ in self.requests.check(wait):
            self.release_requests()
            self.requests.drop_kept()  # not handed out now: checked again when its turn comes (memory stays flat)
        self.after_release()

    def wait_for_controls(self, j: int, request) -> bool:
        """Whether request ``j`` can still run once the preprocess rank has computed its controls."""
        if not self.job.controls.needs(request):
            return True
        with self.tracer.span("coordinator", "wait for controls", request=j):
            done = self.loop.wait_for(lambda m: m.kind in ("precomputed", "failed") and m.meta["j"] == j)
        if done.kind == "failed":  # e.g. its input video cannot be read
            self.fail_request(j, done.meta["error"])
            return False
        return True

    def in_flight(self) -> int:
        return len(self.results) + self.gate.pending

    def release_requests(self) -> None:
        """Hand out waiting requests while fewer than ``window`` are in flight (being generated, or waiting for
        their video check): bounds every stage's memory."""
        while self.requests is not None and self.in_flight() < self.window:
            turn = self.requests.next()
            if turn is None:
                return
            self.hand_out(*turn)

    def after_release(self) -> None:
        """A request left the window: hand out more, or stop everyone when all is written."""
        self.release_requests()
        if self.requests is not None and not self.results and not self.requests.waiting and not self.gate.pending:
            self.finish()

    def on_released(self, msg: Message) -> None:
        self.gate.check()  # a failed background write fails the run
        self.after_release()

    def hand_out(self, j: int, prepared) -> None:
        """Send request ``j`` to the text stage, its DiT group and the VAE."""
        request = self.job.requests[j]
        schedule = ChunkSchedule.of(prepared, self.job.limits)
        leader = self.placement.dit_group_for(j).leader
        self.results[j] = {"request": request, "schedule": schedule, "frames": {}, "latents": {}}
        self.transport.send(self.placement.text.leader, "text", {"j": j, "leader": leader, "prompt": request.prompt,
                                                          "negative": request.negative_prompt})
        weights = {}  # spatial control weights: each control's token weights, chunk after chunk
        if prepared.weights is not None:
            per_chunk = [schedule.scales(request.scales(), k) for k in range(len(schedule))]
            weights = {f"weights.{m}": torch.stack([w[m] for w in per_chunk]) for m in request.controls}
        self.transport.send(leader, "chunk_plan", {"j": j, "seed": request.seed, **schedule.size,
                                                   "scales": request.scales()}, weights)
        u8 = {m: torch.from_numpy(np.ascontiguousarray(v)) for m, v in prepared.controls.items()}
        self.transport.send(self.placement.vae.leader, "controls", {"j": j, "leader": leader, **schedule.size}, u8)

    def on_decoded(self, msg: Message) -> None:
        j, k = msg.meta["j"], msg.meta["k"]
        state = self.results[j]
        state["frames"][k], state["latents"][k] = msg.tensors["frames"], msg.tensors["latents"]
        schedule = state["schedule"]
        logger.info(f"{state['request'].name}: chunk {k + 1}/{len(schedule)} decoded")
        if len(state["frames"]) < len(schedule):
            return
        order = range(len(schedule))
        result = schedule.result([state["frames"][i] for i in order], [state["latents"][i] for i in order])
        with self.tracer.span("coordinator", "release", request=j):  # on: video check + write; async: queued
            self.gate.release(j, state["request"], result)
        del self.results[j]
        self.after_release()

    def finish(self) -> None:
        if not self.loop.running:
            return
        self.gate.close()
        others = [r for r in range(self.placement.world_size) if r != self.rank]
        for r in others:
            self.transport.send(r, "stop")
        for _ in others:
            msg = self.loop.wait_for(lambda m: m.kind == "trace")
            self.traces.append(msg.meta)
        self.loop.running = False

