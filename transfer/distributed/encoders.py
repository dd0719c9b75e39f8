"""The text and VAE stages' part of a stage process (and the preprocess rank's): embeddings, control latents, decode.

The text rank encodes each request's prompt (and negative prompt with guidance) and sends the embeddings to the
request's DiT group leader. The VAE rank keeps each request's controls as uint8, encodes one chunk window at a time
in idle time (ahead of the DiT), decodes finished chunks for the coordinator and, with ``roundtrip`` conditioning,
re-encodes the next chunk's conditioning frames for the leader.

``EncoderRoles`` is a mixin of ``transfer.distributed.runtime.RankLoop``.
"""

from __future__ import annotations

import torch

from transfer.distributed.transport import Message
from transfer.pipeline import encode_controls, roundtrip_condition, to_model_video, to_uint8_frames


class EncoderRoles:
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
            if self.job.requests[j].settings.cfg:
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
            frames_per_chunk = self.job.requests[j].settings.num_frames_per_chunk
            latents = encode_controls(self.vae, videos, (0, end - start), frames_per_chunk, self.dit_dtype)
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
        s = self.job.requests[j].settings
        if not last and s.reencodes_condition:
            with self.tracer.span("vae", "reencode", request=j, chunk=k + 1):
                cond = roundtrip_condition(self.vae, video, s.num_conditional_frames)
            self.transport.send(msg.src, "cond", {"j": j, "k": k + 1}, {"cond": cond})

