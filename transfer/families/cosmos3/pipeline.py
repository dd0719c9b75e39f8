"""Cosmos 3 transfer in one process: a prepared request (``transfer.prepare``) through diffusers'
``Cosmos3OmniModularPipeline``, run stage by stage (``transfer.families.cosmos3.blocks.run_staged``: the same blocks, the same
boundaries the stage processes use), into the project's ``GenerationResult``.

What the request gives the model (``pipeline_inputs``) is written once, for this process, the stage processes and the
A/B reference (``python -m transfer.reference``'s Cosmos 3 side).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from transfer.chunks import GenerationResult
from transfer.config import GenerationSettings
from transfer.families.cosmos3.attention import expand_kv_heads
from transfer.families.cosmos3.checkpoint import HINT_OF, Cosmos3Info
from transfer.device import default_dtype
from transfer.errors import check_stop
from transfer.prepare import PreparedRequest, resize_frames


def load_cosmos3_pipeline(root: Path, device="cpu", dtype=torch.float32):
    """diffusers' ``Cosmos3OmniModularPipeline`` (transfer when given ``control_videos``) built from a Cosmos 3 folder
    (``configs.cosmos3``'s layout) with diffusers' and transformers' own loaders; its safety checker off (this fork
    guards with ``--guardrail``)."""
    from transfer.families.cosmos3.checkpoint import inspect_cosmos3

    return load_cosmos3(inspect_cosmos3(root), device, dtype)


#: The models a stage process may hold.
PARTS = ("transformer", "vae")


def load_cosmos3(info: Cosmos3Info, device="cpu", dtype=torch.float32, parts=PARTS):
    """The modular pipeline with the models of ``parts``: from ``info.root`` with diffusers' loaders, or with random
    weights from the preset's configs built on ``device`` in ``dtype`` (``--random_weights``: real-size time and
    memory without a download; the tokenizer is then the embedded preset's, Qwen's is not here). A stage without the
    transformer gets it on the meta device (no memory: the blocks it runs read its dtype and config); without the
    VAE, none. On CUDA the transformer attends with expanded KV heads (``transfer.families.cosmos3.attention``)."""
    from diffusers import AutoencoderKLWan, Cosmos3OmniTransformer, UniPCMultistepScheduler

    from transfer.embedded_checkpoint import ensure_tiny_checkpoint

    def build(cls, folder: str, config: dict, real: bool):
        if real and info.root is not None:
            return cls.from_pretrained(Path(info.root) / folder, torch_dtype=dtype).to(device)
        with default_dtype(dtype), torch.device(device if real else "meta"):
            torch.manual_seed(0)
            return cls.from_config(config)

    transformer = build(Cosmos3OmniTransformer, "transformer", info.transformer, "transformer" in parts)
    if "transformer" in parts and torch.device(device).type == "cuda":
        expand_kv_heads(transformer)  # flash / cuDNN kernels instead of GQA's math fallback at long sequences
    vae = build(AutoencoderKLWan, "vae", info.vae, True) if "vae" in parts else None
    scheduler = (UniPCMultistepScheduler.from_pretrained(Path(info.root) / "scheduler") if info.root is not None
                 else UniPCMultistepScheduler.from_config(info.scheduler))
    tokenizer = (Path(info.root) if info.root is not None else ensure_tiny_checkpoint("cosmos3-tiny")) / "text_tokenizer"
    return _assemble(transformer, vae, scheduler, tokenizer, info.vae.get("scale_factor_spatial", 16))


def _assemble(transformer, vae, scheduler, tokenizer_dir: Path, spatial: int):
    from diffusers.modular_pipelines import Cosmos3OmniBlocks
    from diffusers.video_processor import VideoProcessor
    from transformers import AutoTokenizer

    pipe = Cosmos3OmniBlocks().init_pipeline()
    models = {"transformer": transformer.eval(), **({"vae": vae.eval()} if vae is not None else {})}
    pipe.update_components(**models, scheduler=scheduler, text_tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir),
                           video_processor=VideoProcessor(vae_scale_factor=spatial, resample="bilinear"))
    pipe.disable_safety_checker()
    pipe.set_progress_bar_config(disable=True)  # the callers show their own (``per_pass``)
    return pipe


def control_videos(controls: dict[str, np.ndarray]) -> dict[str, list]:
    """This fork's controls (uint8 ``[N, H, W, 3]``) as the pipeline's ``control_videos``: Cosmos 3's hint names, each
    a list of PIL frames (what diffusers' video processor takes from a loaded video)."""
    return {HINT_OF[m]: [Image.fromarray(frame) for frame in frames] for m, frames in controls.items()}


def pipeline_inputs(prepared: PreparedRequest, settings: GenerationSettings, fps: float) -> dict:
    """The modular pipeline's inputs for one request: its hints at the generation size, the prompts, chunking, steps,
    text guidance (``guidance``), Cosmos 3's own fields (``control_guidance``, the guidance intervals), a fresh
    generator from the seed (CPU: the same noise whatever the device), ``fps`` the output's frame rate."""
    req = prepared.request
    fields = dict(req.cosmos3)
    for key in ("guidance_interval", "control_guidance_interval"):
        if key in fields:
            fields[key] = tuple(fields[key])
    return dict(prompt=req.prompt, negative_prompt=req.negative_prompt, control_videos=control_videos(prepared.controls),
                height=prepared.height, width=prepared.width, num_frames=prepared.num_frames,
                num_video_frames_per_chunk=settings.num_frames_per_chunk,
                num_conditional_frames=settings.num_conditional_frames, num_inference_steps=settings.num_steps,
                guidance_scale=settings.guidance, fps=float(fps), generator=torch.Generator().manual_seed(req.seed),
                output_type="pt", **fields)


def to_frames(videos: torch.Tensor) -> np.ndarray:
    """The pipeline's ``output_type="pt"`` video (float ``[F, 3, H, W]`` in [0, 1]) as uint8 ``[F, H, W, 3]``
    (truncating, as ``transfer.chunks.to_uint8_frames`` does)."""
    return (videos.float().clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def finish(prepared: PreparedRequest, videos: torch.Tensor, latents: list[torch.Tensor]) -> GenerationResult:
    """The pipeline's stitched video as the written frames (back at the input's size for ``keep_input_resolution``),
    with every chunk's denoised latents (``--save_raw``)."""
    frames = to_frames(videos)
    if prepared.output_size is not None:
        frames = resize_frames(frames, *prepared.output_size)
    return GenerationResult(frames, torch.cat([t.detach().cpu() for t in latents]).float())


@contextmanager
def per_pass(transformer, name: str, progress: bool = True):
    """Each transformer pass checks for a stop signal and ticks a progress bar (passes per step vary with the
    guidance terms and intervals, so the bar counts passes)."""
    with tqdm(desc=name, unit="pass", disable=not progress, leave=False) as bar:
        def tick(*_):  # returns None: the pass's inputs unchanged
            check_stop()
            bar.update()

        handle = transformer.register_forward_pre_hook(tick)
        try:
            yield
        finally:
            handle.remove()


class Cosmos3Pipeline:
    """Single-process Cosmos 3 transfer (``generate`` a prepared request, as ``transfer.families.transfer25.pipeline.TransferPipeline``)."""

    def __init__(self, pipe, settings: GenerationSettings, fps: float):
        self.pipe, self.settings, self.fps = pipe, settings, fps

    @torch.no_grad()
    def generate(self, prepared: PreparedRequest, progress: bool = True) -> GenerationResult:
        from transfer.families.cosmos3.blocks import run_staged

        inputs = pipeline_inputs(prepared, prepared.request.settings or self.settings, self.fps)
        with per_pass(self.pipe.transformer, prepared.request.name, progress):
            videos, latents = run_staged(self.pipe, **inputs)
        return finish(prepared, videos, latents)
