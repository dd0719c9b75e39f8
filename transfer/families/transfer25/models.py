"""The compute stages around unmodified diffusers models: VAE and DiT.

Each stage is a small object with tensor-in, tensor-out methods, so the chunk loop
(``transfer.families.transfer25.pipeline``) can call them in one process or a runtime can place them
on different devices and processes. The arithmetic mirrors diffusers'
``Cosmos2_5_TransferPipeline`` operation for operation, which is what makes the
single-control output equal to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from loguru import logger

from transfer.config import cfg_on
from transfer.residency import OnDevice
from transfer.families.transfer25.step_cache import StepCacheConfig, new_cache

#: Timestep given to conditioning latent frames (Transfer2.5 default).
CONDITIONAL_FRAME_TIMESTEP = 0.1


class VideoVAE(OnDevice):
    """AutoencoderKLWan with deterministic (``mode()``) normalised latents.

    Videos are ``[B, 3, T, H, W]`` in [-1, 1]; latents ``[B, 16, 1 + (T - 1) // 4, H / 8, W / 8]``.
    """

    def __init__(self, vae, device: torch.device):
        self.vae, self.device = vae, device
        cfg = vae.config
        self.mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).float()
        self.std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).float()
        self.temporal_factor = 2 ** sum(cfg.temperal_downsample)
        self.spatial_factor = 2 ** len(cfg.temperal_downsample)
        self.encode_calls = 0
        self.decode_calls = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @torch.no_grad()
    def encode(self, video: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Normalised latents of ``video`` ``[B, 3, T, H, W]``, one sample at a time, in ``dtype``."""
        self.encode_calls += 1
        self.resident()
        video = video.to(device=self.device, dtype=self.vae.dtype)
        latents = torch.cat([self.vae.encode(v[None]).latent_dist.mode() for v in video]).to(dtype)
        mean, std = self.mean.to(self.device, dtype), self.std.to(self.device, dtype)
        return (latents - mean) / std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, T, H, W]`` in [-1, 1] from normalised latents (returned on the CPU)."""
        self.decode_calls += 1
        self.resident()
        mean, std = self.mean.to(self.device, self.dtype), self.std.to(self.device, self.dtype)
        latents = latents.to(self.device) * std + mean
        return self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0].cpu()


class Denoiser(OnDevice):
    """Transformer + per-modality ControlNets + scheduler: denoises one chunk's latents."""

    def __init__(self, transformer, controlnets: Mapping[str, torch.nn.Module], scheduler, device: torch.device):
        self.transformer, self.controlnets, self.scheduler, self.device = transformer, dict(controlnets), scheduler, device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def context(self, text_embeds: torch.Tensor):
        """Encoder hidden states: text, plus a zero image context where the model has one (as diffusers)."""
        text_embeds = text_embeds.to(self.device, self.dtype)
        cfg = self.transformer.config
        if not cfg.img_context_dim_in:
            return text_embeds
        img = torch.zeros(
            text_embeds.shape[0], cfg.img_context_num_tokens, cfg.img_context_dim_in, device=self.device, dtype=self.dtype
        )
        return (text_embeds, img)

    def control_residuals(
        self,
        in_latents: torch.Tensor,
        in_timestep: torch.Tensor,
        context,
        control_latents: Mapping[str, torch.Tensor],
        control_scales: Mapping[str, "float | torch.Tensor"],
        cond_mask: torch.Tensor,
        padding_mask: torch.Tensor,
    ):
        """Every active ControlNet's weighted residuals, summed per block (None without controls). A scale is a
        float (the ControlNet multiplies by it) or a token-weight map ``[T, h, w]`` (``transfer.control_weights``):
        the ControlNet runs at scale 1 and each residual ``[B, tokens, C]`` is multiplied token by token, in float32
        as the float-scale multiply computes (so a constant map equals the float scale bit for bit). Under sequence
        parallelism ``shard_tokens`` cuts the map to this rank's tokens, the partition its residuals have."""
        blocks = None
        for modality, latents in control_latents.items():
            scale = control_scales[modality]
            weights = None
            if isinstance(scale, torch.Tensor):
                weights = self.shard_tokens(scale.reshape(1, -1, 1)).to(self.device, torch.float32)
            residuals = self.controlnets[modality](
                controls_latents=latents,
                latents=in_latents,
                timestep=in_timestep,
                encoder_hidden_states=context,
                condition_mask=cond_mask,
                conditioning_scale=1.0 if weights is not None else scale,
                padding_mask=padding_mask,
                return_dict=False,
            )[0]
            if weights is not None:
                residuals = [(r.float() * weights).to(r.dtype) for r in residuals]
            blocks = residuals if blocks is None else [a + b for a, b in zip(blocks, residuals)]
        return blocks

    #: ``--step_cache`` (``transfer.families.transfer25.step_cache``); off unless the loader sets it.
    step_cache = StepCacheConfig()

    #: Cuts a ``[1, tokens, 1]`` weight map to this rank's share of the sequence (identity without sequence
    #: parallelism; ``transfer.distributed.sequence_parallel.enable`` sets it).
    shard_tokens = staticmethod(lambda t: t)

    def velocity(
        self,
        in_latents: torch.Tensor,
        in_timestep: torch.Tensor,
        context,
        control_latents: Mapping[str, torch.Tensor],
        control_scales: Mapping[str, "float | torch.Tensor"],
        cond_mask: torch.Tensor,
        padding_mask: torch.Tensor,
    ) -> torch.Tensor:
        """One guidance branch: every active ControlNet's weighted residuals, summed, then the DiT."""
        self.resident()
        blocks = self.control_residuals(in_latents, in_timestep, context, control_latents, control_scales, cond_mask,
                                        padding_mask)
        return self.transformer(
            hidden_states=in_latents,
            timestep=in_timestep,
            encoder_hidden_states=context,
            block_controlnet_hidden_states=blocks,
            condition_mask=cond_mask,
            padding_mask=padding_mask,
            return_dict=False,
        )[0]

    def chunk_masks(self, shape, num_cond_latent_frames: int, pixel_size: Sequence[int]):
        """``cond_indicator [B,1,T,1,1]`` (float32), ``cond_mask [B,1,T,h,w]`` and ``padding_mask [1,1,H,W]`` (model dtype)."""
        B, _, T, h, w = shape
        height, width = pixel_size
        cond_indicator = torch.zeros(B, 1, T, 1, 1, device=self.device)
        cond_indicator[:, :, :num_cond_latent_frames] = 1.0
        cond_mask = (cond_indicator * torch.ones(B, 1, T, h, w, device=self.device)).to(self.dtype)
        padding_mask = torch.zeros(1, 1, height, width, device=self.device, dtype=self.dtype)
        return cond_indicator, cond_mask, padding_mask

    @torch.no_grad()
    def prepare(
        self,
        noise: torch.Tensor,
        cond_latents: torch.Tensor | None,
        num_cond_latent_frames: int,
        control_latents: Mapping[str, torch.Tensor],
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor | None,
        guidance: float,
        pixel_size: Sequence[int],
    ) -> "ChunkState":
        """The tensors a chunk's denoising loop holds, on the device (``denoise``; ``transfer.memory`` runs it on
        fake tensors)."""
        self.resident()
        dtype, device = self.dtype, self.device
        latents = noise.to(device=device, dtype=torch.float32)
        if cond_latents is None:
            cond_latents = torch.zeros_like(latents)
        cond_latents = cond_latents.to(device=device, dtype=torch.float32)
        cond_indicator, cond_mask, padding_mask = self.chunk_masks(latents.shape, num_cond_latent_frames, pixel_size)
        cond_timestep = torch.ones_like(cond_indicator) * CONDITIONAL_FRAME_TIMESTEP
        controls = {m: c.to(device=device, dtype=dtype) for m, c in control_latents.items()}
        positive = self.context(prompt_embeds)
        negative = self.context(negative_embeds) if cfg_on(guidance) else None
        gt_velocity = (latents - cond_latents) * cond_mask
        return ChunkState(latents, cond_latents, cond_indicator, cond_mask, padding_mask, cond_timestep, controls,
                          positive, negative, gt_velocity)

    @torch.no_grad()
    def predict(self, state: "ChunkState", step: int, sigma: float, control_scales: Mapping[str, "float | torch.Tensor"],
                guidance: float, split=None, cache=None) -> torch.Tensor:
        """The guided velocity of one step at noise level ``sigma`` (float32, the shape of the latents).

        ``split`` (CFG parallelism): this process computes one branch only (``split.positive``) and
        ``split.swap(step, velocity)`` returns the other branch's, computed elsewhere at the same time.
        ``cache`` (``transfer.families.transfer25.step_cache.StepCache``): a skipped step predicts both branches' velocities from the
        computed steps (no ControlNet, transformer or swap); a computed step is recorded in it."""
        s = state
        if cache is not None and cache.skip(step):
            velocities = cache.predict(step)
            return self.guide(s, velocities[0], velocities[1] if len(velocities) > 1 else None, guidance)
        sigma_t = torch.tensor(sigma).unsqueeze(0).to(device=self.device, dtype=self.dtype)
        in_latents = (s.cond_mask * s.cond_latents + (1 - s.cond_mask) * s.latents).to(self.dtype)
        in_timestep = s.cond_indicator * s.cond_timestep + (1 - s.cond_indicator) * sigma_t

        def velocity(context):
            return self.velocity(in_latents, in_timestep, context, s.controls, control_scales, s.cond_mask,
                                 s.padding_mask)

        if s.negative is None:
            velocity_pos, velocity_neg = velocity(s.positive), None
        elif split is None:
            velocity_pos, velocity_neg = velocity(s.positive), velocity(s.negative)
        elif split.positive:
            velocity_pos = velocity(s.positive)
            velocity_neg = split.swap(step, velocity_pos)
        else:
            velocity_neg = velocity(s.negative)
            velocity_pos = split.swap(step, velocity_neg)
        if cache is not None:
            cache.record(step, (velocity_pos,) if velocity_neg is None else (velocity_pos, velocity_neg))
        return self.guide(s, velocity_pos, velocity_neg, guidance)

    @staticmethod
    def guide(s: "ChunkState", velocity_pos: torch.Tensor, velocity_neg: torch.Tensor | None, guidance: float):
        """The guided prediction from the branch velocities, the conditioning frames pinned to their ground truth."""
        pred = s.gt_velocity + velocity_pos * (1 - s.cond_mask)
        if velocity_neg is None:
            return pred
        pred_neg = s.gt_velocity + velocity_neg * (1 - s.cond_mask)
        return pred + guidance * (pred - pred_neg)

    @torch.no_grad()
    def denoise(
        self,
        noise: torch.Tensor,
        cond_latents: torch.Tensor | None,
        num_cond_latent_frames: int,
        control_latents: Mapping[str, torch.Tensor],
        control_scales: Mapping[str, "float | torch.Tensor"],
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor | None,
        num_steps: int,
        guidance: float,
        pixel_size: Sequence[int],
        on_step: Callable[[int], None] | None = None,
        split=None,
    ) -> torch.Tensor:
        """Denoise one chunk. ``noise``/``cond_latents`` ``[1, 16, T, h, w]`` float32 -> latents (float32).

        The first ``num_cond_latent_frames`` latent frames are pinned to ``cond_latents``
        (velocity replaced by the ground truth, timestep 0.1), in both CFG branches.
        ``split`` (CFG parallelism, ``predict``): this process computes one guidance branch and swaps
        velocities with the process computing the other, every step. ``self.step_cache``
        (``--step_cache``): a fresh ``transfer.families.transfer25.step_cache.StepCache`` per chunk skips some steps' forwards; its
        computed and skipped steps are logged.
        """
        state = self.prepare(noise, cond_latents, num_cond_latent_frames, control_latents, prompt_embeds,
                             negative_embeds, guidance, pixel_size)
        self.scheduler.set_timesteps(num_steps, device=self.device)
        cache = new_cache(self.step_cache, num_steps)
        for i, t in enumerate(self.scheduler.timesteps):
            pred = self.predict(state, i, self.scheduler.sigmas[i].item(), control_scales, guidance, split, cache)
            state.latents = self.scheduler.step(pred, t, state.latents, return_dict=False)[0]
            if on_step is not None:
                on_step(i)
        if cache is not None:
            logger.info(f"dit: step cache {self.step_cache.describe()}: computed {len(cache.computed)} of {num_steps} "
                        f"steps, skipped {cache.skipped}")
        return state.latents


@dataclass
class ChunkState:
    """What ``DiT.denoise`` holds through a chunk's steps."""

    latents: torch.Tensor
    cond_latents: torch.Tensor
    cond_indicator: torch.Tensor
    cond_mask: torch.Tensor
    padding_mask: torch.Tensor
    cond_timestep: torch.Tensor
    controls: dict[str, torch.Tensor]
    positive: object
    negative: object
    gt_velocity: torch.Tensor
