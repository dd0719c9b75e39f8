"""The DiT group's part of a stage process: its chunk loop hand-off, its shards and its CFG exchange.

A DiT group (``placement.DiTGroup``, cfg x sp ranks) serves whole requests (``Placement.dit_group_for``). Its leader
keeps, per request, its chunk plan (the schedule, ``transfer.chunks.ChunkSchedule``, seed and scales) and the inputs
that arrive from the other stages -- prompt embeddings from the text rank, control latents and (``roundtrip``)
condition latents from the VAE rank -- and denoises any request whose next chunk has all of them (lowest request
first), then hands the chunk's latents to the VAE rank for decoding.

Every other rank of the group gets the chunk's inputs from the leader (``shard_chunk``: noise, condition, embeddings,
control latents) and runs the same denoising loop in lockstep: the ranks of a branch split each DiT and ControlNet
forward along the token sequence (``transfer.distributed.sequence_parallel``: collectives inside the models) and all
hold the whole velocity afterwards; with cfg 2 each rank computes its own branch's velocity and swaps it with its
counterpart in the other branch (``BranchExchange``), so both apply the same guidance and scheduler step. Only the
leader's latents leave the group.

``DiTRole`` holds this rank's DiT (with its ControlNets) and, on the leader, each request's chunk plan and inputs;
the rank's ``RankLoop`` owns the transport, the tracer and the per-request failure rule.
"""

from __future__ import annotations

import time

import torch

from transfer.distributed.role import Role
from transfer.distributed.transport import Message
from transfer.errors import check_stop
from transfer.chunks import ChunkSchedule, SeededNoise


class BranchExchange:
    """This rank computes one guidance branch of a CFG-split group; its counterpart computes the other. ``swap``
    sends this step's velocity and returns the counterpart's."""

    def __init__(self, role: "DiTRole", counterpart: int, positive: bool, j: int, k: int):
        self.role, self.loop = role, role.loop
        self.counterpart, self.positive, self.j, self.k = counterpart, positive, j, k

    def swap(self, step: int, velocity: torch.Tensor) -> torch.Tensor:
        self.loop.transport.send(self.counterpart, "velocity", {"j": self.j, "k": self.k, "i": step},
                                 {"velocity": velocity})
        early = self.role.inputs.pop(("velocity", self.j, self.k, step), None)  # came before this chunk did
        if early is not None:
            return early.to(velocity.device)
        msg = self.loop.wait_for(lambda m: (m.kind == "velocity" and m.src == self.counterpart
                                            and (m.meta["j"], m.meta["k"], m.meta["i"]) == (self.j, self.k, step))
                                 or (m.kind in ("drop", "failed") and m.meta["j"] == self.j))
        if msg.kind == "failed":  # this rank is also the coordinator (a --placement file): record it here
            self.loop.roles["coordinator"].fail_request(self.j, msg.meta["error"])
        if msg.kind != "velocity":  # the counterpart (or another stage) failed on this request: stop waiting for it
            raise RequestDropped(self.j)
        return msg.tensors["velocity"].to(velocity.device)


class RequestDropped(Exception):
    """The coordinator dropped request ``j`` (a stage failed on it) while this rank was waiting on it."""

    def __init__(self, j: int):
        super().__init__(f"request {j} dropped")
        self.j = j


class DiTRole(Role):
    """A DiT group rank: the leader's chunk plans and inputs per request, and every rank's chunk loop."""

    name = "dit"

    def __init__(self, loop, dit, sequence_parallel=None):
        super().__init__(loop)
        self.dit = dit
        self.sequence_parallel = sequence_parallel
        """This rank's sequence-parallel DiT (``sequence_parallel.SequenceParallelDiT``) when its group has sp > 1."""
        self.plans: dict[int, dict] = {}
        """Leader: per request, its chunk schedule, noise, scales and the next chunk to denoise."""
        self.inputs: dict[tuple, object] = {}
        """Per (kind, request[, chunk[, step]]): embeddings, control and condition latents, early velocities."""

    def forget(self, j: int) -> None:
        self.plans.pop(j, None)
        for key in [key for key in self.inputs if key[1] == j]:
            del self.inputs[key]

    def on_chunk_plan(self, msg: Message) -> None:
        m = msg.meta
        schedule = ChunkSchedule(self.job.requests[m["j"]].settings, self.job.limits, m["num_frames"], m["height"],
                                 m["width"])
        self.plans[m["j"]] = {"schedule": schedule, "scales": m["scales"], "noise": SeededNoise(m["seed"]), "next": 0,
                              "weights": {k.removeprefix("weights."): t for k, t in msg.tensors.items()}}

    def on_embeds(self, msg: Message) -> None:
        self.inputs[("embeds", msg.meta["j"])] = msg.tensors

    def on_control_latents(self, msg: Message) -> None:
        self.inputs[("controls", msg.meta["j"], msg.meta["k"])] = msg.tensors

    def on_cond(self, msg: Message) -> None:
        self.inputs[("cond", msg.meta["j"], msg.meta["k"])] = msg.tensors["cond"]

    def _ready(self, j: int, plan: dict) -> bool:
        k = plan["next"]
        need = [("embeds", j), ("controls", j, k)]
        if plan["schedule"].waits_for_reencode(k):
            need.append(("cond", j, k))  # latent mode: the DiT holds the previous chunk's latents itself
        return all(key in self.inputs for key in need)

    def after_message(self) -> None:
        """Denoise every chunk whose inputs are all here (lowest request first)."""
        progressed = True
        while progressed:
            progressed = False
            for j in sorted(self.plans):
                plan = self.plans[j]
                if self._ready(j, plan):
                    self.loop.for_request(j, "denoise", self.denoise_chunk, j, plan)
                    progressed = True
                    break

    def denoise_chunk(self, j: int, plan: dict) -> None:
        schedule, k = plan["schedule"], plan["next"]
        embeds = self.inputs[("embeds", j)]
        controls = self.inputs.pop(("controls", j, k))
        cond = schedule.condition(k, plan.pop("previous", None), self.inputs.pop(("cond", j, k), None))
        chunk = {"j": j, "k": k, "num_cond": schedule.num_cond(k), "pixel": [schedule.height, schedule.width],
                 "scales": plan["scales"]}
        tensors = {"noise": plan["noise"](k, schedule.noise_shape(self.dit)), "prompt": embeds["prompt"],
                   **({"negative": embeds["negative"]} if "negative" in embeds else {}),
                   **({"cond": cond} if cond is not None else {}),
                   **{f"control.{m}": c for m, c in controls.items()},
                   **{f"weights.{m}": w[k] for m, w in plan["weights"].items()}}
        group = self.placement.dit_group_for(j)
        for r in self.working_ranks(group, "negative" in embeds):
            if r != self.rank:
                self.transport.send(r, "shard_chunk", chunk, tensors)
        latents = self.run_chunk(chunk, tensors, "denoise")
        decode = {"j": j, "k": k, "reencode": schedule.waits_for_reencode(k + 1)}
        self.transport.send(self.placement.vae.leader, "decode", decode, {"latents": latents})
        if schedule.keeps_latents(k):
            plan["previous"] = latents  # chunk k + 1 starts now; the VAE decodes chunk k beside it
        plan["next"] += 1
        if schedule.is_last(k):
            del self.plans[j]
            del self.inputs[("embeds", j)]

    @staticmethod
    def working_ranks(group, guided: bool) -> tuple[int, ...]:
        """The ranks that denoise a chunk: the whole group, or without guidance only the conditional branch."""
        return group.ranks if guided or group.cfg_degree == 1 else group.branches()[0]

    def on_velocity(self, msg: Message) -> None:
        """The counterpart's velocity for a step of a chunk this rank has not started: its ``shard_chunk`` comes from
        the leader, the velocity from the counterpart (another rank, which got its own ``shard_chunk`` first), so
        either can arrive first. Kept with the chunk's other inputs for ``BranchExchange.swap``."""
        m = msg.meta
        self.inputs[("velocity", m["j"], m["k"], m["i"])] = msg.tensors["velocity"]

    def on_shard_chunk(self, msg: Message) -> None:
        """Another rank of the leader's group: the same loop on the same inputs, in lockstep; the result stays here."""
        self.run_chunk(msg.meta, msg.tensors, "shard denoise")

    def run_chunk(self, chunk: dict, tensors: dict, name: str) -> torch.Tensor:
        """Denoise one chunk as this rank's part of its group; spans per step in the trace."""
        j, k = chunk["j"], chunk["k"]
        group = self.placement.group_of(self.rank)
        split = None
        if group.cfg_degree == 2 and "negative" in tensors:
            split = BranchExchange(self, group.counterpart(self.rank), self.rank in group.branches()[0], j, k)
        controls = {key.removeprefix("control."): t for key, t in tensors.items() if key.startswith("control.")}
        maps = {key.removeprefix("weights."): t for key, t in tensors.items() if key.startswith("weights.")}
        s = self.job.requests[j].settings
        steps = []
        t_step = [time.time()]

        def on_step(i):
            check_stop()
            now = time.time()
            steps.append((i, t_step[0], now))
            t_step[0] = now

        with self.tracer.span("dit", name, request=j, chunk=k):
            if self.sequence_parallel is not None:  # the processors still parallel-aware; the Ulysses path for the size
                self.sequence_parallel.before_chunk(tensors["noise"].shape)
            latents = self.dit.denoise(
                tensors["noise"], tensors.get("cond"), chunk["num_cond"], controls, maps or chunk["scales"],
                tensors["prompt"], tensors.get("negative"), s.num_steps, s.guidance, tuple(chunk["pixel"]),
                on_step=on_step, split=split,
            )
        for i, start, end in steps:
            self.tracer.add("dit", f"{'shard ' if name != 'denoise' else ''}step {i}", start, end, nested=True,
                            request=j, chunk=k, step=i)
        return latents
