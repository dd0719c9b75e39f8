"""A request's inputs made ready for the model: videos decoded, sized and checked against what the checkpoint can take.

``ModelLimits`` (from the checkpoint's configs, no weights) says what the VAE and RoPE accept; ``preflight`` refuses
what it can from file metadata before any work; ``prepare_request`` decodes the input and control videos (computing
missing controls), fits them to the generation size and builds spatial control weights. The chunk schedule
(``transfer.chunks``) takes it from there.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from loguru import logger

from transfer import control_weights
from transfer.checkpoint import CheckpointInfo
from transfer.config import GenerationSettings
from transfer.errors import TransferError
from transfer.specs import Request
from transfer.video_io import MAX_FRAMES, MAX_SIDE, read_video, video_shape

#: Most denoising steps a chunk may take: the flow-matching schedulers' training timesteps (upstream runs 35; a typo
#: such as 1000000000 would otherwise run for ever).
MAX_STEPS = 1000
#: How chunk k + 1 gets chunk k's overlap frames (docs/long_video.md).
CHUNK_CONDITIONING = ("roundtrip", "latent")


@dataclass
class ModelLimits:
    """What the checkpoint's VAE and RoPE can take (from configs, no weights)."""

    temporal_factor: int
    spatial_factor: int
    patch_size: tuple[int, int, int]
    max_rope_positions: int
    max_frames: int = MAX_FRAMES
    """Input limits (``--max_frames`` / ``--max_resolution``): checked from metadata before decoding."""
    max_side: int = MAX_SIDE

    @classmethod
    def from_info(cls, info: CheckpointInfo) -> "ModelLimits":
        t = info.transformer
        return cls(
            temporal_factor=2 ** sum(info.vae["temperal_downsample"]),
            spatial_factor=2 ** len(info.vae["temperal_downsample"]),
            patch_size=tuple(t["patch_size"]),
            max_rope_positions=max(s // p for s, p in zip(t["max_size"], t["patch_size"])),
        )

    def latent_frames(self, pixel_frames: int) -> int:
        return (pixel_frames - 1) // self.temporal_factor + 1

    def cond_latent_frames(self, num_conditional_frames: int) -> int:
        return 0 if num_conditional_frames <= 0 else self.latent_frames(num_conditional_frames)

    def check_settings(self, s: GenerationSettings, where: str = "") -> None:
        f, tf = s.num_frames_per_chunk, self.temporal_factor
        if f < tf + 1 or (f - 1) % tf:
            raise TransferError(where + f"--num_frames_per_chunk must be 1 + {tf}k and at least {tf + 1}, got {f}")
        if self.latent_frames(f) // self.patch_size[0] > self.max_rope_positions:
            raise TransferError(
                where + f"--num_frames_per_chunk {f} is too long for the model (at most "
                f"{(self.max_rope_positions * self.patch_size[0] - 1) * tf + 1} frames)"
            )
        if not 0 <= s.num_conditional_frames < f:
            raise TransferError(
                where + f"--num_conditional_frames must be in [0, num_frames_per_chunk), got {s.num_conditional_frames}"
            )
        if not 1 <= s.num_steps <= MAX_STEPS:
            raise TransferError(where + f"--num_steps must be in [1, {MAX_STEPS}] (the scheduler's training timesteps), "
                                f"got {s.num_steps}")
        if s.chunk_conditioning not in CHUNK_CONDITIONING:
            raise TransferError(where + f"--chunk_conditioning must be one of {', '.join(CHUNK_CONDITIONING)}, got {s.chunk_conditioning!r}")
        C = s.num_conditional_frames
        if s.chunk_conditioning == "latent" and C > 0 and (C - 1) % tf:
            raise TransferError(
                where + f"--chunk_conditioning latent needs --num_conditional_frames 0 or 1 + {tf}k (1, {1 + tf}, {1 + 2 * tf}, ...), "
                f"got {C}: a reused latent frame stands for {tf} frames, so the overlap must end on a latent frame boundary"
            )

    def check_resolution(self, height: int, width: int, where: str) -> None:
        unit = self.spatial_factor * self.patch_size[1]
        if height % unit or width % unit or not height or not width:
            raise TransferError(f"{where}: resolution {width}x{height} is not a multiple of {unit} in both dimensions")
        biggest = self.max_rope_positions * unit
        if height > biggest or width > biggest:
            raise TransferError(f"{where}: resolution {width}x{height} exceeds the model's maximum of {biggest} per side")


@dataclass
class PreparedRequest:
    """A request with its videos decoded and checked against the model's limits."""

    request: Request
    controls: dict[str, np.ndarray]  # modality -> uint8 [N, H, W, 3], the generation size and length
    num_frames: int
    height: int
    width: int
    weights: dict[str, torch.Tensor] | None = None
    """Spatial control weights (``transfer.control_weights``): modality -> float64 ``[N, h, w]`` at the token grid,
    for every control, when any control of the request has a map or mask; None: scalar weights."""
    masks: dict[str, np.ndarray] | None = None
    """Transfer2.5 masks actually used (modality -> 0/1 uint8 ``[N, H, W]``), written beside the output."""
    output_size: tuple[int, int] | None = None
    """``(height, width)`` the written video has when it differs from the generation size (``keep_input_resolution``)."""
    input_frames: np.ndarray | None = None
    """The input video at the generation size (only when the request shows it beside the output)."""


def generation_size(height: int, width: int, resolution: int, limits: ModelLimits, where: str,
                    info=logger.info) -> tuple[int, int]:
    """Transfer2.5's ``resolution`` (the short side, in pixels) for a ``height`` x ``width`` input: the aspect ratio
    kept, both sides rounded to the model's unit (16 for the Wan VAE and patch 2); a model whose largest size is
    smaller generates at its largest, said in one log line."""
    unit = limits.spatial_factor * limits.patch_size[1]
    biggest = limits.max_rope_positions * unit
    short, long_ = sorted((height, width))
    s, l = float(resolution), resolution * long_ / short
    if l > biggest:
        s, l = s * biggest / l, float(biggest)
        info(f"{where}: the model's largest side is {biggest} px, smaller than resolution {resolution}: "
             "generating at its largest size")
    s, l = (max(unit, min(biggest, int(round(v / unit)) * unit)) for v in (s, l))
    return (s, l) if height <= width else (l, s)


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 ``[N, H, W, C]`` (or ``[N, H, W]``) resized to ``height`` x ``width`` (area down, linear up)."""
    if frames.shape[1:3] == (height, width):
        return frames
    down = height * width < frames.shape[1] * frames.shape[2]
    method = cv2.INTER_AREA if down else cv2.INTER_LINEAR
    return np.stack([cv2.resize(f, (width, height), interpolation=method) for f in frames])


def target_size(request: Request, limits: ModelLimits, height: int, width: int, info=logger.info):
    """``(height, width, output_size)``: the size the request generates at for a ``height`` x ``width`` input (its
    Transfer2.5 ``resolution``, else the input's), checked against the model; ``output_size`` the size written back
    when they differ (``keep_input_resolution``), else None."""
    where = request.source or request.name
    output_size = None
    if request.resolution is not None:
        size = generation_size(height, width, request.resolution, limits, where, info)
        if size != (height, width):
            info(f"{where}: generating at {size[1]}x{size[0]} (input {width}x{height})")
            output_size = (height, width) if request.keep_input_resolution else None
            height, width = size
    limits.check_resolution(height, width, where)
    return height, width, output_size


def preflight(request: Request, limits: ModelLimits) -> tuple[int, int]:
    """What can be refused before any work, from files and their metadata only (nothing decoded): every video the
    request names exists and is a video within the limits, and the size it generates at suits the model (returned,
    height and width)."""
    where = request.source or request.name
    shape = None
    try:
        if request.input_video_path is not None:
            shape = video_shape(request.input_video_path, "input video", limits.max_frames, limits.max_side)
        for modality, control in request.controls.items():
            for path, what in ((control.input_control, "control video"), (control.mask_path, "mask video")):
                if path is not None:
                    given = video_shape(path, f"{what} for {modality!r}", limits.max_frames, limits.max_side)
                    shape = shape or (given if what == "control video" else None)
    except TransferError as e:
        raise TransferError(f"{where}: {e}") from None
    if shape is None:
        raise TransferError(f"{where}: no input video and no control video to take the size from")
    return target_size(request, limits, shape[1], shape[2], logger.debug)[:2]


def prepare_request(request: Request, limits: ModelLimits, make_control=None, log: bool = True) -> PreparedRequest:
    """Decode the input and control videos, computing missing controls with ``make_control`` (a
    ``preprocessors.ControlMaker``); raise ``TransferError`` for anything the model cannot take. ``log`` False: the
    resize notes go to debug (a second preparation, for writing the Transfer2.5 layout's files)."""
    where = request.source or request.name
    info = logger.info if log else logger.debug
    reference, fps = None, 0.0
    if request.input_video_path is not None:
        reference, fps = read_video(request.input_video_path, "input video", limits.max_frames, limits.max_side)
        if request.max_frames is not None:
            reference = reference[: request.max_frames]
    controls_u8 = {}
    for modality, control in request.controls.items():
        if control.input_control is None:
            if make_control is None:
                raise TransferError(f"{where}: control {modality!r} has no input_control and no preprocessor is set up")
            controls_u8[modality] = make_control(modality, request, reference, fps)
        else:
            controls_u8[modality], _ = read_video(control.input_control, f"control video for {modality!r}",
                                                  limits.max_frames, limits.max_side)
    masks = {}
    for modality, control in request.controls.items():
        if control.mask_path is not None:
            video, _ = read_video(control.mask_path, f"mask video for {modality!r}", limits.max_frames, limits.max_side)
            masks[modality] = control_weights.binarise(video)
        elif control.mask_prompt is not None:
            if make_control is None:
                raise TransferError(f"{where}: control {modality!r} has a mask_prompt and no preprocessor is set up")
            seg = make_control("seg", request.mask_request(control.mask_prompt), reference, fps)
            masks[modality] = (seg.max(-1) > 0).astype(np.uint8)
    if reference is None:
        reference = next(iter(controls_u8.values()))
        if request.max_frames is not None:
            reference = reference[: request.max_frames]
    num_frames = reference.shape[0]
    height, width, output_size = target_size(request, limits, *reference.shape[1:3], info)
    controls = {}
    for modality, frames in controls_u8.items():
        if frames.shape[0] < num_frames:
            raise TransferError(
                f"{where}: control video for {modality!r} has {frames.shape[0]} frames, the input has {num_frames}"
            )
        frames = frames[:num_frames]
        if frames.shape[1:3] != (height, width):
            info(f"{where}: resizing {modality} control from {frames.shape[2]}x{frames.shape[1]} to {width}x{height}")
            frames = resize_frames(frames, height, width)
        controls[modality] = frames
    weights = None
    if request.spatial:
        grid = control_weights.token_grid(limits, height, width)
        weights = {}
        for modality, control in request.controls.items():
            what = f"mask for {modality!r}"
            if modality in masks:
                masks[modality] = control_weights.fit_mask(masks[modality], num_frames, height, width, where, what)
                weights[modality] = control_weights.mask_weights(masks[modality], control.weight, grid)
            elif control.weight_map is not None:
                weights[modality] = control_weights.load_map(control.weight_map, num_frames, grid, where)
            else:
                weights[modality] = torch.full((num_frames, *grid), control.weight, dtype=torch.float64)
    shown = None
    if "input" in request.show:
        shown = resize_frames(reference[:num_frames], height, width)
    return PreparedRequest(request, controls, num_frames, height, width, weights, masks or None, output_size, shown)
