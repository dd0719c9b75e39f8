"""The chunk loop: one readable place where a request becomes a video.

    controls --VAE encode--> control latents --+
    prompt --text encoder--> embeddings -------+--> DiT + ControlNets (CFG) --> latents --VAE decode--> frames
    previous chunk's last frames --VAE (roundtrip)--> conditioning latents --+
    previous chunk's last latents (latent) ---------> conditioning latents --+

Chunk indices are computed before the loop; the input is padded by repeating its
last frame and the output trimmed back. Chunk k > 0 is conditioned on the last
``num_conditional_frames`` frames of chunk k - 1: decoded and re-encoded by the VAE
(``roundtrip``, the upstream behaviour), or as chunk k - 1's own final latents
(``latent``, no VAE between chunks; docs/long_video.md says which latents are valid).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np
import torch
from loguru import logger
from tqdm import tqdm

from transfer import control_weights
from transfer.checkpoint import CheckpointInfo
from transfer.config import GenerationSettings
from transfer.errors import TransferError, check_stop
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


def chunk_scales(prepared: PreparedRequest, window: tuple[int, int], limits: ModelLimits, settings) -> dict:
    """The control scales the DiT gets for one chunk: the request's scalar weights, or its token-weight maps."""
    if prepared.weights is None:
        return prepared.request.scales()
    return control_weights.chunk_weights(prepared.weights, window, settings.num_frames_per_chunk,
                                         limits.latent_frames(settings.num_frames_per_chunk))


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


class TransferPipeline:
    """Single-process generation over the three stages (text encoder, VAE, DiT)."""

    def __init__(self, text_encoder, vae, dit, limits: ModelLimits, settings: GenerationSettings):
        limits.check_settings(settings)
        self.text_encoder, self.vae, self.dit, self.limits, self.settings = text_encoder, vae, dit, limits, settings

    def generate(self, prepared: PreparedRequest, noise: NoiseSource | None = None, progress: bool = True) -> GenerationResult:
        req = prepared.request
        s = req.settings or self.settings
        noise = noise or SeededNoise(req.seed)
        F, C = s.num_frames_per_chunk, s.num_conditional_frames
        chunks = plan_chunks(prepared.num_frames, F, C)
        shape = latent_shape(self.limits, self.dit, F, prepared.height, prepared.width)
        prompt_embeds = self.text_encoder.encode(req.prompt)
        negative_embeds = self.text_encoder.encode(req.negative_prompt) if s.cfg else None
        videos = {m: to_model_video(frames) for m, frames in prepared.controls.items()}

        latent_mode = s.chunk_conditioning == "latent"
        # latent mode: every VAE encode before the chunk loop, every decode after it
        encoded = [encode_controls(self.vae, videos, w, F, self.dit.dtype) for w in chunks] if latent_mode else None
        decoded, latents_out = [], []
        # a with block: a stop or an error clears the bar before its message is printed (not glued onto the bar)
        total = len(chunks) * s.num_steps
        with tqdm(total=total, desc=req.name, unit="step", disable=not progress, leave=False) as bar:
            for k, window in enumerate(chunks):
                controls = (encoded[k] if latent_mode
                            else encode_controls(self.vae, videos, window, F, self.dit.dtype))
                cond, num_cond = None, 0
                if k > 0 and C > 0:
                    num_cond = self.limits.cond_latent_frames(C)
                    if latent_mode:
                        cond = latent_condition(latents_out[-1], num_cond)
                    else:
                        cond = roundtrip_condition(self.vae, decoded[-1], C)
                latents = self.dit.denoise(
                    noise(k, shape), cond, num_cond, controls, chunk_scales(prepared, window, self.limits, s),
                    prompt_embeds, negative_embeds, s.num_steps, s.guidance, (prepared.height, prepared.width),
                    on_step=lambda _: (bar.update(), check_stop()),
                )
                if not latent_mode:
                    decoded.append(self.vae.decode(latents))
                latents_out.append(latents.cpu())
        if latent_mode:
            decoded = [self.vae.decode(latents) for latents in latents_out]
        result = assemble(decoded, latents_out, C, prepared.num_frames)
        if prepared.output_size is not None:  # keep_input_resolution: back to the input's size
            result.frames = resize_frames(result.frames, *prepared.output_size)
        return result


def latent_shape(limits: ModelLimits, dit, frames_per_chunk: int, height: int, width: int) -> tuple[int, ...]:
    """Noise / latent shape of one chunk: ``[1, C_latent, T_latent, h, w]``."""
    f = limits.spatial_factor
    return (1, dit.transformer.config.in_channels - 1, limits.latent_frames(frames_per_chunk), height // f, width // f)


def encode_controls(vae, controls: dict[str, torch.Tensor], window: tuple[int, int], frames_per_chunk: int, dtype):
    """Control latents of one chunk window, per modality (the last chunk padded by repeating its last frame)."""
    start, end = window
    return {m: vae.encode(pad_frames(video[:, :, start:end], frames_per_chunk), dtype) for m, video in controls.items()}


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


def assemble(decoded: list[torch.Tensor], latents: list[torch.Tensor], num_conditional_frames: int, num_frames: int):
    """The result from decoded chunks ``[1, 3, F, H, W]`` and each chunk's final latents."""
    video = join_chunks(decoded, num_conditional_frames, num_frames, dim=2)
    return GenerationResult(to_uint8_frames(video), torch.cat(latents).float())
