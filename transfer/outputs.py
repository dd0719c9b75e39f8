"""What a run writes: each request's files (``write_outputs``: both layouts, atomically; ``write_blocked``), the
Transfer2.5 layout's per-run files (``RunRecord``) and the output gate that guards, writes and records each finished
request in the manifest (``make_gate``). Single process and coordinator alike write only through here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from loguru import logger

from transfer.device import default_device, dtype_for
from transfer.manifest import run_settings
from transfer.chunks import GenerationResult
from transfer.prepare import prepare_request, resize_frames
from transfer.specs import Request
from transfer.video_io import write_mp4, write_npz, write_text


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

    def __init__(self, record: dict, folder: Path):
        self.record, self.folder, self.lines = record, folder, []
        self.sink = logger.add(self.lines.append, level="INFO", format="{level: <7} | {message}", colorize=False)

    def config(self) -> str:
        import yaml

        return yaml.safe_dump(dict(self.record), sort_keys=True)

    def finish(self) -> None:
        logger.remove(self.sink)
        if self.folder.is_dir() and any(self.folder.iterdir()):
            write_text(self.folder / "config.yaml", self.config())
            write_text(self.folder / "console.log", "".join(str(line) for line in self.lines))


def make_gate(job, notify=None, guards=None):
    """The output gate for ``job``'s (``transfer.job.Job``) ``--guardrail`` mode, with ``guards`` or the ones the options ask for
    (built here: call on the rank that writes). Each finished request is entered in the job's manifest."""
    from guardrails import build_guards
    from guardrails.gate import Gate

    config = job.config
    out = config.output
    custom = guards is not None
    if guards is None:
        guards = build_guards(config.guard, device=str(default_device()))
    if config.checkpoint.random_weights:
        logger.warning(f"--random_weights: every output of this run is made with random {config.checkpoint.preset} "
                       "weights (recorded in manifest.json): time and memory are real, the pictures are not")
    dtype = str(dtype_for(default_device(), config.runtime.dtype)).removeprefix("torch.")
    job.manifest.shared = run_settings(config, job, guards.names if custom else None, dtype)

    layout25 = out.layout == "transfer2.5"
    if layout25:
        job.run_record = RunRecord(config.record, out.folder)

    def write(request, result):
        # decoded again (the coordinator keeps no inputs; computed controls come from their lossless cache)
        prepared = prepare_request(request, job.limits, job.controls, log=False) if layout25 else None
        paths = write_outputs(out.folder, request, result, out.fps, out.save_raw, prepared)
        job.manifest.record(request, job.controls, "written", paths)
        return paths[-1]

    def block(request, blocked):
        path = write_blocked(out.folder, request, blocked)
        job.manifest.record(request, job.controls, "blocked", [path])
        return path

    return Gate(guards, config.guard.mode, write=write, write_blocked=block, notify=notify)
