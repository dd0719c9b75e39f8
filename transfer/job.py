"""A job: the run's validated requests, checkpoint configs and settings (``plan_job``), shared by every execution path,
and the per-request failure rule (``request_failure``, ``Job.fail``, ``Failures``).

Everything here runs before any model loads, so bad input fails fast and the same way on every rank.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from loguru import logger

from guardrails import check_guard_config
from transfer.acceleration import check_acceleration
from transfer.distributed.placement import check_vae_degree
from transfer.config import GenerationSettings, RunConfig, RuntimeConfig
from transfer.errors import TransferError
from transfer.families import family_of
from transfer.manifest import Manifest
from transfer.outputs import RunRecord
from transfer.prepare import ModelLimits, preflight, prepare_request
from transfer.requests import requests_from
from transfer.specs import Request
from transfer.video_io import write_text


@dataclass
class Job:
    """Everything a run needs, validated before any model loads."""

    config: RunConfig
    info: object
    limits: ModelLimits
    requests: list[Request]
    controls: object = None
    """``preprocessors.ControlMaker`` for controls without ``input_control``."""
    failures: "Failures | None" = None
    """Batch requests refused (a bad line, a bad video): recorded, the rest runs."""
    manifest: Manifest | None = None
    """The output folder's record of finished requests (resume)."""
    residency: object = None
    """``transfer.residency.Residency`` of the loaded stages (None until models load)."""
    run_record: RunRecord | None = None
    """Transfer2.5 layout: ``config.yaml`` and ``console.log`` (set by ``make_gate`` on the rank that writes)."""
    latent_rows: int | None = None
    """The smallest request's latent height (a VAE group splits each call over at most this many ranks)."""
    family: object = None
    """``transfer.families.Family`` of the checkpoint (``family_of``: decided once, in ``plan_job``)."""

    @property
    def settings(self) -> GenerationSettings:
        """The run's generation settings (a Transfer2.5 sample's own are its ``request.settings``)."""
        return self.config.generation

    @property
    def runtime(self) -> RuntimeConfig:
        return self.config.runtime


    @property
    def batch(self) -> bool:
        """A batch records a failing request and goes on; a single request's failure fails the run."""
        return self.config.inputs.batch

    def finish_run_files(self) -> None:
        if self.run_record is not None:
            self.run_record.finish()
            self.run_record = None

    def to_do(self) -> list[int]:
        """Indices of the requests still to generate: complete ones (manifest) are skipped; one complete with other
        settings fails the run, or in a batch is recorded (``--overwrite`` replaces it). Call on the writer, after
        ``make_gate``; then ``manifest.hold_folder()`` once a request is ready to generate (a single spec whose input
        is bad leaves no folder behind)."""
        todo = []
        for j, request in enumerate(self.requests):
            try:
                if self.manifest.needs_run(request, self.controls):
                    todo.append(j)
            except TransferError as e:
                self.fail(request, e)
        summary = self.manifest.summary()
        if summary:
            logger.info(summary)
        return todo

    def prepare(self, request, log: bool = True):
        """``request``'s checked inputs, or None (and a failure record) when a batch request cannot run."""
        try:
            return prepare_request(request, self.limits, self.controls, log)
        except TransferError as e:
            self.fail(request, e)
            return None

    def fail(self, request, error: Exception, context: str = "") -> None:
        """The per-request failure rule (``request_failure``) where the failure is recorded (the writing rank)."""
        self.failures.add(request, request_failure(error, self.batch, context))


def request_failure(error: Exception, batch: bool, context: str = ""):
    """The per-request failure rule, once for every path and rank: a single request's error ends the run (raised
    again); in a batch only that request fails, recorded with this message (a ``TransferError`` as it is, anything
    else with its type, after ``context``) while the rest runs."""
    if not batch:
        raise error
    return error if isinstance(error, TransferError) else f"{context}{type(error).__name__}: {error}"


class Failures:
    """``{folder}/failures.jsonl``: one record per batch request that could not run (line, source, name, error),
    rewritten atomically at each new record; a run without failures removes an older file."""

    def __init__(self, folder: Path, records: list[dict] | None = None):
        self.path = Path(folder) / "failures.jsonl"
        self.records = list(records or [])

    def add(self, request, error: Exception, write: bool = True) -> None:
        """Record ``request``; ``write`` False while planning (every rank plans, only one writes)."""
        line = request.source.rsplit(":", 1)[-1]
        self.records.append({"line": int(line) if line.isdigit() else None, "source": request.source,
                             "name": request.name, "error": str(error)})
        if write:
            logger.warning(f"{located(request.source or request.name, error)} (skipped)")
            self.write()

    def write(self) -> None:
        if self.records:
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        else:
            self.path.unlink(missing_ok=True)

    def finish(self) -> int:
        """Write the final state; the exit status: 0, or ``FAILED_REQUESTS_EXIT`` when any request failed."""
        self.write()
        if self.records:
            lines = "".join(f"\n  {located(r['source'], r['error'])}" for r in self.records)
            logger.warning(f"{len(self.records)} request(s) failed (recorded in {self.path}):{lines}")
        return FAILED_REQUESTS_EXIT if self.records else 0


def located(source: str | None, error) -> str:
    """``error`` prefixed with where it comes from, unless it already starts with it (most messages name their line)."""
    text = str(error)
    return text if not source or text.startswith(source) else f"{source}: {text}"


#: Exit status of a batch in which some requests failed (the others were written).
FAILED_REQUESTS_EXIT = 3


def check_output_folder(folder: Path) -> None:
    """One error line, before anything runs or is written, when ``folder`` cannot be the output folder: it or a
    parent is a file, or it (or the nearest existing parent, where it would be made) cannot be written (probed with a
    file made and removed at once: root ignores permission bits, not read-only mounts or immutable folders)."""
    import tempfile

    existing = folder
    while not existing.exists():
        if existing.is_symlink():
            raise TransferError(f"output folder {folder}: {existing} is a broken link")
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == folder else f"is inside {existing}, which is a file"
        raise TransferError(f"output folder {folder} {what}, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise TransferError(f"output folder {folder} cannot be written ({existing}: {e.strerror or e})") from None


def plan_job(config: RunConfig) -> Job:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    num_gpus, cp = config.parallel.num_gpus, config.parallel.sp_degree
    if num_gpus is not None and num_gpus != world:
        raise TransferError(f"--num_gpus {num_gpus} does not match the {world} process(es) started (WORLD_SIZE)")
    if cp is not None and not 1 <= cp <= world:
        raise TransferError(f"--context_parallel_size {cp} must be between 1 and the {world} process(es) started")
    out, inputs = config.output, config.inputs
    if out.fps <= 0:
        raise TransferError(f"--fps must be positive, got {out.fps}")
    check_output_folder(out.folder)
    bad_lines: list[dict] = []
    requests = requests_from(inputs, config.generation.chunk_conditioning, bad_lines)
    family = family_of(config.checkpoint)
    info = family.info(config.checkpoint)
    family.check_run(info, config, world)
    if inputs.max_frames < 1 or inputs.max_resolution < 16:
        raise TransferError("--max_frames must be at least 1 and --max_resolution at least 16")
    limits = replace(family.limits(info), max_frames=inputs.max_frames,
                     max_side=inputs.max_resolution)
    settings = config.generation
    limits.check_settings(settings)
    check_guard_config(config.guard)
    failures = Failures(out.folder, bad_lines)
    usable, sizes = [], set()
    for request in requests:
        try:
            family.check_request(info, request, request.settings or settings)
            sizes.add(preflight(request, limits))
            if request.settings is None:
                request.settings = settings
            else:  # a Transfer2.5 sample's own chunking and steps
                limits.check_settings(request.settings, f"{request.source} ({request.name}): ")
            usable.append(request)
        except TransferError as e:
            failures.add(request, request_failure(e, inputs.batch), write=False)
    if not usable:
        raise TransferError(f"no request can run: {located(failures.records[0]['source'], failures.records[0]['error'])}")
    declared = config.checkpoint.defaults.get("resolution")
    declared = str(declared) if str(declared).isdigit() else None  # e.g. "64"; a form like "720p" declares nothing
    other = sorted(f"{w}x{h}" for h, w in sizes if declared is not None and min(h, w) != int(declared))
    if other and int(os.environ.get("RANK", "0")) == 0:  # once per run, not once per rank
        logger.warning(f"the checkpoint declares resolution {declared} (the size it was trained at); generating at "
                       f"{', '.join(other)}, which it has not seen: expect worse results")
    check_acceleration(config.runtime)
    check_vae_degree(config.parallel.vae_degree, world=world)
    return Job(config, info, limits, usable, control_maker(config, info, usable), failures,
               Manifest(out.folder, out.overwrite), latent_rows=min(h for h, _ in sizes) // limits.spatial_factor,
               family=family)


def control_maker(config: RunConfig, info, requests):
    """The preprocessors for controls the specs leave out (weights checked now, loaded on first use)."""
    from preprocessors import ControlMaker

    options = asdict(config.preprocess)
    if options["model_dir"] is None and info.root is not None and (Path(info.root) / "preprocessors").is_dir():
        options["model_dir"] = str(Path(info.root) / "preprocessors")  # weights shipped beside the checkpoint
    maker = ControlMaker(config.output.folder, options)
    maker.check(sorted({m for r in requests for m in maker.needs(r)}))  # weights checked before anything loads
    return maker
