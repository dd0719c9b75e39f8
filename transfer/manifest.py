"""Resume: ``{folder}/manifest.json`` records each finished request -- the settings it was made with and the
size and SHA-256 of every file it wrote -- so rerunning a command skips what is complete and redoes the rest.

::

    {"version": 1,
     "requests": {"video_0": {"state": "written",            # or "blocked" (NAME.blocked.json)
                              "settings_digest": "3f2a...",
                              "settings": {"prompt": ..., "seed": 1, "input_video": "<sha256>", "controls": {...},
                                           "generation": {...}, "checkpoint": "<sha256>", "fps": 24, ...},
                              "files": {"video_0.txt": {"bytes": 31, "sha256": "..."}, "video_0.mp4": {...}}}}}

The manifest itself is a function of the requests and their outputs (keys sorted, no time stamps): an interrupted
and resumed run leaves the same bytes as an uninterrupted one.

A request's outputs are written atomically, then its entry (the manifest itself is rewritten atomically), so an
entry never names an unfinished file. On a rerun a request is

- **complete** (skipped): its entry has this run's settings and every file it lists has the recorded size and checksum;
- **to do**: no entry, or a listed file is missing or differs (a kill between the outputs and the entry, a file
  edited or truncated since): generated again, each file replaced atomically;
- **refused**: complete, but made with other settings -- a batch records it in ``failures.jsonl``, a single spec
  fails -- unless ``--overwrite``, which regenerates it under the new settings.

Settings are what decides the output bytes: the prompts, seed, the *contents* of the input and control videos
(SHA-256, so moving a file does not count as a change), control weights and preprocessor settings, the generation
flags, the checkpoint (its config files and weight file sizes), ``--fps``, ``--save_raw`` and the guard settings.
Not the placement or ``--num_gpus``: stage processes give the single-process result bit for bit.

The writer holds an exclusive ``flock`` on the output folder for the run, so a second run into the same folder
fails at once instead of racing on the manifest; under that lock, temp files a killed run left (``.NAME.*.tmp.EXT``)
are removed -- only those whose writer's lock can be taken (``video_io.remove_stale_temp_files``), so a file that
another rank of this run, or any live process, is writing is never touched.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
from dataclasses import asdict
from pathlib import Path

from loguru import logger

from transfer.errors import TransferError
from transfer.video_io import file_digest, remove_stale_temp_files, write_text

MANIFEST_NAME = "manifest.json"
VERSION = 1


def digest_of(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def folder_digest(root: Path | None) -> str | None:
    """Identity of a model folder: the contents of its small files (configs, tokenizers) and the names and sizes
    of its big ones (weights are not read: a checkpoint is gigabytes)."""
    if root is None:
        return None
    h = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        size = path.stat().st_size
        h.update(f"{path.relative_to(root)}\0{size}\0".encode())
        if size <= 1 << 20:
            h.update(path.read_bytes())
    return h.hexdigest()


def run_settings(config, job, guard_names: list[str] | None = None, dtype: str | None = None) -> dict:
    """The settings every request of this run (``config``: ``transfer.config.RunConfig``) shares; ``dtype``: the
    resolved ``--dtype`` (bf16, fp16, fp32)."""
    guard, runtime = config.guard, config.runtime
    guards = {"checked": False}
    if guard.mode != "off":  # on and async run the same checks on the same frames
        from guardrails.blocklist import DATA

        lists = [DATA / "blocklist.txt", DATA / "allowlist.txt", *guard.blocklist, *guard.allowlist]
        guards = {"checked": True, "lists": [file_digest(p) for p in lists],
                  "guard_model": folder_digest(guard.guard_model) if guard.guard_model else None,
                  "cosmos": folder_digest(guard.cosmos_guardrail_dir) if guard.cosmos_guardrail_dir else None,
                  "faces": [guard.face_min_size, guard.face_confidence] if guard.face_pixelation else None}
        if guard_names is not None:  # guards handed to runner.run by a program
            guards["names"] = guard_names
    return {"generation": asdict(config.generation), "checkpoint": folder_digest(job.info.root),
            "fps": float(config.output.fps), "save_raw": bool(config.output.save_raw), "guardrails": guards,
            "dtype": dtype, "random_weights": config.checkpoint.preset if config.checkpoint.random_weights else None,
            **({} if runtime.step_cache.method == "off" else {"step_cache": asdict(runtime.step_cache)}),
            **({} if runtime.attention in ("auto", "native") else {"attention_backend": runtime.attention}),
            **({} if runtime.cpu_threads == 1 else {"cpu_threads": runtime.cpu_threads})}


def request_settings(request, controls, shared: dict) -> dict:
    """What decides ``request``'s outputs; ``controls`` is the run's ``preprocessors.ControlMaker``."""
    spec = {}
    for modality, control in sorted(request.controls.items()):
        if control.input_control is None:
            spec[modality] = {"weight": float(control.weight), "computed": controls.preprocessor(modality).key(request)}
        else:
            spec[modality] = {"weight": float(control.weight), "input_control": file_digest(control.input_control)}
        if control.weight_map is not None:
            spec[modality]["weight_map"] = file_digest(control.weight_map)
        if control.mask_path is not None:
            spec[modality]["mask"] = file_digest(control.mask_path)
        if control.mask_prompt is not None:
            spec[modality]["mask_prompt"] = control.mask_prompt
    video = None if request.input_video_path is None else file_digest(request.input_video_path)
    entry = {"prompt": request.prompt, "negative_prompt": request.negative_prompt, "seed": request.seed,
             "input_video": video, "controls": spec, **shared}
    if request.settings is not None:  # a Transfer2.5 sample's own steps, guidance and chunking
        entry["generation"] = asdict(request.settings)
    if request.cosmos3:
        entry["cosmos3"] = dict(request.cosmos3)
    if request.form == "transfer2.5":
        entry["transfer2.5"] = {k: request.record.get(k) for k in ("resolution", "keep_input_resolution", "max_frames",
                                                                   "show_input", "show_control_condition")}
    return entry


def differences(old, new, prefix: str = "") -> list[str]:
    """``key: old -> new`` for each leaf that differs (nested keys dotted)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    if old == new:
        return []

    def short(v):
        text = json.dumps(v)
        return text if len(text) <= 40 else text[:37] + "..."

    return [f"{prefix.rstrip('.')}: {short(old)} -> {short(new)}"]


class Manifest:
    """The output folder's record of finished requests (read on every rank, written by the one that writes)."""

    def __init__(self, folder: str | Path, overwrite: bool = False):
        self.folder = Path(folder)
        self.path = self.folder / MANIFEST_NAME
        self.overwrite = overwrite
        self.entries = self._read()
        self.shared: dict | None = None
        """``run_settings`` of this run (set by the writer before checking requests)."""
        self.settings: dict[str, dict] = {}
        self.skipped: list[str] = []
        self._lock = threading.Lock()
        self._folder_fd: int | None = None

    def _read(self) -> dict:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TransferError(f"cannot read {self.path}: {type(e).__name__}: {e}; move it away to start the folder over") from None
        entries = data.get("requests") if isinstance(data, dict) else None
        if not isinstance(entries, dict) or data.get("version") != VERSION or not all(
                isinstance(e, dict) and isinstance(e.get("files"), dict) for e in entries.values()):
            raise TransferError(f"{self.path} is not a version {VERSION} transfer.py manifest; move it away to start the folder over")
        return entries

    def hold_folder(self) -> None:
        """Take the folder for this run (a second run into it fails now) and remove temp files a killed run left."""
        if self._folder_fd is not None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TransferError(f"another run is writing to {self.folder}: wait for it, or give another --video_save_folder") from None
        except OSError as e:  # a file system without flock (some network mounts): go on unguarded
            logger.warning(f"cannot lock {self.folder} ({e}); do not start two runs into it")
        self._folder_fd = fd  # held until the process exits (released by the kernel even on SIGKILL)
        for name in remove_stale_temp_files(self.folder):
            logger.warning(f"removing {name}, left by an interrupted run")

    def release_folder(self) -> None:
        """Let another run into the folder (a process's exit does this too)."""
        if self._folder_fd is not None:
            os.close(self._folder_fd)
            self._folder_fd = None

    def settings_of(self, request, controls) -> dict:
        if request.name not in self.settings:
            self.settings[request.name] = request_settings(request, controls, self.shared)
        return self.settings[request.name]

    def problem(self, entry: dict) -> str | None:
        """Why ``entry``'s files are not all there as recorded; None when they are."""
        for name, want in entry["files"].items():
            path = self.folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != want.get("bytes") or file_digest(path, cached=False) != want.get("sha256"):
                return f"{name} differs from the one recorded in {MANIFEST_NAME} (incomplete or changed)"
        return None

    def needs_run(self, request, controls) -> bool:
        """False when ``request`` is complete from an earlier run (skip it); ``TransferError`` when complete with
        other settings and not ``--overwrite``."""
        entry = self.entries.get(request.name)
        if entry is None:
            return True
        try:
            settings = self.settings_of(request, controls)
        except OSError:
            return True  # an input is unreadable: preparing the request reports it
        problem = self.problem(entry)
        if problem is not None:
            logger.info(f"{request.name}: redoing: {problem}")
            return True
        if entry.get("settings_digest") == digest_of(settings):
            logger.info(f"{request.name}: complete from an earlier run ({MANIFEST_NAME}), skipped")
            self.skipped.append(request.name)
            return False
        changed = "; ".join(differences(entry.get("settings", {}), settings)[:4]) or "settings differ"
        if self.overwrite:
            logger.info(f"{request.name}: replacing outputs made with other settings ({changed}) (--overwrite)")
            return True
        raise TransferError(f"{request.name}: {self.folder} holds its outputs made with other settings ({changed}); "
                            "pass --overwrite to replace them, or give another --video_save_folder")

    def record(self, request, controls, state: str, paths: list[Path]) -> None:
        """Enter ``request`` as finished (``written`` or ``blocked``) with its files; rewrites the manifest."""
        settings = self.settings_of(request, controls)
        files = {p.name: {"bytes": p.stat().st_size, "sha256": file_digest(p, cached=False)} for p in paths}
        entry = {"state": state, "settings_digest": digest_of(settings), "settings": settings, "files": files}
        with self._lock:
            self.entries[request.name] = entry
            write_text(self.path, json.dumps({"version": VERSION, "requests": self.entries}, indent=1, sort_keys=True) + "\n")

    def summary(self) -> str | None:
        if self.skipped:
            return f"{len(self.skipped)} request(s) complete from an earlier run, skipped: {', '.join(self.skipped)}"
        return None
