"""The text and VAE roles (and the preprocess role): embeddings, control latents, decodes.

The text rank encodes each request's prompt (and negative prompt with guidance) and sends the embeddings to the
request's DiT group leader. The VAE rank keeps each request's controls as uint8, encodes one chunk window at a time
in idle time (ahead of the DiT), decodes finished chunks for the coordinator and, with ``roundtrip`` conditioning,
re-encodes the next chunk's conditioning frames for the leader. A VAE group of several ranks splits each of those
calls by rows (``transfer.distributed.vae_split``): its leader takes the messages and, before each call, tells the
group's other ranks to make the same call (``vae_work``, with the call's inputs), so that every rank of the group
enters the call's collectives in the same order; only the leader's result leaves the group. A preprocess rank (placed
off the coordinator) computes the controls a request leaves out and tells the coordinator when they are on disk.
"""

from __future__ import annotations

from collections import deque

import torch

from transfer.distributed.role import Role
from transfer.distributed.transport import Message
from transfer.chunks import ChunkSchedule, roundtrip_condition, to_uint8_frames, window_latents


class PreprocessRole(Role):
    name = "preprocess"

    def on_precompute(self, msg: Message) -> None:
        j = msg.meta["j"]
        with self.tracer.span("preprocess", "controls", request=j):
            self.job.controls.precompute(self.job.requests[j])
        self.transport.send(self.placement.coordinator, "precomputed", {"j": j})


class TextRole(Role):
    name = "text"

    def __init__(self, loop, text_encoder):
        super().__init__(loop)
        self.text_encoder = text_encoder

    def on_text(self, msg: Message) -> None:
        j = msg.meta["j"]
        with self.tracer.span("text", "encode", request=j):
            tensors = {"prompt": self.text_encoder.encode(msg.meta["prompt"])}
            if self.job.requests[j].settings.cfg:
                tensors["negative"] = self.text_encoder.encode(msg.meta["negative"])
        self.transport.send(msg.meta["leader"], "embeds", {"j": j}, tensors)


class VAERole(Role):
    name = "vae"

    def __init__(self, loop, vae, dtype: torch.dtype):
        super().__init__(loop)
        self.vae, self.dtype = vae, dtype
        """``dtype``: the DiT's (control latents are made in it)."""
        self.controls: dict[int, dict] = {}
        """Per request: its uint8 control frames, chunk windows, leader and chunks left to encode."""
        self.work: deque[tuple[int, int]] = deque()
        """(request, chunk) control encodes to do when no message waits."""
        group = self.placement.vae
        self.followers = [r for r in group.ranks if r != self.rank] if self.rank == group.leader else []
        """On a VAE group's leader: the group's other ranks, which make each of its VAE calls too (``vae_work``)."""

    def forget(self, j: int) -> None:
        self.controls.pop(j, None)
        self.work = deque(w for w in self.work if w[0] != j)

    def on_controls(self, msg: Message) -> None:
        j, m = msg.meta["j"], msg.meta  # kept as uint8; each chunk's window is converted when it is encoded
        schedule = ChunkSchedule(self.job.requests[j].settings, self.job.limits, m["num_frames"], m["height"], m["width"])
        self.controls[j] = {"frames": msg.tensors, "schedule": schedule, "leader": m["leader"], "left": len(schedule)}
        self.work.extend((j, k) for k in range(len(schedule)))

    @property
    def has_idle_work(self) -> bool:
        return bool(self.work)

    def idle_work(self) -> bool:
        if not self.work:
            return False
        j, k = self.work.popleft()
        self.loop.for_request(j, "encode_controls", self.encode_controls, j, k)
        return True

    def _follow(self, meta: dict, tensors: dict) -> None:
        """The group's other ranks: make this call too, on your band (before this rank enters it)."""
        for r in self.followers:
            self.transport.send(r, "vae_work", meta, tensors)

    def encode_controls(self, j: int, k: int) -> None:
        state = self.controls[j]
        frames = state["schedule"].window_frames(state["frames"], k)
        self._follow({"j": j, "k": k, "op": "encode_controls", "reencode": False}, frames)
        with self.tracer.span("vae", "encode_controls", request=j, chunk=k):
            latents = self.encode_window(j, frames)
        self.transport.send(state["leader"], "control_latents", {"j": j, "k": k}, latents)
        state["left"] -= 1
        if state["left"] == 0:
            del self.controls[j]

    def encode_window(self, j: int, frames: dict) -> dict[str, torch.Tensor]:
        """Request ``j``'s control latents of one chunk window's uint8 frames (``ChunkSchedule.window_frames``)."""
        return window_latents(self.vae, frames, self.job.requests[j].settings.num_frames_per_chunk, self.dtype)

    def on_decode(self, msg: Message) -> None:
        self._follow({**msg.meta, "op": "decode"}, msg.tensors)
        self.decode(msg.meta, msg.tensors["latents"], msg.src)

    def decode(self, meta: dict, latents: torch.Tensor, leader: int | None) -> None:
        """Decode chunk k (with ``reencode``, also encode chunk k + 1's condition from it); the results go to the
        coordinator and to ``leader`` (None: a follower, whose results stay here)."""
        j, k = meta["j"], meta["k"]
        with self.tracer.span("vae", "decode", request=j, chunk=k):
            video = self.vae.decode(latents)
        if leader is not None:
            frames = torch.from_numpy(to_uint8_frames(video))
            self.transport.send(self.placement.coordinator, "decoded", {"j": j, "k": k},
                                {"frames": frames, "latents": latents.cpu()})
        if meta["reencode"]:  # the leader's schedule says chunk k + 1 waits for it
            with self.tracer.span("vae", "reencode", request=j, chunk=k + 1):
                cond = roundtrip_condition(self.vae, video, self.job.requests[j].settings.num_conditional_frames)
            if leader is not None:
                self.transport.send(leader, "cond", {"j": j, "k": k + 1}, {"cond": cond})

    def on_vae_work(self, msg: Message) -> None:
        """A follower: the leader's call, on this rank's band, with the leader's inputs (whatever this rank knows of
        the request: it runs even for a dropped one, since the leader is inside the call's collectives)."""
        m = msg.meta
        if m["op"] == "encode_controls":
            with self.tracer.span("vae", "encode_controls (band)", request=m["j"], chunk=m["k"]):
                self.encode_window(m["j"], msg.tensors)
        else:
            self.decode(m, msg.tensors["latents"], None)
