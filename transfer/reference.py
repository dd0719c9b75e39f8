"""Run diffusers' own ``Cosmos2_5_TransferPipeline`` on a spec: the upstream side of an A/B.

    python -m transfer.reference --controlnet_specs SPEC.json --video_save_folder runs/upstream [--seed 1 ...]

It loads the same checkpoint directory with diffusers' and transformers' classes (its own loading
code, not ours), runs every request of the spec or batch, and writes ``{name}.mp4``, ``{name}.npz``
(uint8 ``frames``) and ``timings.json`` (seconds per request and in all) -- a run folder
``python -m transfer.ab`` can compare with ours. The adjustments it makes, all so that the two
implementations can agree exactly where they are meant to:

1. control and conditioning latents come from ``latent_dist.mode()`` (diffusers samples them with
   the generator; ours are deterministic, docs/ab.md);
2. the noise is one tensor drawn from ``torch.Generator().manual_seed(seed)`` -- our chunk 0 noise --
   which diffusers reuses for every chunk (ours draws fresh noise per chunk), so single-chunk
   requests can match bit for bit and multi-chunk ones diverge from chunk 1 on, by design;
3. prompt embeddings come from our text encoder on the same weights (diffusers' pipeline encodes
   with Cosmos-Reason1 only, the tiny checkpoint has T5);
4. its safety checker is a pass-through: guard the outputs with ``--guardrail`` on our side, or
   compare with ``--guardrail off``.

diffusers' pipeline takes one ControlNet, so requests with several controls are refused.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin


class PassThroughSafetyChecker(ModelMixin, ConfigMixin):
    """Accepts every prompt and returns every video unchanged."""

    def __init__(self):
        super().__init__()
        self.register_buffer("_device_tracker", torch.zeros(1), persistent=False)

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, frames: np.ndarray) -> np.ndarray:
        return frames

    @property
    def device(self) -> torch.device:
        return self._device_tracker.device

    @property
    def dtype(self) -> torch.dtype:
        return self._device_tracker.dtype


def reference_pipeline(ckpt: Path, modality: str, device: str = "cpu", dtype=torch.float32):
    """diffusers' ``Cosmos2_5_TransferPipeline`` built from the checkpoint folders with diffusers' own loaders."""
    from diffusers import (
        AutoencoderKLWan, Cosmos2_5_TransferPipeline, CosmosControlNetModel, CosmosTransformer3DModel,
        UniPCMultistepScheduler,
    )
    from transformers import AutoTokenizer

    from transfer.checkpoint import inspect_checkpoint
    from transfer.families.transfer25.text_encoding import text_encoder_class

    info = inspect_checkpoint(ckpt)
    ckpt = Path(ckpt)
    return Cosmos2_5_TransferPipeline(
        text_encoder=text_encoder_class(info.text_encoder_type).from_pretrained(ckpt / "text_encoder", dtype=dtype),
        tokenizer=AutoTokenizer.from_pretrained(ckpt / "tokenizer"),
        transformer=CosmosTransformer3DModel.from_pretrained(ckpt / "transformer", torch_dtype=dtype),
        vae=AutoencoderKLWan.from_pretrained(ckpt / "vae", torch_dtype=dtype),
        scheduler=UniPCMultistepScheduler.from_pretrained(ckpt / "scheduler"),
        controlnet=CosmosControlNetModel.from_pretrained(ckpt / "controlnet" / modality, torch_dtype=dtype),
        safety_checker=PassThroughSafetyChecker(),
    ).to(device)


def cosmos3_reference_pipeline(ckpt: Path, device: str = "cpu", dtype=torch.float32):
    """diffusers' ``Cosmos3OmniModularPipeline`` from a Cosmos 3 folder, with diffusers' and transformers' own loaders
    (``transfer.families.cosmos3.pipeline.load_cosmos3_pipeline``: the product loads it the same way, then runs its blocks
    stage by stage)."""
    from transfer.families.cosmos3.pipeline import load_cosmos3_pipeline

    return load_cosmos3_pipeline(ckpt, device, dtype)


@contextmanager
def deterministic_latents():
    """Adjustment 1: diffusers' ``retrieve_latents`` takes ``latent_dist.mode()`` while inside."""
    import diffusers.pipelines.cosmos.pipeline_cosmos2_5_transfer as ref

    original = ref.retrieve_latents
    ref.retrieve_latents = lambda out, generator=None, sample_mode="sample": original(out, None, "argmax")
    try:
        yield
    finally:
        ref.retrieve_latents = original


@contextmanager
def refused_by_diffusers(request):
    """A request diffusers' pipeline refuses (its own argument and shape checks raise ``ValueError``) is one error line
    naming the request, not a traceback."""
    from transfer.errors import TransferError

    try:
        yield
    except ValueError as e:
        raise TransferError(f"{request.source or request.name}: diffusers' Cosmos2_5_TransferPipeline refused it: "
                            f"{' '.join(str(e).split())}") from None


def main(argv: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from loguru import logger

    from transfer.cli import parse_config
    from transfer.errors import TransferError
    from transfer.device import default_device, dtype_for, pin_cpu_threads
    from transfer.job import plan_job
    from transfer.prepare import prepare_request
    from transfer.checkpoint import load_text_encoder
    from transfer.video_io import write_mp4, write_npz

    try:
        config = parse_config(argv, prog="python -m transfer.reference", description=__doc__)  # transfer.py's flags
        pin_cpu_threads(config.runtime.cpu_threads)  # the same float sums as transfer.py's run of the same flags
        job = plan_job(config)
        for request in job.requests:
            if len(request.controls) != 1:
                raise TransferError(f"{request.source or request.name}: diffusers' pipeline takes one control, "
                                    f"this request has {len(request.controls)}")
        prepared = [prepare_request(r, job.limits, job.controls) for r in job.requests]
    except TransferError as e:
        print(f"python -m transfer.reference: error: {e}", file=sys.stderr)
        return 2
    import PIL.Image

    device = default_device()
    dtype = dtype_for(device, job.runtime.dtype)
    encoder = load_text_encoder(job.info, device, dtype)
    folder = config.output.folder
    s = job.settings
    timings, start_all, pipes = {}, time.perf_counter(), {}
    for request, ready in zip(job.requests, prepared):
        start = time.perf_counter()
        (modality,) = request.controls
        if modality not in pipes:  # loaded with the first request that needs it (its time counts there)
            pipes[modality] = reference_pipeline(job.info.root, modality, str(device), dtype)
            pipes[modality].set_progress_bar_config(disable=True)
        pipe = pipes[modality]
        f = job.limits.spatial_factor
        shape = (1, 16, job.limits.latent_frames(s.num_frames_per_chunk), ready.height // f, ready.width // f)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(request.seed), dtype=torch.float32)
        with deterministic_latents(), torch.no_grad(), refused_by_diffusers(request):
            out = pipe(controls=[PIL.Image.fromarray(f) for f in ready.controls[modality]],
                       controls_conditioning_scale=request.scales()[modality],
                       prompt_embeds=encoder.encode(request.prompt).to(dtype),
                       negative_prompt_embeds=encoder.encode(request.negative_prompt).to(dtype),
                       height=ready.height, width=ready.width, num_frames_per_chunk=s.num_frames_per_chunk,
                       num_inference_steps=s.num_steps, guidance_scale=s.guidance, latents=noise.to(device, dtype),
                       num_ar_conditional_frames=s.num_conditional_frames, output_type="np")
        frames = np.rint(np.asarray(out.frames[0]) * 255).astype(np.uint8)  # [T, H, W, 3]: diffusers quantised already
        write_npz(folder / f"{request.name}.npz", frames=frames)
        write_mp4(folder / f"{request.name}.mp4", frames, config.output.fps)
        timings[request.name] = time.perf_counter() - start
        logger.info(f"wrote {folder / request.name}.mp4 ({timings[request.name]:.1f} s)")
    timings["total"] = time.perf_counter() - start_all
    (folder / "timings.json").write_text(json.dumps({"implementation": "diffusers.Cosmos2_5_TransferPipeline",
                                                     "seconds": timings}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
