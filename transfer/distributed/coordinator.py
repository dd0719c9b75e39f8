"""The coordinator's part of a stage process: requests in, a bounded window out to the stages, videos written.

The coordinator checks every request's inputs before any output is written, hands requests to the text stage, their
DiT group's leader and the VAE in a window (one per DiT group + ``LOOKAHEAD``), assembles each request's decoded
chunks, releases it through the guardrail gate (check + write), and stops every rank when all is written.

A request that a stage fails on is recorded here (``failures.jsonl``) and every rank is told to drop it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace

import numpy as np
import torch
from loguru import logger

from transfer.distributed.role import Role
from transfer.distributed.transport import Message
from transfer.outputs import make_gate
from transfer.pipeline import GenerationResult, chunk_scales, join_chunks, plan_chunks, resize_frames

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
        self.window, self.pending = 0, deque()

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
                if self.job.controls.needs(request):
                    self.transport.send(self.placement.preprocess_rank, "precompute", {"j": j})
        for j, request in requests:
            if remote and self.job.controls.needs(request):
                with self.tracer.span("coordinator", "wait for controls", request=j):
                    done = self.loop.wait_for(lambda m: m.kind in ("precomputed", "failed") and m.meta["j"] == j)
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
        request = self.job.requests[j]
        s = request.settings
        chunks = plan_chunks(prepared.num_frames, s.num_frames_per_chunk, s.num_conditional_frames)
        leader = self.placement.dit_group_for(j).leader
        self.results[j] = {"request": request, "num_frames": prepared.num_frames, "frames": {}, "latents": {},
                           "chunks": len(chunks), "output_size": prepared.output_size}
        self.transport.send(self.placement.text, "text", {"j": j, "leader": leader, "prompt": request.prompt,
                                                          "negative": request.negative_prompt})
        weights = {}  # spatial control weights: each control's token weights, chunk after chunk
        if prepared.weights is not None:
            per_chunk = [chunk_scales(prepared, window, self.job.limits, s) for window in chunks]
            weights = {f"weights.{m}": torch.stack([w[m] for w in per_chunk]) for m in request.controls}
        self.transport.send(leader, "job", {"j": j, "seed": request.seed, "chunks": chunks,
                                            "height": prepared.height, "width": prepared.width,
                                            "scales": request.scales()}, weights)
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
        frames = join_chunks([state["frames"][i] for i in order], state["request"].settings.num_conditional_frames,
                             state["num_frames"], dim=0).numpy()
        if state["output_size"] is not None:  # keep_input_resolution: back to the input's size
            frames = resize_frames(frames, *state["output_size"])
        result = GenerationResult(frames, torch.cat([state["latents"][i] for i in order]).float())
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

