"""The DiT group's part of a stage process: its chunk loop hand-off and its CFG exchange.

A DiT group serves whole requests (``Placement.dit_group_for``). Its leader keeps, per request, the job (plan,
seed, scales) and the inputs that arrive from the other stages -- prompt embeddings from the text rank, control
latents and (``roundtrip``) condition latents from the VAE rank -- and denoises any request whose next chunk has
all of them (lowest request first), then hands the chunk's latents to the VAE rank for decoding. In a CFG-parallel
pair the partner computes the negative branch: the leader sends it the chunk's setup once (``cfg_setup``) and each
step's input (``cfg_step``); the partner answers with the velocity.

``DiTGroupRole`` is a mixin of ``transfer.distributed.runtime.RankLoop`` (which owns the transport, the tracer,
the per-request failure handling and the message dispatch: ``on_<kind>`` methods).
"""

from __future__ import annotations

import time

import torch

from transfer.distributed.transport import Message
from transfer.errors import check_stop
from transfer.pipeline import SeededNoise, latent_condition, latent_shape


class RemoteNegative:
    """The leader's side of a CFG-parallel pair: the partner computes the negative branch each step."""

    def __init__(self, loop, partner: int, j: int, k: int, setup: dict, tensors: dict):
        self.loop, self.partner, self.j, self.k = loop, partner, j, k
        loop.transport.send(partner, "cfg_setup", {"j": j, "k": k, **setup}, tensors)

    def submit(self, step: int, in_latents: torch.Tensor, in_timestep: torch.Tensor) -> None:
        self.loop.transport.send(self.partner, "cfg_step", {"j": self.j, "k": self.k, "i": step},
                                 {"latents": in_latents, "timestep": in_timestep})

    def result(self, step: int) -> torch.Tensor:
        msg = self.loop.wait_for(lambda m: (m.kind == "velocity" and (m.meta["j"], m.meta["k"], m.meta["i"]) == (self.j, self.k, step))
                                 or (m.kind in ("drop", "failed") and m.meta["j"] == self.j))
        if msg.kind == "failed":  # this leader is also the coordinator (a --placement file): record it here
            self.loop.fail_request(self.j, msg.meta["error"])
        if msg.kind != "velocity":  # the partner (or another stage) failed on this request: stop waiting for it
            raise RequestDropped(self.j)
        return msg.tensors["velocity"]


class RequestDropped(Exception):
    """The coordinator dropped request ``j`` (a stage failed on it) while this rank was waiting on it."""

    def __init__(self, j: int):
        super().__init__(f"request {j} dropped")
        self.j = j


class DiTGroupRole:
    """The DiT leader's and the CFG partner's message handlers (state: ``dit_jobs``, ``dit_inputs``,
    ``cfg_context``, made by ``RankLoop.__init__``)."""

    def on_job(self, msg: Message) -> None:
        self.dit_jobs[msg.meta["j"]] = {**msg.meta, "noise": SeededNoise(msg.meta["seed"]), "next": 0}

    def on_embeds(self, msg: Message) -> None:
        self.dit_inputs[("embeds", msg.meta["j"])] = msg.tensors

    def on_control_latents(self, msg: Message) -> None:
        self.dit_inputs[("controls", msg.meta["j"], msg.meta["k"])] = msg.tensors

    def on_cond(self, msg: Message) -> None:
        self.dit_inputs[("cond", msg.meta["j"], msg.meta["k"])] = msg.tensors["cond"]

    def _ready(self, j: int, k: int) -> bool:
        need = [("embeds", j), ("controls", j, k)]
        if k > 0 and self.settings.reencodes_condition:
            need.append(("cond", j, k))  # latent mode: the DiT holds the previous chunk's latents itself
        return all(key in self.dit_inputs for key in need)

    def run_ready_dit_chunks(self) -> None:
        if self.dit is None:
            return
        progressed = True
        while progressed:
            progressed = False
            for j in sorted(self.dit_jobs):
                job = self.dit_jobs[j]
                if self._ready(j, job["next"]):
                    self.for_request(j, "denoise", self.denoise_chunk, j, job)
                    progressed = True
                    break

    def denoise_chunk(self, j: int, job: dict) -> None:
        s, k = self.settings, job["next"]
        embeds = self.dit_inputs[("embeds", j)]
        controls = self.dit_inputs.pop(("controls", j, k))
        num_cond = self.job.limits.cond_latent_frames(s.num_conditional_frames) if k > 0 else 0
        if s.reuses_latents and k > 0:
            cond = latent_condition(job.pop("previous"), num_cond)
        else:
            cond = self.dit_inputs.pop(("cond", j, k), None)
        shape = latent_shape(self.job.limits, self.dit, s.num_frames_per_chunk, job["height"], job["width"])
        pixel = (job["height"], job["width"])
        group = self.placement.dit_group_for(j)
        remote = None
        if len(group) == 2 and "negative" in embeds:
            remote = RemoteNegative(self, group[1], j, k, {"num_cond": num_cond, "shape": list(shape), "pixel": list(pixel),
                                                         "scales": job["scales"]}, {"negative": embeds["negative"], **{f"control.{m}": c for m, c in controls.items()}})
        steps = []
        t_step = [time.time()]

        def on_step(i):
            check_stop()
            now = time.time()
            steps.append((i, t_step[0], now))
            t_step[0] = now

        with self.tracer.span("dit", "denoise", request=j, chunk=k):
            latents = self.dit.denoise(
                job["noise"](k, shape), cond, num_cond, controls, job["scales"], embeds["prompt"], embeds.get("negative"),
                s.num_steps, s.guidance, pixel, on_step=on_step, remote_negative=remote,
            )
        for i, start, end in steps:
            self.tracer.add("dit", f"step {i}", start, end, nested=True, request=j, chunk=k, step=i)
        last = k == len(job["chunks"]) - 1
        self.transport.send(self.placement.vae, "decode", {"j": j, "k": k, "last": last}, {"latents": latents})
        if s.reuses_latents and not last:
            job["previous"] = latents  # chunk k + 1 starts now; the VAE decodes chunk k beside it
        job["next"] += 1
        if last:
            del self.dit_jobs[j]
            del self.dit_inputs[("embeds", j)]

    # -- dit partner (negative branch of a CFG-parallel pair) --------------------------------------
    def on_cfg_setup(self, msg: Message) -> None:
        m = msg.meta
        _, cond_mask, padding_mask = self.dit.chunk_masks(m["shape"], m["num_cond"], m["pixel"])
        controls = {name.removeprefix("control."): t.to(self.dit.device, self.dit.dtype)
                    for name, t in msg.tensors.items() if name.startswith("control.")}
        self.cfg_context[(m["j"], m["k"])] = {"negative": self.dit.context(msg.tensors["negative"]), "controls": controls,
                                             "scales": m["scales"], "cond_mask": cond_mask, "padding_mask": padding_mask}

    def on_cfg_step(self, msg: Message) -> None:
        j, k, i = msg.meta["j"], msg.meta["k"], msg.meta["i"]
        ctx = self.cfg_context[(j, k)]
        with self.tracer.span("dit", f"negative step {i}", request=j, chunk=k, step=i), torch.no_grad():
            v = self.dit.velocity(msg.tensors["latents"].to(self.dit.device), msg.tensors["timestep"].to(self.dit.device),
                                  ctx["negative"], ctx["controls"], ctx["scales"], ctx["cond_mask"], ctx["padding_mask"])
        self.transport.send(msg.src, "velocity", {"j": j, "k": k, "i": i}, {"velocity": v})
        if i == self.settings.num_steps - 1:
            del self.cfg_context[(j, k)]
