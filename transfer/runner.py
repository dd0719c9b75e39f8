"""Run a job: requests -> validated inputs -> stages -> outputs (one process, or the stage processes)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from transfer.config import RunConfig
from transfer.errors import Terminated, TransferError, check_stop
from transfer.device import default_device, dtype_for, pin_cpu_threads
from transfer.job import plan_job
from transfer.outputs import make_gate
from transfer.loading import load_stages
from transfer.pipeline import TransferPipeline
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
        from transfer.distributed.runtime import run_distributed

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
    job.requests = [job.requests[j] for j in job.to_do()]  # complete ones (manifest.json) are skipped
    # Decode and check every input before loading models; a batch request that fails is recorded and skipped.
    checked = [(request, job.prepare(request)) for request in job.requests]
    job.requests = [request for request, ready in checked if ready is not None]
    prepared = [ready for _, ready in checked if ready is not None]
    if len(prepared) > 1:
        prepared = [None] * len(prepared)  # batch: keep memory flat, decode again when its turn comes
    job.manifest.hold_folder()  # a second run into the folder fails from here on; a killed run's temp files go
    try:
        generate_all(job, prepared, gate)
        gate.close()
        check_stop()  # a stop whose exception a finalizer swallowed still ends the run as stopped
    except Terminated:
        gate.abort()  # the output being written finishes under its final name; nothing else starts
        raise
    memory = None
    if job.residency is not None:  # models were loaded
        memory = job.residency.report()
        logger.info(describe(memory))
    return Outcome(gate.written, job.failures.finish(), memory)


def generate_all(job, prepared, gate) -> None:
    gate.start(enumerate(job.requests))  # async: every text check starts now, beside model loading and generation
    pipeline = None
    for j, (request, ready) in enumerate(zip(job.requests, prepared)):
        check_stop()
        gate.admit(j, request)  # on: the text check, before generating
        if gate.skip_generation(j):
            gate.release(j, request, None)  # its record
            continue
        pipeline = pipeline or load_pipeline(job)
        ready = ready or job.prepare(request)
        if ready is None:
            continue
        try:
            result = pipeline.generate(ready)
        except Exception as e:  # a batch goes on without this request; a single request fails the run
            if not job.batch:
                raise
            job.failures.add(request, e if isinstance(e, TransferError) else f"{type(e).__name__}: {e}")
            continue
        gate.check()
        gate.release(j, request, result)  # async: checked and written while the next request generates


def load_pipeline(job) -> TransferPipeline:
    device = default_device()
    dtype = dtype_for(device, job.runtime.dtype)
    modalities = sorted({m for r in job.requests for m in r.controls})
    where = job.info.root or "random weights (--random_weights)"
    logger.info(f"checkpoint {where} on {device} ({dtype}), controls: {', '.join(modalities)}")
    stages, job.residency = load_stages(job.info, ["text", "vae", "dit"], modalities, device, dtype, job.runtime)
    freeze_heap()
    return TransferPipeline(stages["text"], stages["vae"], stages["dit"], job.limits, job.settings)
