"""Run a job: requests -> validated inputs -> stages -> outputs (one process, or the stage processes)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from transfer.config import RunConfig
from transfer.cosmos3_checkpoint import Cosmos3Info
from transfer.errors import Terminated, check_stop
from transfer.device import default_device, dtype_for, pin_cpu_threads
from transfer.job import plan_job
from transfer.outputs import make_gate
from transfer.loading import load_stages
from transfer.pipeline import TransferPipeline
from transfer.request_loop import RequestLoop
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
    requests = RequestLoop(job, gate)
    # Decode and check every input before loading models; a batch request that fails is recorded and skipped.
    if len(list(requests.check())) > 1:
        requests.drop_kept()  # batch: keep memory flat, decode again when its turn comes
    try:
        generate_all(job, requests, gate)
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


def generate_all(job, requests: RequestLoop, gate) -> None:
    pipeline = None
    while True:
        check_stop()
        turn = requests.next()
        if turn is None:
            return
        j, ready = turn
        pipeline = pipeline or load_pipeline(job, requests.modalities())
        try:
            result = pipeline.generate(ready)
        except Exception as e:  # the failure rule: a batch goes on without this request; a single request fails the run
            job.fail(ready.request, e)
            continue
        gate.check()
        gate.release(j, ready.request, result)  # async: checked and written while the next request generates


def load_pipeline(job, modalities: list[str]):
    """The single process's pipeline for the job's model family: ``TransferPipeline`` (Transfer2.5) or
    ``Cosmos3Pipeline``."""
    device = default_device()
    dtype = dtype_for(device, job.runtime.dtype)
    where = job.info.root or "random weights (--random_weights)"
    logger.info(f"checkpoint {where} on {device} ({dtype}), controls: {', '.join(modalities)}")
    if isinstance(job.info, Cosmos3Info):
        from transfer.cosmos3_pipeline import Cosmos3Pipeline, load_cosmos3_pipeline, random_cosmos3_pipeline

        pipe = (load_cosmos3_pipeline(job.info.root, device, dtype) if job.info.root is not None
                else random_cosmos3_pipeline(job.info, device, dtype))
        freeze_heap()
        return Cosmos3Pipeline(pipe, job.settings, job.config.output.fps)
    stages, job.residency = load_stages(job.info, ["text", "vae", "dit"], modalities, device, dtype, job.runtime)
    freeze_heap()
    return TransferPipeline(stages["text"], stages["vae"], stages["dit"], job.limits, job.settings)
