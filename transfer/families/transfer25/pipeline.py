"""The single process's chunk loop: a prepared request through the three stages in one process, chunk after chunk
as the chunk schedule (``transfer.chunks.ChunkSchedule``) says; the stage processes follow the same schedule across
ranks (``transfer.distributed``)."""

from __future__ import annotations

import torch
from tqdm import tqdm

from transfer.chunks import (ChunkSchedule, GenerationResult, NoiseSource, SeededNoise, roundtrip_condition,
                             to_uint8_frames)
from transfer.config import GenerationSettings
from transfer.errors import check_stop
from transfer.prepare import ModelLimits, PreparedRequest


class TransferPipeline:
    """Single-process generation over the three stages (text encoder, VAE, DiT)."""

    def __init__(self, text_encoder, vae, dit, limits: ModelLimits, settings: GenerationSettings):
        limits.check_settings(settings)
        self.text_encoder, self.vae, self.dit, self.limits, self.settings = text_encoder, vae, dit, limits, settings

    def generate(self, prepared: PreparedRequest, noise: NoiseSource | None = None, progress: bool = True) -> GenerationResult:
        req = prepared.request
        s = req.settings or self.settings
        schedule = ChunkSchedule.of(prepared, self.limits, s)
        noise = noise or SeededNoise(req.seed)
        shape = schedule.noise_shape(self.dit)
        prompt_embeds = self.text_encoder.encode(req.prompt)
        negative_embeds = self.text_encoder.encode(req.negative_prompt) if s.cfg else None
        chunks = range(len(schedule))

        def control_latents(k):
            return schedule.control_latents(self.vae, prepared.controls, k, self.dit.dtype)

        batched = schedule.vae_work_batched  # every VAE encode before the chunk loop, every decode after it
        encoded = [control_latents(k) for k in chunks] if batched else None
        decoded: list[torch.Tensor] = []  # float [1, 3, F, H, W] per chunk (roundtrip: the next condition's source)
        latents_out: list[torch.Tensor] = []
        # a with block: a stop or an error clears the bar before its message is printed (not glued onto the bar)
        with tqdm(total=len(schedule) * s.num_steps, desc=req.name, unit="step", disable=not progress,
                  leave=False) as bar:
            for k in chunks:
                reencoded = None
                if schedule.waits_for_reencode(k):  # the same function the VAE rank calls after a decode
                    reencoded = roundtrip_condition(self.vae, decoded[-1], s.num_conditional_frames)
                cond = schedule.condition(k, latents_out[-1] if latents_out else None, reencoded)
                latents = self.dit.denoise(
                    noise(k, shape), cond, schedule.num_cond(k), encoded[k] if batched else control_latents(k),
                    schedule.scales(req.scales(), k), prompt_embeds, negative_embeds, s.num_steps, s.guidance,
                    (schedule.height, schedule.width), on_step=lambda _: (bar.update(), check_stop()),
                )
                if not batched:
                    decoded.append(self.vae.decode(latents))
                latents_out.append(latents.cpu())
        if batched:
            decoded = [self.vae.decode(latents) for latents in latents_out]
        return schedule.result([torch.from_numpy(to_uint8_frames(video)) for video in decoded], latents_out)
