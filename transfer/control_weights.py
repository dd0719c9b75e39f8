"""Spatial and temporal control weights: where in the video each control acts, and how strongly.

A control's weight is a scalar, or a map over the video:

* cosmos-transfer1: ``control_weight`` is a ``.pt`` tensor ``[T, H, W]`` or ``[H, W]`` (negative values clamp to 0);
* cosmos-transfer2.5: ``mask_path`` (a mask video: white = the control acts, binarised at 128) or ``mask_prompt``
  (the mask is what the seg preprocessor finds for that text), times ``control_weight``.

As in cosmos-transfer2.5 (``ControlConditionPostprocessor.update_condition_with_control_input_latent`` and
``resize_control_weight``, ``cosmos_transfer2/_src/transfer2/models/vid2vid_model_control_vace.py``): when any control of
a request has a map, every control's weight becomes a map (a scalar weight is a constant one); each map is resized to
the DiT's token grid of the chunk (latent frames x height / 16 x width / 16 for the Wan VAE and patch 2) -- the first
pixel frame to the first latent frame and the other ``4k`` frames to the other ``k`` latent frames, trilinear,
``align_corners=False`` -- and at every token the weights are divided by ``max(sum over controls, 1)`` (upstream caps the
sum at 1 the same way; cosmos-transfer1 divides at pixel resolution before resizing). The map multiplies that
control's ControlNet residuals token by token (``stages.Denoiser.control_residuals``).

A constant map gives the scalar path's weights bit for bit: the resize of a constant is exact (every interpolation
weight is 0.5 or 1 for the integer factors involved) and the division is the same float64 arithmetic as
``Request.scales``. Maps are float64 until the final float32 weights.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from transfer.errors import TransferError

#: A mask video's pixel counts as "inside" at this gray level and above.
MASK_THRESHOLD = 128


def token_grid(limits, height: int, width: int) -> tuple[int, int]:
    """The DiT's token rows and columns for a ``height`` x ``width`` video."""
    unit_h = limits.spatial_factor * limits.patch_size[1]
    unit_w = limits.spatial_factor * limits.patch_size[2]
    return height // unit_h, width // unit_w


def _resize(volume: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Trilinear resize of ``[T, H, W]`` (float64) to ``size``."""
    if tuple(volume.shape) == tuple(size):
        return volume
    return F.interpolate(volume[None, None], size=size, mode="trilinear", align_corners=False)[0, 0]


def load_map(path: Path, num_frames: int, grid: tuple[int, int], where: str) -> torch.Tensor:
    """A cosmos-transfer1 ``.pt`` weight map as ``[num_frames, *grid]`` float64 (clamped at 0)."""
    if not Path(path).is_file():
        raise TransferError(f"{where}: weight map not found: {path}")
    try:
        w = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable file is one line
        raise TransferError(f"{where}: weight map {path} cannot be read as a tensor: {e}") from None
    if not isinstance(w, torch.Tensor) or w.ndim not in (2, 3) or 0 in w.shape:
        raise TransferError(f"{where}: weight map {path} must be a [T, H, W] or [H, W] tensor, got "
                            f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    w = w.to(torch.float64)
    if not torch.isfinite(w).all():
        raise TransferError(f"{where}: weight map {path} has non-finite values")
    w = w.clamp(min=0)
    if w.ndim == 2:
        w = w[None].expand(num_frames, -1, -1)
    return _resize(w.contiguous(), (num_frames, *grid))


def binarise(frames: np.ndarray) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` mask video -> uint8 ``[N, H, W]`` of 0 / 1 (gray level >= ``MASK_THRESHOLD``)."""
    return (frames.astype(np.uint16).sum(-1) >= 3 * MASK_THRESHOLD).astype(np.uint8)


def fit_mask(mask: np.ndarray, num_frames: int, height: int, width: int, where: str, what: str) -> np.ndarray:
    """A 0/1 mask ``[N, H, W]`` trimmed to ``num_frames`` and resized (nearest) to the video's size."""
    if mask.shape[0] < num_frames:
        raise TransferError(f"{where}: {what} has {mask.shape[0]} frames, the input has {num_frames}")
    mask = mask[:num_frames]
    if mask.shape[1:] != (height, width):
        mask = np.stack([cv2.resize(m, (width, height), interpolation=cv2.INTER_NEAREST) for m in mask])
    return mask


def mask_weights(mask: np.ndarray, weight: float, grid: tuple[int, int]) -> torch.Tensor:
    """``weight`` inside a 0/1 mask ``[N, H, W]``, resized to ``[N, *grid]`` (float64)."""
    volume = torch.from_numpy(mask).to(torch.float64) * weight
    return _resize(volume, (mask.shape[0], *grid))


def chunk_weights(maps: dict[str, torch.Tensor], window: tuple[int, int], frames_per_chunk: int,
                  latent_frames: int) -> dict[str, torch.Tensor]:
    """Each control's float32 token weights ``[T_latent, h, w]`` for one chunk window (pixel frames, the last chunk
    padded by repeating its last frame), normalised so that they sum to at most 1 at every token."""
    start, end = window
    resized = {}
    for modality, volume in maps.items():
        part = volume[start:end]
        if part.shape[0] < frames_per_chunk:
            part = torch.cat([part, part[-1:].expand(frames_per_chunk - part.shape[0], -1, -1)])
        first = _resize(part[:1], (1, *part.shape[1:]))
        rest = _resize(part[1:], (latent_frames - 1, *part.shape[1:])) if latent_frames > 1 else part[:0]
        resized[modality] = torch.cat([first, rest])
    total = None
    for w in resized.values():  # in control order, as the scalar path's sum()
        total = w if total is None else total + w
    total = total.clamp(min=1.0)
    return {m: (w / total).to(torch.float32) for m, w in resized.items()}

