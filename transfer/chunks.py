"""The chunk schedule: how one request's video becomes chunks and the chunks a video again, in one place that the
single process (``transfer.families.transfer25.pipeline.TransferPipeline``) and the stage processes (``transfer.distributed``'s roles)
both follow.

    controls --VAE encode--> control latents --+
    prompt --text encoder--> embeddings -------+--> DiT + ControlNets (CFG) --> latents --VAE decode--> frames
    previous chunk's last frames --VAE (roundtrip)--> conditioning latents --+
    previous chunk's last latents (latent) ---------> conditioning latents --+

Chunk windows are computed before the loop; the input is padded by repeating its last frame and the output trimmed
back. Chunk k > 0 is conditioned on the last ``num_conditional_frames`` frames of chunk k - 1: decoded and re-encoded
by the VAE (``roundtrip``, the upstream behaviour: chunk k waits for chunk k - 1's decode), or as chunk k - 1's own
final latents (``latent``, no VAE between chunks; docs/long_video.md says which latents are valid). Control latents
depend on nothing but the controls, so they may be made ahead of the DiT; the decoded chunks are joined dropping each
later chunk's overlap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from transfer import control_weights
from transfer.config import GenerationSettings
from transfer.prepare import ModelLimits, PreparedRequest, resize_frames


def plan_chunks(num_frames: int, frames_per_chunk: int, num_conditional_frames: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` pixel-frame windows; consecutive windows overlap by ``num_conditional_frames``."""
    stride = frames_per_chunk - num_conditional_frames
    starts = range(0, max(num_frames - num_conditional_frames, 1), stride)
    return [(s, min(s + frames_per_chunk, num_frames)) for s in starts]


def pad_frames(video: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Pad ``[B, C, T, H, W]`` to ``num_frames`` by repeating the last frame (or trim)."""
    missing = num_frames - video.shape[2]
    if missing > 0:
        return torch.cat([video, video[:, :, -1:].repeat(1, 1, missing, 1, 1)], dim=2)
    return video[:, :, :num_frames]


def to_model_video(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` -> float ``[1, 3, T, H, W]`` in [-1, 1] (as diffusers' VideoProcessor)."""
    return (torch.from_numpy(np.ascontiguousarray(frames)).float() / 255.0 * 2.0 - 1.0).permute(3, 0, 1, 2)[None]


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """float ``[1, 3, T, H, W]`` in [-1, 1] -> uint8 ``[T, H, W, 3]`` (truncating, as both upstreams do)."""
    return ((video[0] / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 3, 0).contiguous().numpy()


class NoiseSource(Protocol):
    def __call__(self, chunk_index: int, shape: tuple[int, ...]) -> torch.Tensor: ...


class SeededNoise:
    """Each request's own CPU generator: chunk noise depends only on the seed, never on placement or batch."""

    def __init__(self, seed: int):
        self.generator = torch.Generator("cpu").manual_seed(seed)

    def __call__(self, chunk_index: int, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, dtype=torch.float32)


@dataclass
class GenerationResult:
    frames: np.ndarray  # [N, H, W, 3] uint8
    latents: torch.Tensor | None  # [num_chunks, 16, T_latent, h, w] final latents of every chunk (float32);
    # None once a video guard altered the frames


def latent_shape(limits: ModelLimits, dit, frames_per_chunk: int, height: int, width: int) -> tuple[int, ...]:
    """Noise / latent shape of one chunk: ``[1, C_latent, T_latent, h, w]``."""
    f = limits.spatial_factor
    return (1, dit.transformer.config.in_channels - 1, limits.latent_frames(frames_per_chunk), height // f, width // f)


def encode_controls(vae, controls: dict[str, torch.Tensor], window: tuple[int, int], frames_per_chunk: int, dtype):
    """Control latents of one chunk window, per modality (the last chunk padded by repeating its last frame)."""
    start, end = window
    return {m: vae.encode(pad_frames(video[:, :, start:end], frames_per_chunk), dtype) for m, video in controls.items()}


def window_latents(vae, frames: dict, frames_per_chunk: int, dtype) -> dict[str, torch.Tensor]:
    """The control latents of one chunk window's uint8 frames ``[n, H, W, 3]`` per modality (numpy or torch)."""
    videos = {m: to_model_video(np.asarray(f)) for m, f in frames.items()}
    n = next(iter(videos.values())).shape[2] if videos else 0
    return encode_controls(vae, videos, (0, n), frames_per_chunk, dtype)


def roundtrip_condition(vae, previous: torch.Tensor, num_conditional_frames: int) -> torch.Tensor:
    """Condition latents from the previous decoded chunk ``[1, 3, F, H, W]``: its last frames first, -1 after."""
    video = previous.clone()
    video[:, :, :num_conditional_frames] = video[:, :, -num_conditional_frames:]
    video[:, :, num_conditional_frames:] = -1  # -1 is black in model space
    return vae.encode(video, torch.float32)


def latent_condition(previous: torch.Tensor, num_cond_latent_frames: int) -> torch.Tensor:
    """Condition latents from the previous chunk's final latents ``[1, 16, T, h, w]``: its last
    ``num_cond_latent_frames`` frames first (the only ones the DiT reads), zeros after."""
    cond = torch.zeros_like(previous, dtype=torch.float32)
    cond[:, :, :num_cond_latent_frames] = previous[:, :, -num_cond_latent_frames:]
    return cond


def join_chunks(chunks: list[torch.Tensor], num_conditional_frames: int, num_frames: int, dim: int) -> torch.Tensor:
    """Join per-chunk frames along ``dim``, dropping each later chunk's overlap, trimmed to ``num_frames``."""
    C = num_conditional_frames
    joined = torch.cat([c if k == 0 else c.narrow(dim, C, c.shape[dim] - C) for k, c in enumerate(chunks)], dim=dim)
    return joined.narrow(dim, 0, num_frames)


class ChunkSchedule:
    """One request's chunks: their windows, what each is conditioned on, its control latents and scales, and the
    assembly of the decoded chunks into the result."""

    def __init__(self, settings: GenerationSettings, limits: ModelLimits, num_frames: int, height: int, width: int,
                 output_size: tuple[int, int] | None = None, weights: dict | None = None):
        self.settings, self.limits = settings, limits
        self.num_frames, self.height, self.width, self.output_size = num_frames, height, width, output_size
        self.weights = weights
        """Spatial control weights (``PreparedRequest.weights``) where the request has them."""
        self.windows = plan_chunks(num_frames, settings.num_frames_per_chunk, settings.num_conditional_frames)

    @classmethod
    def of(cls, prepared: PreparedRequest, limits: ModelLimits, settings: GenerationSettings | None = None):
        return cls(settings or prepared.request.settings, limits, prepared.num_frames, prepared.height,
                   prepared.width, prepared.output_size, prepared.weights)

    @property
    def size(self) -> dict:
        """What another process needs to rebuild this schedule (with the request's settings): message fields."""
        return {"num_frames": self.num_frames, "height": self.height, "width": self.width}

    def __len__(self) -> int:
        return len(self.windows)

    def is_last(self, k: int) -> bool:
        return k == len(self.windows) - 1

    @property
    def vae_work_batched(self) -> bool:
        """``latent`` mode: no VAE work between chunks, so one process makes every control latent before the DiT's
        loop and every decode after it (one move each way when stages are offloaded)."""
        return self.settings.chunk_conditioning == "latent"

    def num_cond(self, k: int) -> int:
        """Latent frames of chunk ``k`` pinned to its condition."""
        return self.limits.cond_latent_frames(self.settings.num_conditional_frames) if k > 0 else 0

    def waits_for_reencode(self, k: int) -> bool:
        """Whether chunk ``k`` needs chunk ``k - 1`` decoded and re-encoded first (``roundtrip`` with overlap)."""
        return 0 < k < len(self.windows) and self.settings.reencodes_condition

    def keeps_latents(self, k: int) -> bool:
        """Whether chunk ``k``'s latents condition chunk ``k + 1`` (``latent`` with overlap)."""
        return self.settings.reuses_latents and not self.is_last(k)

    def condition(self, k: int, previous_latents: torch.Tensor | None = None,
                  reencoded: torch.Tensor | None = None) -> torch.Tensor | None:
        """Chunk ``k``'s condition latents: none for the first chunk or without overlap; else chunk ``k - 1``'s own
        latents (``latent``) or its re-encoded frames (``roundtrip``)."""
        if not self.num_cond(k):
            return None
        if self.settings.reuses_latents:
            return latent_condition(previous_latents, self.num_cond(k))
        return reencoded

    def noise_shape(self, dit) -> tuple[int, ...]:
        return latent_shape(self.limits, dit, self.settings.num_frames_per_chunk, self.height, self.width)

    def control_latents(self, vae, controls: dict, k: int, dtype) -> dict[str, torch.Tensor]:
        """Chunk ``k``'s control latents from the uint8 control frames ``[N, H, W, 3]`` (numpy or torch), per
        modality: only its window is converted."""
        return window_latents(vae, self.window_frames(controls, k), self.settings.num_frames_per_chunk, dtype)

    def window_frames(self, controls: dict, k: int) -> dict:
        """Chunk ``k``'s window of each control's uint8 frames."""
        start, end = self.windows[k]
        return {m: frames[start:end] for m, frames in controls.items()}

    def scales(self, scalar: dict, k: int) -> dict:
        """The control scales the DiT gets for chunk ``k``: the request's scalar weights, or its token-weight maps."""
        if self.weights is None:
            return scalar
        F = self.settings.num_frames_per_chunk
        return control_weights.chunk_weights(self.weights, self.windows[k], F, self.limits.latent_frames(F))

    def result(self, frames: list[torch.Tensor], latents: list[torch.Tensor]) -> "GenerationResult":
        """The video from every chunk's decoded uint8 frames ``[F, H, W, 3]`` (overlaps dropped, trimmed to the
        input's length, back at the input's size for ``keep_input_resolution``) and every chunk's final latents."""
        video = join_chunks(frames, self.settings.num_conditional_frames, self.num_frames, dim=0).numpy()
        if self.output_size is not None:
            video = resize_frames(video, *self.output_size)
        return GenerationResult(video, torch.cat([t.cpu() for t in latents]).float())
