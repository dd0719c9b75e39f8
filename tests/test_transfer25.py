"""cosmos-transfer2.5 users' commands and spec files (``-i ... -o ...``), spatial control weights, and A/B against an
output folder laid out as Transfer2.5 writes it.

One torchrun run (2 processes, ``--context-parallel-size 2``, dash spellings) of a Transfer2.5 spec and a 2-line
.jsonl given as two ``-i`` files, and four single-process runs (the same request in both forms, constant masks, a
constant ``.pt`` map) serve every comparison here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import example_frames
from tests.test_distributed import launch
from transfer.video_io import file_digest, read_video, write_mp4

PROMPT = "A yellow ball rolls back and forth while a blue box slides across the floor."
STEPS = ["--num-steps", "2", "--num-video-frames-per-chunk", "5"]  # upstream's dash spelling
T1_STEPS = ["--num_steps", "2", "--num_frames_per_chunk", "5", "--seed", "2025"]


def half_mask(num_frames: int, height: int, width: int) -> np.ndarray:
    """White on the left half, black on the right."""
    mask = np.zeros((num_frames, height, width, 3), np.uint8)
    mask[:, :, : width // 2] = 255
    return mask


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_ckpt) -> Path:
    """Inputs as an upstream user keeps them: prompt and videos beside a specs/ folder that names them relatively."""
    d = tmp_path_factory.mktemp("t25")
    write_mp4(d / "in.mp4", example_frames("example_input.mp4", 9), 24)
    write_mp4(d / "edge.mp4", example_frames("example_edge.mp4", 9), 24)
    write_mp4(d / "white.mp4", np.full((9, 96, 160, 3), 255, np.uint8), 24)
    write_mp4(d / "half.mp4", half_mask(9, 96, 160), 24)
    (d / "prompt.txt").write_text(PROMPT + "\n")
    (d / "specs").mkdir()
    sample = {"name": "clip_a", "prompt_path": "../prompt.txt", "video_path": "../in.mp4", "guidance": 3,
              "resolution": "96",  # the input's own size: no resize, so the transfer1 form can give the same frames
              "edge": {"control_path": "../edge.mp4", "control_weight": 0.7},
              "vis": {"control_weight": 0.3, "preset_blur_strength": "low"}}  # computed, with its own preset
    (d / "specs" / "a.json").write_text(json.dumps(sample))
    masked = {**sample, "edge": {**sample["edge"], "mask_path": "../white.mp4"},
              "vis": {**sample["vis"], "mask_path": "../white.mp4"}}
    (d / "specs" / "a_masked.json").write_text(json.dumps(masked))
    lines = [{"name": "clip_b1", "prompt": "a ball", "video_path": "../in.mp4", "resolution": "96",
              "edge": {"control_path": "../edge.mp4"}},
             {"name": "clip_b2", "prompt": "a box", "video_path": "../in.mp4", "resolution": "96", "seed": 7,
              "edge": {"control_path": "../edge.mp4", "mask_path": "../half.mp4"}, "vis": {"control_weight": 0.5}}]
    (d / "specs" / "b.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    sizes = [{"name": "keep", "prompt": "a ball", "video_path": "../in.mp4", "edge": {"control_path": "../edge.mp4"},
              "show_input": True},
             {"name": "own_size", "prompt": "a ball", "video_path": "../in.mp4", "keep_input_resolution": False,
              "edge": {"control_path": "../edge.mp4"}, "show_control_condition": True}]  # upstream's default: 720
    (d / "specs" / "sizes.jsonl").write_text("".join(json.dumps(x) + "\n" for x in sizes))
    t1 = {"prompt": PROMPT, "input_video_path": str(d / "in.mp4"),
          "edge": {"control_weight": 0.7, "input_control": str(d / "edge.mp4")}, "vis": {"control_weight": 0.3}}
    (d / "t1.json").write_text(json.dumps(t1))
    torch.save(torch.full((96, 160), 0.7), d / "edge07.pt")
    (d / "t1_map.json").write_text(json.dumps({**t1, "edge": {**t1["edge"], "control_weight": str(d / "edge07.pt")}}))
    return d


@pytest.fixture(scope="module")
def runs(folder) -> dict[str, Path]:
    specs, out = folder / "specs", folder / "out"
    procs = {
        # as upstream documents it: torchrun, -i with two files, -o, dash flags; no --num_gpus
        "sp2": launch(2, "-i", str(specs / "a.json"), str(specs / "b.jsonl"), "-o", str(out / "sp2"), *STEPS,
                      "--disable-guardrails", "--context-parallel-size", "2"),
        "t25": launch(1, "-i", str(specs / "a.json"), "-o", str(out / "t25"), *STEPS, "--disable-guardrails",
                      "--save_raw"),
        "t1": launch(1, "--controlnet_specs", str(folder / "t1.json"), "--video_save_folder", str(out / "t1"),
                     "--video_save_name", "clip_a", *T1_STEPS, "--blur_strength", "low", "--disable_guardrail",
                     "--save_raw"),
        "masked": launch(1, "-i", str(specs / "a_masked.json"), "-o", str(out / "masked"), *STEPS,
                         "--disable-guardrails", "--save_raw"),
        "sizes": launch(1, "-i", str(specs / "sizes.jsonl"), "-o", str(out / "sizes"), *STEPS, "--disable-guardrails"),
        "t1_map": launch(1, "--controlnet_specs", str(folder / "t1_map.json"), "--video_save_folder",
                         str(out / "t1_map"), "--video_save_name", "clip_a", *T1_STEPS, "--blur_strength", "low",
                         "--disable_guardrail", "--save_raw"),
    }
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
        (out / name / "stderr.txt").write_text(proc.stderr)
    return {name: out / name for name in procs}


def frames(folder: Path, name: str = "clip_a") -> np.ndarray:
    with np.load(folder / f"{name}.npz") as z:
        return z["frames"]


def test_transfer25_command_writes_upstream_layout(runs, folder):
    """torchrun + ``-i SPEC.json B.jsonl -o DIR``: every sample's NAME.mp4 / .json / .txt / _control_KEY.mp4 (and
    _mask_KEY.mp4 for a mask), config.yaml and console.log; the output has the input's size and frame count."""
    out = runs["sp2"]
    for name, controls in (("clip_a", ("edge", "vis")), ("clip_b1", ("edge",)), ("clip_b2", ("edge", "vis"))):
        for suffix in (".mp4", ".json", ".txt", *(f"_control_{c}.mp4" for c in controls)):
            assert (out / f"{name}{suffix}").is_file(), f"{name}{suffix} missing"
        video, _ = read_video(out / f"{name}.mp4")
        assert video.shape == (9, 96, 160, 3)
    assert (out / "clip_b2_mask_edge.mp4").is_file() and not (out / "clip_b2_mask_vis.mp4").exists()
    assert (out / "config.yaml").is_file() and "INFO" in (out / "console.log").read_text()
    record = json.loads((out / "clip_a.json").read_text())
    assert record["seed"] == 2025 and record["num_steps"] == 2 and record["num_video_frames_per_chunk"] == 5
    assert record["prompt"] == PROMPT  # read from prompt_path, relative to the spec's folder
    assert record["vis"]["preset"] == "low" and record["edge"]["control_weight"] == 0.7
    assert json.loads((out / "clip_b2.json").read_text())["seed"] == 7  # a sample's own field (no flag given)
    assert (out / "clip_a.txt").read_text().strip() == PROMPT


def test_resolution_larger_than_the_model(runs, folder):
    """resolution 720 on the embedded checkpoint (512 px at most): generated at its largest size, said in one log
    line; keep_input_resolution (default) writes the input's size and frame count, false the generation size.
    show_input / show_control_condition put the input / the control left of the output."""
    out = runs["sizes"]
    assert "the model's largest side is 512 px, smaller than resolution 720" in (out / "stderr.txt").read_text()
    keep = read_video(out / "keep.mp4")[0]
    assert keep.shape == (9, 96, 2 * 160, 3)  # input | output, each at the input's size
    source = read_video(folder / "in.mp4")[0].astype(np.int16)
    assert np.abs(keep[:, :, :160].astype(np.int16) - source).mean() < 6  # the input (through two lossy encodes)
    assert read_video(out / "own_size.mp4")[0].shape == (9, 304, 2 * 512, 3)  # control | output
    assert read_video(out / "own_size_control_edge.mp4")[0].shape == (9, 304, 512, 3)


def test_same_request_in_both_forms_gives_identical_frames(runs):
    """The transfer1 spec and the Transfer2.5 sample of one request: the same frames; and the sequence-parallel
    torchrun run wrote the very bytes of the single process's video."""
    assert np.array_equal(frames(runs["t1"]), frames(runs["t25"]))
    assert (runs["sp2"] / "clip_a.mp4").read_bytes() == (runs["t25"] / "clip_a.mp4").read_bytes()


def test_constant_masks_and_maps_equal_scalar_weights(runs):
    """All-white mask videos (Transfer2.5 mask_path) and a constant .pt map (transfer1) take the spatial path and
    give the scalar path's frames bit for bit."""
    assert np.array_equal(frames(runs["masked"]), frames(runs["t25"]))
    assert np.array_equal(frames(runs["t1_map"]), frames(runs["t1"]))
    assert (runs["masked"] / "clip_a_mask_edge.mp4").is_file()


def test_half_mask_zeroes_residuals_outside_it(folder, tiny_ckpt):
    """A mask over the left half: that control's ControlNet residuals are exactly zero at every token of the right
    half, unchanged (equal to the unmasked run's) on the left half."""
    from transfer.checkpoint import inspect_checkpoint
    from transfer.families.transfer25.loading import load_stages
    from transfer.chunks import ChunkSchedule
    from transfer.prepare import ModelLimits, prepare_request
    from transfer.spec25 import parse_sample

    info = inspect_checkpoint(tiny_ckpt)
    limits = ModelLimits.from_info(info)
    stages, _ = load_stages(info, ["text", "vae", "dit"], ["edge"], torch.device("cpu"), torch.float32)
    dit, vae = stages["dit"], stages["vae"]
    sample = {"name": "half", "prompt": "a ball", "video_path": str(folder / "in.mp4"), "resolution": "96",
              "edge": {"control_path": str(folder / "edge.mp4"), "mask_path": str(folder / "half.mp4")}}
    request = parse_sample(sample, where="test", base_dir=folder, flags={"num_video_frames_per_chunk": 5})
    prepared = prepare_request(request, limits)
    schedule = ChunkSchedule.of(prepared, limits)
    assert schedule.windows[0] == (0, 5)
    masked = schedule.scales(request.scales(), 0)["edge"]  # [T, h, w] token weights
    T, h, w = masked.shape
    assert (masked[:, :, : w // 2] == 1).all() and (masked[:, :, w // 2:] == 0).all()

    controls = schedule.control_latents(vae, prepared.controls, 0, torch.float32)
    state = dit.prepare(torch.randn(1, 16, T, h * 2, w * 2, generator=torch.Generator().manual_seed(0)), None, 0,
                        controls, stages["text"].encode("a ball"), None, 1.0, (96, 160))
    args = (state.latents, torch.full((1, 1, T, 1, 1), 0.5), state.positive, state.controls)
    with torch.no_grad():
        half = dit.control_residuals(*args, {"edge": masked}, state.cond_mask, state.padding_mask)
        full = dit.control_residuals(*args, {"edge": 1.0}, state.cond_mask, state.padding_mask)
    for r_half, r_full in zip(half, full):
        grid = r_half.reshape(T, h, w, -1)
        assert (grid[:, :, w // 2:] == 0).all()
        assert torch.equal(grid[:, :, : w // 2], r_full.reshape(T, h, w, -1)[:, :, : w // 2])
        assert grid[:, :, : w // 2].abs().sum() > 0


BAD = {
    "unknown key": ({"name": "x", "prompt": "p", "video_path": "../in.mp4", "edge": {}, "fps_out": 3}, "'fps_out'"),
    "missing name": ({"prompt": "p", "video_path": "../in.mp4", "edge": {}}, "no 'name'"),
    "weight 1.5": ({"name": "x", "prompt": "p", "video_path": "../in.mp4", "edge": {"control_weight": 1.5}},
                   "control_weight must be between 0 and 1, got 1.5"),
    "mixed formats": ({"name": "x", "prompt": "p", "input_video_path": "../in.mp4", "video_path": "../in.mp4",
                       "edge": {}}, "'video_path'"),
    "unsupported field": ({"name": "x", "prompt": "p", "video_path": "../in.mp4", "edge": {}, "sigma_max": 80},
                          "sigma_max needs"),
}


@pytest.mark.parametrize("case", [*BAD, "duplicate name", "distilled"])
def test_bad_samples_fail_with_one_line_and_write_nothing(folder, tmp_path, capsys, case):
    from transfer.cli import main

    specs = tmp_path / "specs"
    specs.mkdir()
    shutil.copy(folder / "in.mp4", tmp_path / "in.mp4")
    extra = []
    if case == "duplicate name":
        good = {"name": "same", "prompt": "p", "video_path": "../in.mp4", "edge": {}}
        (specs / "s.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
        spec, expect = specs / "s.jsonl", "name 'same' is used by an earlier sample"
    elif case == "distilled":
        (specs / "s.json").write_text(json.dumps({"name": "x", "prompt": "p", "video_path": "../in.mp4", "edge": {}}))
        spec, expect, extra = specs / "s.json", "edge/distilled", ["--model", "edge/distilled"]
    else:
        obj, expect = BAD[case]
        (specs / "s.json").write_text(json.dumps(obj))
        spec = specs / "s.json"
    out = tmp_path / "out"
    assert main(["-i", str(spec), "-o", str(out), *extra]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("transfer.py: error:")]
    assert len(err) == 1 and expect in err[0], err
    assert not out.exists()


def test_ab_flags_settings_that_differ(runs, tmp_path, capsys):
    """An 'upstream' folder in the Transfer2.5 layout with one sample's seed changed in its NAME.json: that pair is
    reported as settings differ (by key), the others are not; side files are not compared as videos."""
    from transfer.ab import main

    upstream = tmp_path / "upstream"
    shutil.copytree(runs["sp2"], upstream)
    record = json.loads((upstream / "clip_b1.json").read_text())
    (upstream / "clip_b1.json").write_text(json.dumps({**record, "seed": 1234}))
    assert main([str(runs["sp2"]), str(upstream), "--out", str(tmp_path / "report"), "--no_latents"]) == 0
    out = capsys.readouterr().out
    assert "clip_b1: settings differ: seed: 2025 vs 1234" in out
    assert "clip_a: settings differ" not in out and "clip_b2: settings differ" not in out
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert sorted(report["videos"]) == ["clip_a", "clip_b1", "clip_b2"]
    assert report["videos"]["clip_b1"]["settings_differ"] == ["seed: 2025 vs 1234"]


def test_transfer25_flags_without_i_are_refused(folder, tmp_path, capsys):
    """A Transfer2.5-only flag in the transfer1 form would be ignored there: refused with one line instead."""
    from transfer.cli import main

    out = tmp_path / "out"
    assert main(["--controlnet_specs", str(folder / "t1.json"), "--video_save_folder", str(out), "--resolution", "480"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("transfer.py: error:")]
    assert len(err) == 1 and "--resolution belongs to the Transfer2.5 form" in err[0], err
    assert not out.exists()


def test_mask_prompt_is_what_the_seg_preprocessor_finds(folder, tiny_ckpt, tmp_path):
    """mask_prompt: the seg preprocessor runs on that text (its own cached control file, keyed by the text) and the
    control's mask is the union of what it found; the control's weights are that mask, resized to the token grid."""
    from preprocessors import ControlMaker
    from preprocessors.random_weights import write_tiny_preprocessors
    from transfer.checkpoint import inspect_checkpoint
    from transfer.control_weights import mask_weights, token_grid
    from transfer.prepare import ModelLimits, prepare_request
    from transfer.spec25 import parse_sample

    limits = ModelLimits.from_info(inspect_checkpoint(tiny_ckpt))
    sample = {"name": "mp", "prompt": "a ball and a box", "video_path": str(folder / "in.mp4"), "resolution": "96",
              "edge": {"control_path": str(folder / "edge.mp4"), "mask_prompt": "yellow ball", "control_weight": 0.8}}
    request = parse_sample(sample, where="test", base_dir=folder, flags={"num_video_frames_per_chunk": 5})
    maker = ControlMaker(tmp_path / "out", {"model_dir": str(write_tiny_preprocessors(tmp_path / "models"))})
    assert maker.needs(request) == ["seg"]
    prepared = prepare_request(request, limits, maker)
    video, _ = read_video(folder / "in.mp4")
    seg_request = request.mask_request("yellow ball")
    assert maker.cache_path(maker.path_for("seg", seg_request, file_digest(folder / "in.mp4"))).is_file()
    seg = maker("seg", seg_request, video, 24)  # read back from that cache
    assert np.array_equal(prepared.masks["edge"], (seg.max(-1) > 0).astype(np.uint8))
    assert torch.equal(prepared.weights["edge"], mask_weights(prepared.masks["edge"], 0.8, token_grid(limits, 96, 160)))
