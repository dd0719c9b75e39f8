"""A job: validated requests, checkpoint configs and settings, shared by every execution path.

Everything here runs before any model loads, so bad input fails fast and the same way on every
rank; ``write_outputs`` is the one place outputs are written (single process and coordinator).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from loguru import logger

from guardrails import check_guard_args
from transfer.acceleration import check_acceleration, offload_mode
from transfer.checkpoint import info_from_preset, inspect_checkpoint, require_modalities
from transfer.errors import TransferError
from transfer.manifest import Manifest, run_settings
from transfer.pipeline import (GenerationResult, GenerationSettings, ModelLimits, preflight, prepare_request,
                               resize_frames)
from transfer.specs import Request, check_name, load_batch, load_spec, parse_request
from transfer.step_cache import StepCacheConfig
from transfer.video_io import write_mp4, write_npz, write_text


def settings_from_args(args) -> GenerationSettings:
    return GenerationSettings(
        num_steps=args.num_steps, guidance=args.guidance,
        num_frames_per_chunk=args.num_frames_per_chunk, num_conditional_frames=args.num_conditional_frames,
        chunk_conditioning=args.chunk_conditioning,
    )


def transfer25_flags(args) -> dict:
    """The Transfer2.5 per-sample fields given as flags (they override every sample's), by field name."""
    from transfer.spec25 import FLAG_FIELDS

    given = getattr(args, "given", set())
    flags = {field: getattr(args, dest) for field, dest in FLAG_FIELDS.items() if dest in given}
    for field in ("prompt_path", "video_path"):
        if field in given:
            flags[field] = str(Path(getattr(args, field)).resolve())
    return flags


def transfer25_defaults(args) -> dict:
    """The checkpoint's own defaults (``transfer_defaults.json``) for the Transfer2.5 per-sample fields, by field name:
    they replace upstream's defaults; a sample's field or a flag overrides them."""
    from transfer.spec25 import FLAG_FIELDS

    own = getattr(args, "checkpoint_defaults", {})
    return {field: own[dest] for field, dest in FLAG_FIELDS.items() if dest in own}


def check_form_flags(args) -> None:
    """Flags of the cosmos-transfer2.5 form that this fork refuses, each with one line saying why."""
    if getattr(args, "benchmark", False):
        raise TransferError("--benchmark is not supported here: run benchmarks/*.py (side-by-side tables) or --trace")
    if getattr(args, "profile", False):
        raise TransferError("--profile is not supported here: --trace FILE writes a Perfetto trace of every stage")
    if getattr(args, "model", None) == "edge/distilled":
        raise TransferError("--model edge/distilled needs the distilled Transfer2.5 edge checkpoint (4 steps, no "
                            "guidance), which has no diffusers conversion this fork can load")
    if getattr(args, "input_files", None) and (args.controlnet_specs or args.batch_input_path):
        raise TransferError("give -i/--input-files (Transfer2.5 form) or --controlnet_specs / --batch_input_path "
                            "(transfer1 form), not both")
    given = getattr(args, "given", set())
    for dest in ("sigma_max", "image_context_path", "context_frame_index"):
        if dest in given:
            raise TransferError(f"--{dest} needs a model this fork does not have (docs/usage.md, Transfer2.5 flags)")
    if not getattr(args, "input_files", None):
        only25 = sorted(given & {"resolution", "keep_input_resolution", "show_input", "show_control_condition",
                                 "prompt_path", "video_path", "keep_going", "model", "output_dir"})
        if only25:
            raise TransferError(f"--{only25[0]} belongs to the Transfer2.5 form: give the specs with -i (docs/usage.md)")


def requests_from_args(args, failures: list | None = None) -> list[Request]:
    """The run's requests; for a batch with a ``failures`` list, bad lines land there instead of raising."""
    defaults = {k: getattr(args, k) for k in ("prompt", "negative_prompt", "input_video_path") if getattr(args, k)}
    defaults["seed"] = args.seed
    check_form_flags(args)
    if getattr(args, "input_files", None):
        from transfer.spec25 import load_inputs

        def transfer1(obj, where, base_dir):
            return parse_request(obj, where=where, name=Path(where.split(":")[0]).stem, defaults=defaults,
                                 base_dir=base_dir)

        requests = load_inputs(args.input_files, flags=transfer25_flags(args), defaults=transfer25_defaults(args),
                               chunk_conditioning=args.chunk_conditioning, parse_t1=transfer1)
        model = getattr(args, "model", None)
        for request in requests:
            other = sorted(set(request.controls) - {model}) if model else []
            if other:
                raise TransferError(f"{request.source} ({request.name}): control {other[0]!r} but --model {model}: drop "
                                    "--model to use every control the sample names")
        return requests
    from transfer.spec25 import parse_sample

    def transfer25(obj, where, base_dir):  # a Transfer2.5 sample given to the transfer1 flags: its fields, defaults
        return parse_sample(obj, where=where, base_dir=base_dir, flags={}, defaults=transfer25_defaults(args),
                            chunk_conditioning=args.chunk_conditioning)

    if args.batch_input_path:
        return load_batch(args.batch_input_path, defaults=defaults, base_spec=args.controlnet_specs, failures=failures,
                          parse_other=transfer25)
    if not args.controlnet_specs:
        raise TransferError("give --controlnet_specs SPEC.json or --batch_input_path BATCH.jsonl (transfer1 form), or "
                            "-i SPEC.json (Transfer2.5 form)")
    return [load_spec(args.controlnet_specs, name=check_name(args.video_save_name, "--video_save_name"),
                      defaults=defaults, parse_other=transfer25)]


#: Bound of ``--cpu_threads`` (a typo must not start a million threads).
MAX_CPU_THREADS = 256


def pin_cpu_threads(count: int) -> None:
    """``--cpu_threads``: a CPU process's torch threads are a setting, not the machine's core count (torch's default)
    or torchrun's ``OMP_NUM_THREADS=1``: matrix products split their sums by thread, so the thread count reaches
    the outputs' bits (one process with 2 threads vs 4 ranks with 1: latents 6e-6 apart, raw frames 1 level).
    Nothing to do on CUDA, whose kernels do not depend on it."""
    if not 1 <= count <= MAX_CPU_THREADS:
        raise TransferError(f"--cpu_threads must be in [1, {MAX_CPU_THREADS}], got {count}")
    if default_device().type == "cpu":
        torch.set_num_threads(count)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


#: ``--dtype`` choices and what they mean.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype_for(device: torch.device, choice: str = "auto") -> torch.dtype:
    """``--dtype``: ``auto`` is bf16 on CUDA, fp32 on CPU."""
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[choice]


def resolve_checkpoint(args) -> Path:
    if args.checkpoint_dir:
        return Path(args.checkpoint_dir)
    from transfer.tiny import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint(args.checkpoint_preset)


def checkpoint_info(args):
    """The run's checkpoint configs: a directory's (``--checkpoint_dir``, or the embedded tiny one), or with
    ``--random_weights`` the ``--checkpoint_preset``'s, whose models are then built with random weights."""
    if not getattr(args, "random_weights", False):
        return inspect_checkpoint(resolve_checkpoint(args))
    if args.checkpoint_dir:
        raise TransferError("--random_weights builds the --checkpoint_preset's models from their configs: "
                            "drop --checkpoint_dir")
    from configs.models import preset

    return info_from_preset(preset(args.checkpoint_preset))


OUTPUT_SUFFIXES = (".mp4", ".txt", ".npz", ".json")
BLOCKED_SUFFIX = ".blocked.json"


def write_outputs(folder: Path, request: Request, result: GenerationResult, fps: float, save_raw: bool,
                  prepared=None) -> list[Path]:
    """Write ``{name}.txt``, optionally ``{name}.npz``, then ``{name}.mp4``; each atomically; return them, the mp4
    last. A record of an earlier run's block of this name goes: one name, one state.

    Transfer2.5 layout (``prepared`` given: the request's decoded inputs): also ``{name}.json`` (the resolved
    arguments), ``{name}_control_{key}.mp4`` per control and ``{name}_mask_{key}.mp4`` per mask, as upstream writes
    them; ``show_input`` / ``show_control_condition`` put the input / the controls left of the output."""
    frames = result.frames
    paths = [folder / f"{request.name}.txt"]
    write_text(paths[-1], request.prompt + "\n")
    if prepared is not None:
        paths.append(folder / f"{request.name}.json")
        write_text(paths[-1], json.dumps(request.record, indent=2, sort_keys=True) + "\n")
        height, width = frames.shape[1:3]
        for modality, control in prepared.controls.items():
            paths.append(folder / f"{request.name}_control_{modality}.mp4")
            write_mp4(paths[-1], resize_frames(control, height, width), fps)
        for modality, mask in (prepared.masks or {}).items():
            paths.append(folder / f"{request.name}_mask_{modality}.mp4")
            write_mp4(paths[-1], np.repeat(resize_frames(mask * 255, height, width)[..., None], 3, axis=-1), fps)
        shown = [prepared.input_frames] if prepared.input_frames is not None else []
        if "control" in request.show:
            shown += list(prepared.controls.values())
        if shown:
            frames = np.concatenate([*(resize_frames(v, height, width) for v in shown), frames], axis=2)
    if save_raw:  # no latents when a video guard altered the frames: they would give back what it hid
        raw = {"frames": frames} if result.latents is None else {"frames": frames, "latents": result.latents.numpy().astype("float32")}
        paths.append(folder / f"{request.name}.npz")
        write_npz(paths[-1], **raw)
    paths.append(folder / f"{request.name}.mp4")
    write_mp4(paths[-1], frames, fps)
    (folder / f"{request.name}{BLOCKED_SUFFIX}").unlink(missing_ok=True)
    return paths


def write_blocked(folder: Path, request: Request, blocked) -> Path:
    """``{name}.blocked.json`` (which guard, why) instead of any output; earlier outputs of this name go."""
    path = folder / f"{request.name}{BLOCKED_SUFFIX}"
    record = {"name": request.name, "source": request.source, "stage": blocked.stage, "guard": blocked.guard,
              "reason": blocked.reason}
    write_text(path, json.dumps(record, indent=2) + "\n")
    for suffix in OUTPUT_SUFFIXES:
        (folder / f"{request.name}{suffix}").unlink(missing_ok=True)
    for extra in (*folder.glob(f"{request.name}_control_*.mp4"), *folder.glob(f"{request.name}_mask_*.mp4")):
        extra.unlink(missing_ok=True)
    return path


class RunRecord:
    """Transfer2.5 layout's per-run files: ``config.yaml`` (the run's resolved setup) and ``console.log`` (this
    process's log lines, without times), written into the output folder when the run ends -- never into a folder the
    run did not create or hold (a refused run writes nothing). ``console.log`` is a log: in a multi-process run the
    order of lines about different requests follows when their chunks finish."""

    def __init__(self, args, folder: Path):
        self.args, self.folder, self.lines = args, folder, []
        self.sink = logger.add(self.lines.append, level="INFO", format="{level: <7} | {message}", colorize=False)

    def config(self) -> str:
        import yaml

        def plain(v):
            return sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v

        return yaml.safe_dump({k: plain(v) for k, v in sorted(vars(self.args).items()) if k != "given"}, sort_keys=True)

    def finish(self) -> None:
        logger.remove(self.sink)
        if self.folder.is_dir() and any(self.folder.iterdir()):
            write_text(self.folder / "config.yaml", self.config())
            write_text(self.folder / "console.log", "".join(str(line) for line in self.lines))


def make_gate(args, job: "Job", notify=None, guards=None):
    """The output gate for this run's ``--guardrail`` mode, with ``guards`` or the ones the options ask for
    (built here: call on the rank that writes). Each finished request is entered in the job's manifest."""
    from guardrails import build_guards, guard_mode
    from guardrails.gate import Gate

    folder = Path(args.video_save_folder)
    mode = guard_mode(args)
    custom = guards is not None
    if guards is None:
        guards = build_guards(args, device=str(default_device()))
    if getattr(args, "random_weights", False):
        logger.warning(f"--random_weights: every output of this run is made with random {args.checkpoint_preset} weights "
                       "(recorded in manifest.json): time and memory are real, the pictures are not")
    dtype = str(dtype_for(default_device(), job.dtype)).removeprefix("torch.")
    job.manifest.shared = run_settings(args, job, guards.names if custom else None, dtype)

    layout25 = getattr(args, "form", "transfer1") == "transfer2.5"
    if layout25:
        job.run_record = RunRecord(args, folder)

    def write(request, result):
        # decoded again (the coordinator keeps no inputs; computed controls come from their lossless cache)
        prepared = prepare_request(request, job.limits, job.controls, log=False) if layout25 else None
        paths = write_outputs(folder, request, result, args.fps, args.save_raw, prepared)
        job.manifest.record(request, job.controls, "written", paths)
        return paths[-1]

    def block(request, blocked):
        path = write_blocked(folder, request, blocked)
        job.manifest.record(request, job.controls, "blocked", [path])
        return path

    return Gate(guards, mode, write=write, write_blocked=block, notify=notify)


@dataclass
class Job:
    """Everything a run needs, validated before any model loads."""

    info: object
    limits: ModelLimits
    settings: GenerationSettings
    requests: list[Request]
    controls: object = None
    """``preprocessors.ControlMaker`` for controls without ``input_control``."""
    failures: "Failures | None" = None
    """Batch requests refused (a bad line, a bad video): recorded, the rest runs."""
    batch: bool = False
    """A batch records a failing request and goes on; a single request's failure fails the run."""
    manifest: Manifest | None = None
    """The output folder's record of finished requests (resume)."""
    compile: str = "none"
    """``--compile``: none, torch or tensorrt (``transfer.acceleration``)."""
    offload: str = "none"
    """``--offload`` (or an upstream ``--offload_*`` flag): none or stages."""
    attention: str = "auto"
    """``--attention_backend`` (``transfer.acceleration``)."""
    step_cache: StepCacheConfig = StepCacheConfig()
    """``--step_cache`` and its settings (``transfer.step_cache``)."""
    residency: object = None
    """``transfer.residency.Residency`` of the loaded stages (None until models load)."""
    dtype: str = "auto"
    """``--dtype``: auto, bf16, fp16 or fp32 (``dtype_for``)."""
    run_record: RunRecord | None = None
    """Transfer2.5 layout: ``config.yaml`` and ``console.log`` (set by ``make_gate`` on the rank that writes)."""

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
                if not self.batch:
                    raise
                self.failures.add(request, e)
        summary = self.manifest.summary()
        if summary:
            logger.info(summary)
        return todo

    def prepare(self, request, log: bool = True):
        """``request``'s checked inputs, or None (and a failure record) when a batch request cannot run."""
        try:
            return prepare_request(request, self.limits, self.controls, log)
        except TransferError as e:
            if not self.batch:
                raise
            self.failures.add(request, e)
            return None


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


def plan_job(args) -> Job:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.num_gpus is not None and args.num_gpus != world:
        raise TransferError(f"--num_gpus {args.num_gpus} does not match the {world} process(es) started (WORLD_SIZE)")
    cp = getattr(args, "context_parallel_size", None)
    if cp is not None and not 1 <= cp <= world:
        raise TransferError(f"--context_parallel_size {cp} must be between 1 and the {world} process(es) started")
    if args.fps <= 0:
        raise TransferError(f"--fps must be positive, got {args.fps}")
    check_output_folder(Path(args.video_save_folder))
    bad_lines: list[dict] = []
    requests = requests_from_args(args, bad_lines)
    info = checkpoint_info(args)
    if args.max_frames < 1 or args.max_resolution < 16:
        raise TransferError("--max_frames must be at least 1 and --max_resolution at least 16")
    limits = replace(ModelLimits.from_info(info), max_frames=args.max_frames, max_side=args.max_resolution)
    settings = settings_from_args(args)
    limits.check_settings(settings)
    check_guard_args(args)
    failures = Failures(args.video_save_folder, bad_lines)
    batch = bool(args.batch_input_path) or (getattr(args, "form", "") == "transfer2.5" and args.keep_going is not False)
    usable, sizes = [], set()
    for request in requests:
        try:
            require_modalities(info, request.controls, request.source)
            sizes.add(preflight(request, limits))
            if request.settings is None:
                request.settings = settings
            else:  # a Transfer2.5 sample's own chunking and steps
                limits.check_settings(request.settings, f"{request.source} ({request.name}): ")
            usable.append(request)
        except TransferError as e:
            if not batch:
                raise
            failures.add(request, e, write=False)
    if not usable:
        raise TransferError(f"no request can run: {located(failures.records[0]['source'], failures.records[0]['error'])}")
    declared = (getattr(args, "checkpoint_defaults", None) or {}).get("resolution")
    declared = str(declared) if str(declared).isdigit() else None  # e.g. "64"; a form like "720p" declares nothing
    other = sorted(f"{w}x{h}" for h, w in sizes if declared is not None and min(h, w) != int(declared))
    if other and int(os.environ.get("RANK", "0")) == 0:  # once per run, not once per rank
        logger.warning(f"the checkpoint declares resolution {declared} (the size it was trained at); generating at "
                       f"{', '.join(other)}, which it has not seen: expect worse results")
    check_acceleration(args)
    return Job(info, limits, settings, usable, control_maker(args, info, usable), failures, batch,
               Manifest(args.video_save_folder, args.overwrite), args.compile, offload_mode(args),
               dtype=getattr(args, "dtype", "auto"), attention=getattr(args, "attention_backend", "auto"),
               step_cache=step_cache_from_args(args))


def step_cache_from_args(args) -> StepCacheConfig:
    """``--step_cache`` and its settings, checked (one error line for a bad value)."""
    method = getattr(args, "step_cache", "off")
    if method == "off":
        return StepCacheConfig()
    threshold, interval, warmup = args.step_cache_threshold, args.step_cache_interval, args.step_cache_warmup
    if not threshold > 0:
        raise TransferError(f"--step_cache_threshold must be above 0, got {threshold}")
    if interval < 2:
        raise TransferError(f"--step_cache_interval must be at least 2 (1 computes every step), got {interval}")
    if warmup < 2:
        raise TransferError(f"--step_cache_warmup must be at least 2 (a prediction needs computed steps), got {warmup}")
    return StepCacheConfig(method, threshold, interval, warmup)


def control_maker(args, info, requests):
    """The preprocessors for controls the specs leave out (weights checked now, loaded on first use)."""
    from preprocessors import ControlMaker, options_from_args

    options = options_from_args(args)
    if options["model_dir"] is None and info.root is not None and (Path(info.root) / "preprocessors").is_dir():
        options["model_dir"] = str(Path(info.root) / "preprocessors")  # weights shipped beside the checkpoint
    maker = ControlMaker(Path(args.video_save_folder), options)
    maker.check(sorted({m for r in requests for m in maker.needs(r)}))  # weights checked before anything loads
    return maker
