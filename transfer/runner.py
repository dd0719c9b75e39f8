"""Run a job: requests -> validated inputs -> stages -> outputs (one process, or the stage processes)."""

from __future__ import annotations

import os
from pathlib import Path

from loguru import logger

from transfer.checkpoint import load_dit, load_text_encoder, load_vae
from transfer.job import default_device, dtype_for, plan_job, write_outputs
from transfer.pipeline import TransferPipeline, prepare_request


def run(args) -> list[Path]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from transfer.distributed.runtime import run_distributed

        run_distributed(args)  # exits the process
    job = plan_job(args)
    # Decode and check every input before loading models or writing anything.
    prepared = [prepare_request(r, job.limits) for r in job.requests]
    if len(prepared) > 1:
        prepared = [None] * len(prepared)  # batch: keep memory flat, decode again when its turn comes
    device = default_device()
    dtype = dtype_for(device)
    modalities = sorted({m for r in job.requests for m in r.controls})
    logger.info(f"checkpoint {job.info.root} on {device} ({dtype}), controls: {', '.join(modalities)}")
    pipeline = TransferPipeline(
        load_text_encoder(job.info, device, dtype), load_vae(job.info, device, dtype),
        load_dit(job.info, modalities, device, dtype), job.limits, job.settings,
    )
    folder = Path(args.video_save_folder)
    written = []
    for request, ready in zip(job.requests, prepared):
        ready = ready or prepare_request(request, job.limits)
        result = pipeline.generate(ready)
        written.append(write_outputs(folder, request, result, args.fps, args.save_raw))
        logger.info(f"wrote {written[-1]} ({ready.num_frames} frames, {ready.width}x{ready.height})")
    return written
