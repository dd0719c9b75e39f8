"""Run a job: requests -> validated inputs -> stages -> outputs (one process, or the stage processes)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from transfer.config import RunConfig
from transfer.device import default_device, dtype_for, pin_cpu_threads
from transfer.job import plan_job
from transfer.outputs import make_gate
from transfer.request_loop import generate_requests
from transfer.residency import describe
from transfer.video_io import freeze_heap


@dataclass
class Outcome:
    written: list[Path]
    status: int
    """Exit status: 0, or 3 when some batch requests failed (``failures.jsonl``)."""
    memory: dict | None = None
    """``transfer.residency.Residency.report()``: weight bytes per stage, peak resident bytes, moves."""


def run(config: RunConfig, guards=None) -> Outcome:
    """Generate every request of ``config``; ``guards`` (a ``guardrails.GuardSet``) replaces the guards the options
    would build -- the injection point for custom guards (single process)."""
    pin_cpu_threads(config.runtime.cpu_threads)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from transfer.distributed.rank_loop import run_distributed

        run_distributed(config)  # exits the process
    job = plan_job(config)
    freeze_heap()
    job.failures.write()  # bad batch lines found while planning (or no file: an older one goes)
    gate = make_gate(job, guards=guards)
    try:
        return run_job(job, gate)
    finally:
        job.finish_run_files()
        job.manifest.release_folder()
        if job.residency is not None:
            job.residency.close()  # offloaded weights' temp files


def run_job(job, gate) -> Outcome:
    generate_requests(job, gate, lambda modalities: load_pipeline(job, modalities))
    memory = None
    if job.residency is not None:  # models were loaded
        memory = job.residency.report()
        logger.info(describe(memory))
    return Outcome(gate.written, job.failures.finish(), memory)


def load_pipeline(job, modalities: list[str]):
    """The single process's pipeline for the job's model family: ``TransferPipeline`` (Transfer2.5) or
    ``Cosmos3Pipeline``."""
    device = default_device()
    dtype = dtype_for(device, job.runtime.dtype)
    where = job.info.root or "random weights (--random_weights)"
    logger.info(f"checkpoint {where} on {device} ({dtype}), controls: {', '.join(modalities)}")
    pipeline = job.family.load(job, modalities, device, dtype)
    freeze_heap()
    return pipeline
