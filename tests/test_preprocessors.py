"""Computed controls: vis / edge equal OpenCV, model-backed ones run on tiny local weights, lazy imports,
one load per process, cached rank-suffixed files, 4 stage processes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from preprocessors import REGISTRY, ControlMaker
from preprocessors import edge as edge_module
from preprocessors import vis as vis_module
from preprocessors.random_weights import write_tiny_preprocessors
from tests.conftest import example_frames, failure, ROOT
from tests.test_distributed import launch
from transfer.specs import ControlSpec, Request
from transfer.video_io import read_video, write_mp4

FAST = ["--num_steps", "2", "--num_frames_per_chunk", "5"]
HEAVY = ("depth", "seg", "keypoint")
ALL_IN_ORDER = ("vis", "edge", *HEAVY)


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return example_frames("example_input.mp4", 9)


@pytest.mark.parametrize("strength", sorted(vis_module.PRESETS))
def test_vis_equals_opencv(frames, strength):
    d, sigma_color, sigma_space, downscale = vis_module.PRESETS[strength]
    got = vis_module.Preprocessor(vis_module.Config(strength))(frames)
    h, w = frames.shape[1:3]
    for frame, out in zip(frames, got):
        if strength == "none":
            expected = frame
        else:
            x = frame if downscale == 1 else cv2.resize(frame, (w // downscale, h // downscale), interpolation=cv2.INTER_AREA)
            x = cv2.bilateralFilter(x, d, sigma_color, sigma_space)
            if downscale > 1:
                x = cv2.resize(x, (w, h), interpolation=cv2.INTER_CUBIC)
            x = cv2.resize(x, (w // vis_module.DOWNUP, h // vis_module.DOWNUP), interpolation=cv2.INTER_CUBIC)
            expected = cv2.resize(x, (w, h), interpolation=cv2.INTER_CUBIC)
        assert np.array_equal(out, expected), strength
    if strength != "none":
        assert not np.array_equal(got, frames)  # it blurs


@pytest.mark.parametrize("threshold", sorted(edge_module.PRESETS))
def test_edge_equals_opencv(frames, threshold):
    low, high = edge_module.PRESETS[threshold]
    got = edge_module.Preprocessor(edge_module.Config(threshold))(frames)
    for frame, out in zip(frames, got):
        expected = cv2.Canny(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), low, high)
        assert np.array_equal(out, np.repeat(expected[..., None], 3, axis=-1)), threshold
    assert got.any()


def test_presets_are_honoured(frames):
    assert not np.array_equal(edge_module.Preprocessor(edge_module.Config("very_low"))(frames),
                              edge_module.Preprocessor(edge_module.Config("very_high"))(frames))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """Tiny random-weight depth, seg and keypoint models saved by the test, in --preprocessor_dir layout."""
    return write_tiny_preprocessors(tmp_path_factory.mktemp("preprocessor_models"))


def request_for(video: Path, modalities, name="r", prompt="a yellow ball") -> Request:
    controls = {m: ControlSpec(m, 1.0, None, "yellow ball. blue box" if m == "seg" else None) for m in modalities}
    return Request(name, prompt, "", video, controls, 1)


def test_control_registry_is_the_one_source(model_dir):
    """Every control list derives from ``configs.controls.CONTROLS``: checkpoint modalities, ``--model`` choices, the
    preprocessor modules (each with ``Config.from_options`` and ``Preprocessor``; a preset extra's values are the
    module's ``PRESETS``), the Transfer2.5 spec extras, and the test weights (``write_tiny_preprocessors`` writes
    every weight folder a preprocessor names)."""
    import importlib

    from configs.controls import CONTROLS, MODALITIES, SPEC_EXTRAS
    from configs.models import MODALITIES as CHECKPOINT_MODALITIES
    from transfer.flags import build_parser
    from transfer.specs import T25_CONTROL_ONLY

    assert CHECKPOINT_MODALITIES == MODALITIES == tuple(REGISTRY) == ALL_IN_ORDER
    choices = next(a.choices for a in build_parser()._actions if "--model" in a.option_strings)
    assert tuple(choices) == (*MODALITIES, "edge/distilled")
    assert set(SPEC_EXTRAS) <= set(T25_CONTROL_ONLY)
    for control in CONTROLS:
        module = importlib.import_module(control.preprocessor)
        assert callable(module.Config.from_options) and callable(module.Preprocessor), control.name
        if control.preset_extra:
            assert SPEC_EXTRAS[control.preset_extra] == control.name and module.PRESETS, control.name
        for sub in control.model_dirs:
            assert (model_dir / sub / "config.json").is_file(), (control.name, sub)
    assert {c.name for c in CONTROLS if c.model_dirs} == set(HEAVY)


@pytest.mark.parametrize("modality", HEAVY)
def test_model_preprocessors_run_on_local_weights(model_dir, frames, tmp_path, modality):
    write_mp4(tmp_path / "in.mp4", frames, 24)
    video, _ = read_video(tmp_path / "in.mp4")
    maker = ControlMaker(tmp_path / "out", {"model_dir": str(model_dir)})
    control = maker(modality, request_for(tmp_path / "in.mp4", [modality]), video, 24)
    assert control.shape == video.shape and control.dtype == np.uint8
    viewable, cache = sorted((tmp_path / "out").iterdir(), key=lambda p: len(p.name))
    assert viewable.name.startswith(f"{modality}_input_control_") and viewable.name.endswith("_r0.mp4")
    assert cache.name == viewable.name.replace(".mp4", ".lossless.mp4")
    assert np.array_equal(read_video(cache)[0], control)  # the cache gives back what generation used


def test_generation_uses_the_computed_frames_and_the_cache_gives_them_back(frames, tmp_path):
    """The edge control a run uses is Canny's output itself, not its decoded mp4 (lossy: thin lines blur), and a
    later run reusing the cache gets the same frames bit for bit."""
    write_mp4(tmp_path / "in.mp4", frames, 24)
    video, _ = read_video(tmp_path / "in.mp4")
    request = request_for(tmp_path / "in.mp4", ["edge"])
    computed = ControlMaker(tmp_path / "out", {})("edge", request, video, 24)
    assert np.array_equal(computed, edge_module.Preprocessor(edge_module.Config())(video))
    viewable = next((tmp_path / "out").glob("edge_input_control_*_r0.mp4"))
    assert not np.array_equal(read_video(viewable)[0], computed)  # what would have been used before
    reused = ControlMaker(tmp_path / "out", {})("edge", request, video, 24)
    assert np.array_equal(reused, computed)


def test_model_loads_once_per_process_and_file_is_reused(model_dir, frames, tmp_path, monkeypatch):
    from preprocessors import depth

    loads = []
    original = depth.Preprocessor.load
    monkeypatch.setattr(depth.Preprocessor, "load", lambda self: (loads.append(1), original(self)))
    write_mp4(tmp_path / "a.mp4", frames, 24)
    write_mp4(tmp_path / "b.mp4", frames[::-1].copy(), 24)
    maker = ControlMaker(tmp_path / "out", {"model_dir": str(model_dir)})
    outs = {}
    for name in ("a", "b"):
        video, _ = read_video(tmp_path / f"{name}.mp4")
        outs[name] = maker("depth", request_for(tmp_path / f"{name}.mp4", ["depth"], name), video, 24)
    assert len(loads) == 1  # two requests, one load
    files = sorted((tmp_path / "out").iterdir())
    assert len(files) == 4  # different inputs, different files (a viewable mp4 and a lossless one each)
    mtimes = [f.stat().st_mtime_ns for f in files]
    video, _ = read_video(tmp_path / "a.mp4")
    again = ControlMaker(tmp_path / "out", {"model_dir": str(model_dir)})("depth", request_for(tmp_path / "a.mp4", ["depth"]),
                                                                           video, 24)
    assert np.array_equal(again, outs["a"]) and len(loads) == 1  # reused from the file: no model loaded
    assert [f.stat().st_mtime_ns for f in sorted((tmp_path / "out").iterdir())] == mtimes


def test_edge_only_run_imports_no_model_preprocessor(tiny_ckpt, tmp_path):
    """A real run (single process, in a fresh interpreter) whose only computed control is edge."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"prompt": "a ball", "input_video_path": str(ROOT / "assets" / "example_input.mp4"),
                                "edge": {"control_weight": 1.0}}))
    code = f"""
import sys
from transfer.cli import main
assert main(["--controlnet_specs", {str(spec)!r}, "--video_save_folder", {str(tmp_path / "out")!r},
             "--num_steps", "1", "--num_frames_per_chunk", "5"]) == 0
heavy = [m for m in sys.modules if m in ("preprocessors.depth", "preprocessors.seg", "preprocessors.keypoint")
         or any(m.startswith("transformers.models." + x) for x in ("depth_anything", "grounding_dino", "sam2", "vitpose",
                                                                     "rt_detr"))]
print("HEAVY", heavy)
print("EDGE", "preprocessors.edge" in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "HEAVY []" in proc.stdout and "EDGE True" in proc.stdout
    assert len(list((tmp_path / "out").glob("edge_input_control_*_r0.mp4"))) == 1


@pytest.fixture(scope="module")
def all_missing(tmp_path_factory) -> Path:
    """Two requests whose every control lacks input_control (different inputs and seg prompts)."""
    d = tmp_path_factory.mktemp("all_missing")
    write_mp4(d / "a.mp4", example_frames("example_input.mp4", 9), 24)
    write_mp4(d / "b.mp4", example_frames("example_input.mp4", 13)[4:], 24)
    controls = {m: {"control_weight": 0.2} for m in REGISTRY}
    lines = [{"name": "a", "prompt": "a yellow ball", "input_video_path": "a.mp4", **controls, "seed": 1},
             {"name": "b", "prompt": "a blue box", "input_video_path": "b.mp4", **controls,
              "seg": {"control_weight": 0.2, "input_control_prompt": "blue box"}, "seed": 2}]
    (d / "batch.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return d


@pytest.fixture(scope="module")
def all_missing_single(tiny_ckpt, all_missing, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("all_missing_single")
    proc = launch(1, "--batch_input_path", str(all_missing / "batch.jsonl"), "--video_save_folder", str(out), "--save_raw",
                  *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_every_control_missing_runs_end_to_end(all_missing_single):
    """The embedded tiny checkpoint ships tiny preprocessor weights: all five controls are computed."""
    for name, n in (("a", 9), ("b", 9)):
        frames, _ = read_video(all_missing_single / f"{name}.mp4")
        assert frames.shape == (n, 96, 160, 3)
    controls = sorted(p.name for p in all_missing_single.glob("*_input_control_*_r0.mp4"))
    assert len(controls) == 10
    for m in REGISTRY:
        assert len([c for c in controls if c.startswith(f"{m}_input_control_")]) == 2
        for path in all_missing_single.glob(f"{m}_input_control_*_r0.mp4"):
            assert read_video(path)[0].shape == (9, 96, 160, 3)
            assert read_video(path.with_suffix(".lossless.mp4"))[0].shape == (9, 96, 160, 3)


def test_a_run_reusing_cached_controls_equals_the_run_that_computed_them(all_missing, all_missing_single, tmp_path):
    for path in all_missing_single.glob("*_input_control_*"):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    proc = launch(1, "--batch_input_path", str(all_missing / "batch.jsonl"), "--video_save_folder", str(tmp_path),
                  "--save_raw", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert len(set(re.findall(r"reusing computed \w+ control (\S+)", log))) == 10 and "computing the" not in log
    assert {n: (tmp_path / n).stat().st_mtime_ns for n in before} == before  # nothing recomputed
    for name in ("a.mp4", "b.mp4", "a.npz", "b.npz", "a.txt", "b.txt", "manifest.json"):
        assert (tmp_path / name).read_bytes() == (all_missing_single / name).read_bytes(), name


def test_four_processes_compute_controls_on_the_coordinator_only(tiny_ckpt, all_missing, all_missing_single, tmp_path):
    """4 stage processes: the same outputs; every control file written once, by rank 0 (its suffix), complete;
    no temp file left. Requests beyond the window are prepared twice: the second time reuses the file."""
    proc = launch(4, "--batch_input_path", str(all_missing / "batch.jsonl"), "--video_save_folder", str(tmp_path),
                  "--save_raw", *FAST)
    assert proc.returncode == 0, failure(proc)
    for name in ("a", "b"):
        ref, got = np.load(all_missing_single / f"{name}.npz"), np.load(tmp_path / f"{name}.npz")
        assert np.array_equal(ref["frames"], got["frames"]) and np.array_equal(ref["latents"], got["latents"])
    controls = sorted(p.name for p in tmp_path.glob("*_input_control_*"))
    assert controls == sorted(p.name for p in all_missing_single.glob("*_input_control_*"))  # same keys, one file each
    assert len(controls) == 20 and all(c.endswith(("_r0.mp4", "_r0.lossless.mp4")) for c in controls)
    for c in [*controls, "a.mp4", "b.mp4", "a.npz", "b.npz", "a.txt"]:  # byte for byte
        assert (tmp_path / c).read_bytes() == (all_missing_single / c).read_bytes(), c
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_placement_moves_preprocessors_to_another_rank(tiny_ckpt, all_missing, all_missing_single, tmp_path):
    """``"preprocess": 1`` in a placement file: rank 1 (the text rank) computes and writes every control (suffix
    ``_r1``), the coordinator reads them; outputs are those of the single process."""
    placement = tmp_path / "placement.json"
    placement.write_text(json.dumps({"coordinator": 0, "text": 1, "vae": 2, "dit_groups": [[3]], "preprocess": 1}))
    out, trace = tmp_path / "out", tmp_path / "trace.json"
    proc = launch(4, "--batch_input_path", str(all_missing / "batch.jsonl"), "--video_save_folder", str(out), "--save_raw",
                  "--placement", str(placement), "--trace", str(trace), *FAST)
    assert proc.returncode == 0, failure(proc)
    for name in ("a", "b"):
        ref, got = np.load(all_missing_single / f"{name}.npz"), np.load(out / f"{name}.npz")
        assert np.array_equal(ref["frames"], got["frames"]) and np.array_equal(ref["latents"], got["latents"])
    controls = sorted(p.name for p in out.glob("*_input_control_*"))
    assert controls == sorted(p.name.replace("_r0.", "_r1.") for p in all_missing_single.glob("*_input_control_*"))
    for c in [*controls, "a.mp4", "b.mp4"]:  # byte for byte (only the writer's rank in the control names differs)
        assert (out / c).read_bytes() == (all_missing_single / c.replace("_r1.", "_r0.")).read_bytes(), c
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X" and e["cat"] == "preprocess"]
    assert {e["pid"] for e in events} == {1} and len(events) == 2
