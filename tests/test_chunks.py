"""The chunk schedule both execution paths follow (``transfer.chunks.ChunkSchedule``): in-process, no models."""

import numpy as np
import torch

from transfer.chunks import ChunkSchedule
from transfer.config import GenerationSettings
from transfer.prepare import ModelLimits

LIMITS = ModelLimits(temporal_factor=4, spatial_factor=8, patch_size=(1, 2, 2), max_rope_positions=64)


def schedule(mode: str, cond: int = 1, frames: int = 21, output_size=None) -> ChunkSchedule:
    settings = GenerationSettings(num_frames_per_chunk=9, num_conditional_frames=cond, chunk_conditioning=mode)
    return ChunkSchedule(settings, LIMITS, frames, 32, 48, output_size)


def test_windows_and_what_each_chunk_waits_for():
    rt = schedule("roundtrip")
    assert rt.windows == [(0, 9), (8, 17), (16, 21)] and len(rt) == 3 and rt.is_last(2) and not rt.is_last(1)
    assert [rt.num_cond(k) for k in range(3)] == [0, 1, 1]
    assert [rt.waits_for_reencode(k) for k in range(4)] == [False, True, True, False]  # none past the last chunk
    assert not any(rt.keeps_latents(k) for k in range(3)) and not rt.vae_work_batched
    latent = schedule("latent", cond=5)
    assert [latent.num_cond(k) for k in range(len(latent))] == [0, 2, 2, 2][: len(latent)]
    assert [latent.keeps_latents(k) for k in range(len(latent))] == [True] * (len(latent) - 1) + [False]
    assert not any(latent.waits_for_reencode(k) for k in range(len(latent))) and latent.vae_work_batched
    none = schedule("roundtrip", cond=0)
    assert none.windows == [(0, 9), (9, 18), (18, 21)] and none.condition(1) is None
    assert not any(none.waits_for_reencode(k) for k in range(3))


def test_condition_comes_from_the_previous_chunk():
    previous = torch.arange(2 * 16 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 16, 3, 4, 6)[:1]
    latent = schedule("latent", cond=5)
    assert latent.condition(0, previous) is None
    cond = latent.condition(1, previous)
    assert torch.equal(cond[:, :, :2], previous[:, :, -2:]) and not cond[:, :, 2:].any()
    reencoded = torch.ones(1, 16, 3, 4, 6)
    assert schedule("roundtrip").condition(1, previous, reencoded) is reencoded


def test_result_joins_chunks_drops_overlaps_and_restores_the_size():
    s = schedule("roundtrip", output_size=(16, 24))
    frames = [torch.full((9, 32, 48, 3), k, dtype=torch.uint8) for k in range(3)]
    latents = [torch.full((1, 16, 3, 4, 6), float(k)) for k in range(3)]
    result = s.result(frames, latents)
    assert result.frames.shape == (21, 16, 24, 3)  # 9 + 8 + 4 frames (the last chunk's window is 5 long)
    assert [int(f[0, 0, 0]) for f in result.frames] == [0] * 9 + [1] * 8 + [2] * 4
    assert result.latents.shape == (3, 16, 3, 4, 6) and result.latents.dtype == torch.float32
    full = schedule("roundtrip").result(frames, latents).frames
    assert full.shape == (21, 32, 48, 3) and isinstance(full, np.ndarray)
