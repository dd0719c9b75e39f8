"""cosmos-transfer2.5 samples (``-i SPEC.json|.jsonl ...``) into the project's one ``Request`` model.

Read from nvidia-cosmos/cosmos-transfer2.5 (``cosmos_transfer2/config.py``, ``examples/inference.py``): a sample has a
required ``name`` (unique in the run), ``prompt`` or ``prompt_path``, ``video_path``, per-sample generation fields
and control blocks (``edge``, ``depth``, ``vis``, ``seg``; ``keypoint`` is this fork's addition) with
``control_path`` (computed when missing), ``control_weight`` (0-1), ``mask_path``, ``mask_prompt`` and the
preprocessor extras. Relative paths resolve against the spec file's folder; unknown keys are refused. A flag given on
the command line overrides the field in every sample; a field missing in both takes upstream's default
(``DEFAULTS``). Every error is one line naming the file (and line), the sample and the key.
"""

from __future__ import annotations

import os
from pathlib import Path

from configs.controls import BY_NAME, SPEC_EXTRAS, UPSTREAM_CONTROLS
from transfer.config import FORM_DEFAULTS, GenerationSettings
from transfer.errors import TransferError
from transfer.specs import (
    COSMOS3_FIELDS, DEFAULT_NEGATIVE_PROMPT, REQUEST_CONTROLS, T1_ONLY, T25_ONLY, ControlSpec, Request, _load_json,
    _weight, check_name, cosmos3_fields, given_only, hint_keys, parse_json, spec_form,
)

#: Upstream's per-sample defaults (``cosmos_transfer2/config.py``): the form's own (``transfer.config.FORM_DEFAULTS``)
#: over the generation defaults both forms share.
DEFAULTS = {"guidance": GenerationSettings.guidance, "num_steps": GenerationSettings.num_steps,
            "num_video_frames_per_chunk": GenerationSettings.num_frames_per_chunk,
            "num_conditional_frames": GenerationSettings.num_conditional_frames, "resolution": "720",
            "keep_input_resolution": True, **FORM_DEFAULTS["transfer2.5"]}
#: Per-sample fields that a flag of the same name overrides (the flag's ``dest``: this fork's name where it differs).
FLAG_FIELDS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "seed": "seed", "guidance": "guidance",
               "num_steps": "num_steps", "num_video_frames_per_chunk": "num_frames_per_chunk",
               "num_conditional_frames": "num_conditional_frames", "resolution": "resolution",
               "keep_input_resolution": "keep_input_resolution", "show_control_condition": "show_control_condition",
               "show_input": "show_input", "sigma_max": "sigma_max", "context_frame_index": "context_frame_index",
               "image_context_path": "image_context_path"}
SAMPLE_FIELDS = ("name", "prompt", "negative_prompt", "seed", *T25_ONLY)
CONTROL_FIELDS = ("control_path", "control_weight", "mask_path", "mask_prompt")


def _path(value, base_dir: Path, where: str, key: str) -> Path:
    if not isinstance(value, str) or not value or "\x00" in value:
        raise TransferError(f"{where}: {key} must be a non-empty path string")
    p = Path(value).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else base_dir / p))  # upstream: relative to the spec's folder


def _int(value, where: str, key: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise TransferError(f"{where}: {key} must be a whole number {bound}, got {value!r}")
    return value


def _bool(value, where: str, key: str) -> bool:
    if not isinstance(value, bool):
        raise TransferError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def parse_sample(obj: dict, *, where: str, base_dir: Path, flags: dict, chunk_conditioning: str = "roundtrip",
                 names: set | None = None, defaults: dict | None = None) -> Request:
    """One Transfer2.5 sample; ``flags``: the per-sample fields given on the command line (override the sample's);
    ``names``: the names taken so far in this run (a duplicate is refused); ``defaults``: the checkpoint's own
    defaults for some fields (they replace ``DEFAULTS``; the sample's fields override them)."""
    import importlib

    if not isinstance(obj, dict):
        raise TransferError(f"{where}: a sample must be a JSON object, got {type(obj).__name__}")
    spec_form(obj, where)  # refuses a sample mixing in cosmos-transfer1 keys, naming the key
    obj = hint_keys(obj, where)
    name = obj.get("name")
    if name is None:
        raise TransferError(f"{where}: the sample has no 'name' (required: it names the output files)")
    name = check_name(name, f"{where}: name")
    where = f"{where} ({name})"
    if names is not None:
        if name in names:
            raise TransferError(f"{where}: name {name!r} is used by an earlier sample (names must be unique)")
        names.add(name)
    for key in obj:
        if key not in SAMPLE_FIELDS and key not in REQUEST_CONTROLS and key not in COSMOS3_FIELDS:
            hint = " (a cosmos-transfer1 key)" if key in T1_ONLY else ""
            raise TransferError(f"{where}: unknown key {key!r}{hint} (fields: {', '.join(SAMPLE_FIELDS)}; controls: "
                                f"{', '.join(UPSTREAM_CONTROLS)}; Cosmos 3: blur, wsm, {', '.join(COSMOS3_FIELDS)})")
    values = {**DEFAULTS, **(defaults or {}), **{k: v for k, v in obj.items() if v is not None}, **flags}

    for key, what in (("sigma_max", "partial denoising from the input video (SDEdit)"),
                      ("image_context_path", "an image encoder for the image context"),
                      ("context_frame_index", "an image encoder for the image context")):
        if values.get(key) is not None:
            raise TransferError(f"{where}: {key} needs {what}, which this fork does not have: remove it")

    prompt = values.get("prompt")
    if prompt is None and "prompt_path" in values:
        path = _path(values["prompt_path"], base_dir, where, "prompt_path")
        if not path.is_file():
            raise TransferError(f"{where}: prompt_path not found: {path}")
        prompt = path.read_text(errors="replace").strip()
    if not isinstance(prompt, str) or not prompt.strip():
        raise TransferError(f"{where}: a non-empty 'prompt' or 'prompt_path' is required")
    negative = values.get("negative_prompt", DEFAULT_NEGATIVE_PROMPT)
    if not isinstance(negative, str):
        raise TransferError(f"{where}: negative_prompt must be a string")
    seed = _int(values["seed"], where, "seed", 0, 2**63 - 1)
    guidance = _int(values["guidance"], where, "guidance", 0, 7)
    resolution = values["resolution"]
    if isinstance(resolution, int) and not isinstance(resolution, bool):
        resolution = str(resolution)
    if not isinstance(resolution, str) or not resolution.isdigit() or int(resolution) < 16:
        raise TransferError(f"{where}: resolution must be a height in pixels such as \"720\" or \"480\", got {resolution!r}")
    settings = GenerationSettings(
        num_steps=_int(values["num_steps"], where, "num_steps", 1),
        guidance=float(guidance),
        num_frames_per_chunk=_int(values["num_video_frames_per_chunk"], where, "num_video_frames_per_chunk", 1),
        num_conditional_frames=_int(values["num_conditional_frames"], where, "num_conditional_frames", 0, 2),
        chunk_conditioning=chunk_conditioning,
    )
    video = None if values.get("video_path") is None else _path(values["video_path"], base_dir, where, "video_path")
    max_frames = None if values.get("max_frames") is None else _int(values["max_frames"], where, "max_frames", 1)
    show = tuple(k for k, flag in (("input", "show_input"), ("control", "show_control_condition"))
                 if _bool(values.get(flag, False), where, flag))

    controls = {}
    for key in REQUEST_CONTROLS:
        block = obj.get(key)
        if block is None:
            continue
        if not isinstance(block, dict):
            raise TransferError(f"{where}: control {key!r} must be an object with control_path / control_weight")
        for field in block:
            if field not in CONTROL_FIELDS and SPEC_EXTRAS.get(field) != key:
                known = [*CONTROL_FIELDS, *(BY_NAME[key].spec_extras if key in BY_NAME else ())]
                raise TransferError(f"{where}: control {key!r}: unknown key {field!r} (known: {', '.join(known)})")
        preset, extra = None, BY_NAME[key].preset_extra if key in BY_NAME else None
        if extra in block:  # checked against the preprocessor's own presets
            preset, presets = block[extra], importlib.import_module(BY_NAME[key].preprocessor).PRESETS
            if preset not in presets:
                raise TransferError(f"{where}: {key}.{extra} must be one of {', '.join(presets)}, got {preset!r}")
        mask_prompt = block.get("mask_prompt")
        for text_key in ("mask_prompt", "control_prompt"):
            text = block.get(text_key)
            if text is not None and (not isinstance(text, str) or not text.strip()):
                raise TransferError(f"{where}: {key}.{text_key} must be a non-empty string")
        controls[key] = ControlSpec(
            modality=key,
            weight=_weight(block.get("control_weight", 1.0), where, key, upper=1.0),
            input_control=None if block.get("control_path") is None
            else _path(block["control_path"], base_dir, where, f"{key}.control_path"),
            prompt=block.get("control_prompt"),
            mask_path=None if block.get("mask_path") is None else _path(block["mask_path"], base_dir, where, f"{key}.mask_path"),
            mask_prompt=mask_prompt,
            preset=preset,
        )
    if not controls:
        raise TransferError(f"{where}: the sample names no control (one of {', '.join(UPSTREAM_CONTROLS)})")
    missing = [m for m, c in controls.items() if c.input_control is None]
    given_only(controls, where, "control_path")
    if video is None and missing:
        raise TransferError(f"{where}: control {missing[0]!r} has no control_path and there is no video_path to compute it from")
    needs_video = [m for m, c in controls.items() if c.mask_prompt is not None]
    if video is None and needs_video:
        raise TransferError(f"{where}: control {needs_video[0]!r} has a mask_prompt but there is no video_path to segment")

    cosmos3 = cosmos3_fields(obj, where)
    record = {"name": name, "prompt": prompt, "negative_prompt": negative, "seed": seed, "guidance": guidance,
              "num_steps": settings.num_steps, "num_video_frames_per_chunk": settings.num_frames_per_chunk,
              "num_conditional_frames": settings.num_conditional_frames, "resolution": resolution,
              "keep_input_resolution": bool(values["keep_input_resolution"]), "max_frames": max_frames,
              "video_path": None if video is None else str(video), "show_input": "input" in show,
              "show_control_condition": "control" in show, "chunk_conditioning": chunk_conditioning,
              **{m: {"control_path": None if c.input_control is None else str(c.input_control),
                     "control_weight": c.weight,
                     **({"mask_path": str(c.mask_path)} if c.mask_path else {}),
                     **({"mask_prompt": c.mask_prompt} if c.mask_prompt else {}),
                     **({"preset": c.preset} if c.preset else {}),
                     **({"control_prompt": c.prompt} if c.prompt else {})} for m, c in controls.items()}}
    return Request(name=name, prompt=prompt, negative_prompt=negative, input_video_path=video, controls=controls,
                   seed=seed, source=where.rsplit(" (", 1)[0], form="transfer2.5", settings=settings,
                   resolution=int(resolution), keep_input_resolution=_bool(values["keep_input_resolution"], where,
                                                                            "keep_input_resolution"),
                   max_frames=max_frames, show=show, record={**record, **cosmos3}, cosmos3=cosmos3)


def load_inputs(paths: list[str], *, flags: dict, chunk_conditioning: str, parse_t1=None,
                defaults: dict | None = None) -> list[Request]:
    """Every sample of the ``-i`` files, in order (a ``.json`` holds one sample, a ``.jsonl`` one per line). A
    sample written in cosmos-transfer1 format (recognised from its keys) goes to ``parse_t1(obj, where, base_dir)``."""
    requests, names = [], set()
    for raw in paths:
        path = Path(raw)
        if path.suffix not in (".json", ".jsonl"):
            raise TransferError(f"-i {path}: an input file must be .json (one sample) or .jsonl (one sample a line)")
        if path.suffix == ".json":
            items = [(str(path), _load_json(path, "input file"))]
        else:
            if not path.is_file():
                raise TransferError(f"input file not found: {path}")
            try:
                lines = path.read_text().splitlines()
            except UnicodeDecodeError as e:
                raise TransferError(f"input file {path} is not UTF-8 text: {e}") from None
            items = [(f"{path}:{n}", parse_json(line, f"{path}:{n}")) for n, line in enumerate(lines, 1) if line.strip()]
        for where, obj in items:
            if isinstance(obj, dict) and spec_form(obj, where) == "transfer1" and parse_t1 is not None:
                request = parse_t1(obj, where, path.parent)
                if request.name in names:
                    raise TransferError(f"{where}: name {request.name!r} is used by an earlier sample")
                names.add(request.name)
            else:
                request = parse_sample(obj, where=where, base_dir=path.parent, flags=flags, defaults=defaults,
                                       chunk_conditioning=chunk_conditioning, names=names)
            requests.append(request)
    if not requests:
        raise TransferError(f"no samples in {', '.join(paths)}")
    return requests
