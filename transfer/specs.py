"""Requests: cosmos-transfer1 and cosmos-transfer2.5 spec files, parsed and validated up front into one model.

A cosmos-transfer1 spec (``--controlnet_specs``, ``--batch_input_path``)::

    {"prompt": "...", "negative_prompt": "...", "input_video_path": "in.mp4",
     "edge": {"control_weight": 0.7, "input_control": "edge.mp4"},
     "vis": {"control_weight": 0.3}}

A batch line carries the same fields (plus optional ``name`` and ``seed``); upstream's
``visual_input`` and ``control_overrides`` are accepted too; ``control_weight`` may be a ``.pt`` map.

A cosmos-transfer2.5 sample (``-i FILE.json`` / ``.jsonl``, one sample a line; ``transfer.spec25``)::

    {"name": "robot_edge", "prompt_path": "../robot_prompt.txt", "video_path": "../robot_input.mp4",
     "guidance": 3, "edge": {"control_path": "robot_edge.mp4", "control_weight": 1.0, "mask_path": "m.mp4"}}

Each format is recognised from its keys (``spec_form``); a spec mixing them is refused, naming the key. Both become
the same ``Request``. Everything here raises ``TransferError`` with one line naming the problem.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from configs.controls import MODALITIES, SPEC_EXTRAS
from transfer.errors import TransferError

#: Keys only a cosmos-transfer1 spec has (request level, control level).
T1_ONLY = ("input_video_path", "visual_input", "control_overrides")
T1_CONTROL_ONLY = ("input_control", "input_control_prompt")
#: Keys only a cosmos-transfer2.5 sample has (request level, control level).
T25_ONLY = ("prompt_path", "video_path", "guidance", "num_steps", "num_video_frames_per_chunk", "num_conditional_frames",
            "resolution", "keep_input_resolution", "max_frames", "sigma_max", "show_control_condition", "show_input",
            "context_frame_index", "image_context_path")
T25_CONTROL_ONLY = ("control_path", "mask_path", "mask_prompt", *SPEC_EXTRAS)

#: Cosmos 3's own request fields (checked by ``transfer.families.cosmos3.checkpoint``), in either spec format; refused with a Transfer2.5
#: checkpoint. ``control_guidance``: the hints' guidance scale (1: off); the intervals: ``[low, high]`` timesteps
#: (0-1000) where text / control guidance applies.
COSMOS3_FIELDS = ("control_guidance", "guidance_interval", "control_guidance_interval")
#: Cosmos 3 hint keys that are not this fork's control names: ``blur`` is ``vis`` (the blurred input video), ``wsm``
#: (world-scenario map) has no preprocessor: its video must be given. Both run with Cosmos 3 checkpoints only.
COSMOS3_HINT_KEYS = {"blur": "vis", "wsm": "wsm"}
#: Every control key a request may hold, in the order their latents are summed or packed.
REQUEST_CONTROLS = (*MODALITIES, "wsm")

#: Spec keys cosmos-transfer1 knows but this fork has no model for.
UNSUPPORTED_CONTROLS = ("upscale", "hdmap", "lidar")
REQUEST_FIELDS = ("prompt", "negative_prompt", "input_video_path", "name", "seed")
BATCH_ALIASES = {"visual_input": "input_video_path"}
CONTROL_FIELDS = ("control_weight", "input_control", "input_control_prompt")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

DEFAULT_NEGATIVE_PROMPT = (
    "The video captures a series of frames showing ugly scenes, static with no motion, motion blur, "
    "over-saturation, shaky footage, low resolution, grainy texture, pixelated images, poorly lit areas, "
    "underexposed and overexposed scenes, poor color balance, washed out colors, choppy sequences, jerky "
    "movements, low frame rate, artifacting, color banding, unnatural transitions, outdated special effects, "
    "fake elements, unconvincing visuals, poorly edited content, jump cuts, visual noise, and flickering. "
    "Overall, the video is of poor quality."
)


@dataclass
class ControlSpec:
    modality: str
    weight: float
    input_control: Path | None
    prompt: str | None = None
    """``input_control_prompt``: what to segment when ``seg`` is computed (default: the request's prompt)."""
    weight_map: Path | None = None
    """cosmos-transfer1: ``control_weight`` given as a ``.pt`` map ([T, H, W] or [H, W]); ``weight`` is then 1."""
    mask_path: Path | None = None
    """cosmos-transfer2.5: a mask video; the control acts where it is white (``transfer.control_weights``)."""
    mask_prompt: str | None = None
    """cosmos-transfer2.5: the mask is what the seg preprocessor finds for this text."""
    preset: str | None = None
    """cosmos-transfer2.5: this control's ``preset_edge_threshold`` / ``preset_blur_strength`` (else the flag's)."""

    @property
    def spatial(self) -> bool:
        """Whether this control's weight varies over the video (a map or a mask)."""
        return self.weight_map is not None or self.mask_path is not None or self.mask_prompt is not None


@dataclass
class Request:
    """One generation: prompt(s), the input video and the controls, with a stable output name."""

    name: str
    prompt: str
    negative_prompt: str
    input_video_path: Path | None
    controls: dict[str, ControlSpec]
    seed: int
    source: str = ""
    """Where the request came from (``spec.json`` or ``batch.jsonl:3``), for error messages."""
    form: str = "transfer1"
    """The spec format it was written in: ``transfer1`` or ``transfer2.5``."""
    settings: object = None
    """``pipeline.GenerationSettings`` of this request when its spec sets them (Transfer2.5 per-sample fields);
    None: the run's."""
    resolution: int | None = None
    """Transfer2.5 ``resolution``: generate at this height (short side); None: the input's size."""
    keep_input_resolution: bool = True
    """Transfer2.5: the output has the input's size (and frame count) even when generated at another size."""
    max_frames: int | None = None
    """Transfer2.5 ``max_frames``: use at most this many frames of the input video."""
    show: tuple[str, ...] = ()
    """Transfer2.5 ``show_input`` / ``show_control_condition``: ``input`` and/or ``control``, shown left of the
    output in the written video."""
    record: dict = field(default_factory=dict)
    """The resolved arguments written to ``<name>.json`` (Transfer2.5 layout)."""
    cosmos3: dict = field(default_factory=dict)
    """Cosmos 3's own fields the spec gives (``COSMOS3_FIELDS``, checked by ``cosmos3_fields``)."""

    @property
    def where(self) -> str:
        """The request in an error message: ``source (name)``, or its name."""
        return f"{self.source} ({self.name})" if self.source else self.name

    def scales(self) -> dict[str, float]:
        """Scalar control weights divided by max(sum, 1), as cosmos-transfer1 does."""
        total = sum(c.weight for c in self.controls.values())
        return {m: c.weight / max(total, 1.0) for m, c in self.controls.items()}

    @property
    def spatial(self) -> bool:
        """Whether any control's weight varies over the video (then every weight is a map: ``control_weights``)."""
        return any(c.spatial for c in self.controls.values())

    def mask_request(self, text: str) -> "Request":
        """This request with one computed ``seg`` control for ``text``: what the seg preprocessor runs on to make a
        ``mask_prompt``'s mask (cached like any computed control)."""
        return replace(self, controls={"seg": ControlSpec("seg", 1.0, None, prompt=text)})


def check_name(name: str, what: str = "output name") -> str:
    """A plain file stem: letters, digits, ``._-``; no separators, no ``..``, no hidden files."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise TransferError(f"{what} {name!r} is not a plain file name (letters, digits, '.', '_', '-')")
    return name


def _resolve(path, base_dir: Path | None, where: str, key: str) -> Path:
    if not isinstance(path, str) or not path or "\x00" in path:
        raise TransferError(f"{where}: {key} must be a non-empty path string")
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and base_dir is not None and (base_dir / p).exists():
        return base_dir / p  # relative to the spec file when not found relative to the working directory
    return p


def _weight(value, where: str, modality: str, upper: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TransferError(
            f"{where}: control {modality!r}: control_weight must be a number or a .pt weight map, got {value!r}"
        )
    if not math.isfinite(value) or value < 0 or value > upper:
        bound = "a finite number >= 0" if upper == math.inf else f"between 0 and {upper:g}"
        raise TransferError(f"{where}: control {modality!r}: control_weight must be {bound}, got {value!r}")
    return float(value)


def cosmos3_fields(obj: dict, where: str) -> dict:
    """The ``COSMOS3_FIELDS`` of a spec object, checked: ``control_guidance`` a number >= 0, an interval two
    timesteps ``0 <= low < high <= 1000``."""
    fields = {}
    for key in COSMOS3_FIELDS:
        value = obj.get(key)
        if value is None:
            continue
        if key == "control_guidance":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise TransferError(f"{where}: control_guidance must be a number >= 0, got {value!r}")
            fields[key] = float(value)
            continue
        ok = (isinstance(value, list) and len(value) == 2
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))
        if not ok or not 0 <= value[0] < value[1] <= 1000:
            raise TransferError(f"{where}: {key} must be [low, high] timesteps with 0 <= low < high <= 1000, "
                                f"got {value!r}")
        fields[key] = [float(v) for v in value]
    return fields


def hint_keys(obj: dict, where: str) -> dict:
    """``obj`` with Cosmos 3's hint names as this fork's (``blur`` -> ``vis``); both at once is refused."""
    for key, name in COSMOS3_HINT_KEYS.items():
        if key != name and key in obj:
            if name in obj:
                raise TransferError(f"{where}: {key!r} and {name!r} are the same control (Cosmos 3 calls {name} "
                                    f"{key}): give one")
            obj = {(name if k == key else k): v for k, v in obj.items()}
    return obj


def spec_form(obj: dict, where: str) -> str | None:
    """``transfer1`` or ``transfer2.5`` from the keys of a spec object; None when its keys fit both (then the flag
    it came with decides). A spec with keys of both formats is refused, naming the first key of the minority."""
    t1 = [k for k in obj if k in T1_ONLY]
    t25 = [k for k in obj if k in T25_ONLY]
    for key in (*REQUEST_CONTROLS, *COSMOS3_HINT_KEYS):
        control = obj.get(key)
        if isinstance(control, dict):
            t1 += [f"{key}.{k}" for k in control if k in T1_CONTROL_ONLY]
            t25 += [f"{key}.{k}" for k in control if k in T25_CONTROL_ONLY]
    if t1 and t25:
        odd, other = (t25, t1) if len(t1) >= len(t25) else (t1, t25)
        form = "cosmos-transfer2.5" if odd is t25 else "cosmos-transfer1"
        raise TransferError(f"{where}: key {odd[0]!r} is {form} spec format, but {other[0]!r} is the other format: "
                            "write the spec in one format")
    return "transfer1" if t1 else "transfer2.5" if t25 else None


def parse_request(obj: dict, *, where: str, name: str, defaults: dict, base_dir: Path | None,
                  parse_other=None) -> Request:
    """Validate one spec object (keys, types, weights, paths syntax) into a ``Request``. A cosmos-transfer2.5 sample
    (recognised from its keys) goes to ``parse_other(obj, where, base_dir)`` (``transfer.spec25``)."""
    if not isinstance(obj, dict):
        raise TransferError(f"{where}: a spec must be a JSON object, got {type(obj).__name__}")
    if spec_form(obj, where) == "transfer2.5":
        if parse_other is None:
            raise TransferError(f"{where}: a cosmos-transfer2.5 sample: give it with -i")
        return parse_other(obj, where, base_dir or Path("."))
    obj = hint_keys({BATCH_ALIASES.get(k, k): v for k, v in obj.items()}, where)
    overrides = obj.pop("control_overrides", None) or {}
    if not isinstance(overrides, dict):
        raise TransferError(f"{where}: control_overrides must be an object")
    for modality, override in overrides.items():
        if not isinstance(override, dict):
            raise TransferError(f"{where}: control_overrides.{modality} must be an object")
        obj[modality] = {**(obj.get(modality) or {}), **override}

    controls: dict[str, ControlSpec] = {}
    for key, value in obj.items():
        if key in REQUEST_FIELDS or key in COSMOS3_FIELDS:
            continue
        if key in UNSUPPORTED_CONTROLS:
            raise TransferError(f"{where}: control {key!r} is not supported by this fork (supported: {', '.join(MODALITIES)})")
        if key not in REQUEST_CONTROLS:
            raise TransferError(
                f"{where}: unknown key {key!r} (controls: {', '.join(REQUEST_CONTROLS)}; fields: "
                f"{', '.join(REQUEST_FIELDS + COSMOS3_FIELDS)})"
            )
        if not isinstance(value, dict):
            raise TransferError(f"{where}: control {key!r} must be an object with control_weight / input_control")
        unknown = sorted(set(value) - set(CONTROL_FIELDS))
        if unknown:
            raise TransferError(f"{where}: control {key!r}: unknown field {unknown[0]!r} (known: {', '.join(CONTROL_FIELDS)})")
        control_path = value.get("input_control")
        control_prompt = value.get("input_control_prompt")
        if control_prompt is not None and (not isinstance(control_prompt, str) or not control_prompt.strip()):
            raise TransferError(f"{where}: {key}.input_control_prompt must be a non-empty string")
        weight, weight_map = value.get("control_weight", 1.0), None
        if isinstance(weight, str) and weight.endswith(".pt"):  # a spatial / spatio-temporal weight map
            weight, weight_map = 1.0, _resolve(weight, base_dir, where, f"{key}.control_weight")
        controls[key] = ControlSpec(
            modality=key,
            weight=_weight(weight, where, key),
            input_control=None if control_path is None else _resolve(control_path, base_dir, where, f"{key}.input_control"),
            prompt=control_prompt,
            weight_map=weight_map,
        )
    if not controls:
        raise TransferError(f"{where}: the spec names no control (one of {', '.join(MODALITIES)})")
    controls = {m: controls[m] for m in REQUEST_CONTROLS if m in controls}  # fixed order: sums are order-sensitive

    merged = {**defaults, **{k: v for k, v in obj.items() if k in REQUEST_FIELDS and v is not None}}
    prompt = merged.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise TransferError(f"{where}: a non-empty 'prompt' is required")
    negative = merged.get("negative_prompt", DEFAULT_NEGATIVE_PROMPT)
    if not isinstance(negative, str):
        raise TransferError(f"{where}: negative_prompt must be a string")
    seed = merged.get("seed", 1)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise TransferError(f"{where}: seed must be a non-negative integer, got {seed!r}")
    video = merged.get("input_video_path")
    video = None if video is None else _resolve(video, base_dir, where, "input_video_path")
    missing = [m for m, c in controls.items() if c.input_control is None]
    given_only(controls, where, "input_control")
    if video is None and missing:
        raise TransferError(f"{where}: control {missing[0]!r} has no input_control and there is no input_video_path "
                            "to compute it from")
    return Request(
        name=check_name(obj.get("name", name), f"{where}: output name"),
        prompt=prompt,
        negative_prompt=negative,
        input_video_path=video,
        controls=controls,
        seed=seed,
        source=where,
        cosmos3=cosmos3_fields(obj, where),
    )


def given_only(controls: dict, where: str, path_key: str) -> None:
    """A control no preprocessor computes (``wsm``) must come with its video (``path_key``)."""
    if "wsm" in controls and controls["wsm"].input_control is None:
        raise TransferError(f"{where}: control 'wsm' has no {path_key}: no preprocessor computes a world-scenario "
                            "map, give its video")


#: Largest spec file / batch line accepted: real specs are a few hundred bytes.
MAX_JSON_BYTES = 1 << 20


def parse_json(text: str, where: str, invalid: str | None = None):
    """``json.loads`` with one-line errors for oversized or too deeply nested input (a JSON bomb); ``invalid``
    words the syntax error (default ``{where}: invalid JSON``)."""
    if len(text) > MAX_JSON_BYTES:
        raise TransferError(f"{where}: {len(text)} characters, more than the {MAX_JSON_BYTES} a spec may have")
    try:
        return json.loads(text)
    except RecursionError:
        raise TransferError(f"{where}: JSON nested too deeply") from None
    except ValueError as e:
        raise TransferError(f"{invalid or where + ': invalid JSON'}: {e}") from None


def _load_json(path: Path, what: str):
    if not path.is_file():
        raise TransferError(f"{what} not found: {path}")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise TransferError(f"{what} {path} is {path.stat().st_size} bytes, more than the {MAX_JSON_BYTES} a spec may have")
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise TransferError(f"{what} {path} is not valid JSON: {e}") from None
    return parse_json(text, f"{what} {path}", invalid=f"{what} {path} is not valid JSON")


def load_spec(path: str | Path, *, name: str, defaults: dict, parse_other=None) -> Request:
    """One request from a ``--controlnet_specs`` JSON file."""
    path = Path(path)
    return parse_request(_load_json(path, "controlnet spec"), where=str(path), name=name, defaults=defaults,
                         base_dir=path.parent, parse_other=parse_other)


def load_batch(path: str | Path, *, defaults: dict, base_spec: str | Path | None = None,
               failures: list | None = None, parse_other=None) -> list[Request]:
    """Requests from a JSONL file; each line is a spec (merged over ``base_spec`` when given). With a
    ``failures`` list, a bad line is appended there (``{"line", "source", "error"}``) and the others go on;
    without, the first bad line raises."""
    path = Path(path)
    if not path.is_file():
        raise TransferError(f"batch input not found: {path}")
    base = _load_json(Path(base_spec), "controlnet spec") if base_spec else {}
    if not isinstance(base, dict):
        raise TransferError(f"controlnet spec {base_spec} must be a JSON object")
    requests, names = [], set()
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as e:
        raise TransferError(f"batch input {path} is not UTF-8 text: {e}") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = parse_json(line, where)
            if not isinstance(obj, dict):
                raise TransferError(f"{where}: each line must be a JSON object")
            request = parse_request({**base, **obj}, where=where, name=f"video_{lineno - 1}", defaults=defaults,
                                    base_dir=path.parent, parse_other=parse_other)
            if request.name in names:
                raise TransferError(f"{where}: output name {request.name!r} is used by an earlier line")
        except TransferError as e:
            if failures is None:
                raise
            failures.append({"line": lineno, "source": where, "error": str(e)})
            continue
        names.add(request.name)
        requests.append(request)
    if not requests:
        first = f": {failures[0]['error']}" if failures else ""
        raise TransferError(f"batch input {path} has no valid requests{first}")
    return requests
