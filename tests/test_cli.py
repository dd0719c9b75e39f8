"""The CLI as a user runs it: outputs, determinism, multi-control, and every bad input."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ASSETS, ROOT, example_frames, run_cli
from transfer.cli import main
from transfer.video_io import read_video, write_mp4

FAST = ["--num_steps", "2", "--num_frames_per_chunk", "9"]


@pytest.fixture(scope="module")
def short_inputs(tmp_path_factory) -> Path:
    """13-frame copies of the example input and controls (two chunks at 9 frames/chunk)."""
    d = tmp_path_factory.mktemp("inputs")
    for name in ("example_input.mp4", "example_edge.mp4", "example_vis.mp4"):
        write_mp4(d / name, example_frames(name, 13), 24)
    return d


def write_spec(folder: Path, **spec) -> Path:
    base = {"prompt": "a ball and a box", "input_video_path": "example_input.mp4",
            "edge": {"control_weight": 1.0, "input_control": "example_edge.mp4"}}
    path = folder / "spec.json"
    path.write_text(json.dumps({k: v for k, v in {**base, **spec}.items() if v is not None}))
    return path


def readme_tiny_command_writes_matching_mp4(out: Path) -> None:
    """What the README says of its tiny-checkpoint command's output (``out``: its folder), checked by
    tests/test_docs.py on the README block's own run (the main command, with the demo checkpoint:
    tests/test_demo_checkpoint.py)."""
    frames, fps = read_video(out / "output.mp4")
    source, _ = read_video(ASSETS / "example_input.mp4")
    assert frames.shape == source.shape == (121, 96, 160, 3)
    assert fps == 24
    assert (out / "output.txt").read_text().startswith("A yellow ball")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "output.mp4", "output.txt"]


def test_same_seed_same_raw_arrays_and_other_seed_differs(tiny_ckpt, short_inputs, tmp_path):
    spec = write_spec(short_inputs)
    raws = []
    for run, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        assert main(["--controlnet_specs", str(spec), "--video_save_folder", str(tmp_path / run), "--seed", seed,
                     "--save_raw", *FAST]) == 0
        raws.append(np.load(tmp_path / run / "output.npz"))
    a, b, c = raws
    assert a["frames"].dtype == np.uint8 and a["frames"].shape == (13, 96, 160, 3)
    assert a["latents"].dtype == np.float32 and a["latents"].shape == (2, 16, 3, 12, 20)
    assert np.array_equal(a["frames"], b["frames"]) and np.array_equal(a["latents"], b["latents"])
    assert not np.array_equal(a["latents"], c["latents"])


def test_cpu_threads_is_a_recorded_setting(tiny_ckpt, short_inputs, tmp_path):
    """``--cpu_threads`` pins torch's threads (default 1, whatever the machine's cores); another count is recorded in
    the manifest, so a folder made with one count is not taken as complete for another."""
    import torch

    spec = write_spec(short_inputs)
    settings = {}
    for threads in ("1", "2"):
        assert main(["--controlnet_specs", str(spec), "--video_save_folder", str(tmp_path / threads),
                     "--cpu_threads", threads, *FAST]) == 0
        assert torch.get_num_threads() == int(threads)
        manifest = json.loads((tmp_path / threads / "manifest.json").read_text())
        settings[threads] = manifest["requests"]["output"]["settings"]
    assert "cpu_threads" not in settings["1"] and settings["2"]["cpu_threads"] == 2
    torch.set_num_threads(1)


def test_two_controls_differ_from_each_single_control(tiny_ckpt, short_inputs, tmp_path):
    specs = {
        "edge": dict(),
        "vis": dict(edge=None, vis={"control_weight": 1.0, "input_control": "example_vis.mp4"}),
        "both": dict(edge={"control_weight": 0.7, "input_control": "example_edge.mp4"},
                     vis={"control_weight": 0.5, "input_control": "example_vis.mp4"}),
    }
    latents = {}
    for name, fields in specs.items():
        spec = write_spec(short_inputs, **fields)
        assert main(["--controlnet_specs", str(spec), "--video_save_folder", str(tmp_path), "--video_save_name", name,
                     "--save_raw", *FAST]) == 0
        latents[name] = np.load(tmp_path / f"{name}.npz")["latents"]
    assert np.isfinite(latents["both"]).all()
    for single in ("edge", "vis"):
        assert np.abs(latents["both"] - latents[single]).max() > 1e-3


def test_batch_writes_one_stable_name_per_line(tiny_ckpt, short_inputs, tmp_path):
    batch = short_inputs / "batch.jsonl"
    line = {"prompt": "p", "visual_input": "example_input.mp4",
            "edge": {"control_weight": 1.0, "input_control": "example_edge.mp4"}}
    batch.write_text("\n".join(json.dumps(x) for x in [line, {**line, "name": "second", "seed": 3}]) + "\n")
    assert main(["--batch_input_path", str(batch), "--video_save_folder", str(tmp_path), *FAST]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "second.mp4", "second.txt", "video_0.mp4", "video_0.txt"]


def test_torchrun_single_process(tiny_ckpt, short_inputs, tmp_path):
    import subprocess

    spec = write_spec(short_inputs)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", str(ROOT / "transfer.py"),
           "--num_gpus", "1", "--controlnet_specs", str(spec), "--video_save_folder", str(tmp_path), *FAST]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_video(tmp_path / "output.mp4")[0].shape == (13, 96, 160, 3)


def test_reason_text_encoder_checkpoint_runs(tiny_reason_ckpt, short_inputs, tmp_path):
    spec = write_spec(short_inputs)
    assert main(["--checkpoint_dir", str(tiny_reason_ckpt), "--controlnet_specs", str(spec),
                 "--video_save_folder", str(tmp_path), *FAST]) == 0
    assert read_video(tmp_path / "output.mp4")[0].shape == (13, 96, 160, 3)


# --- bad input: one clear line, non-zero exit, no output file -------------------------------------------------


def _bad_cases(d: Path) -> dict:
    """name -> (spec fields or a raw spec text, extra CLI args, expected message fragment)."""
    truncated = d / "truncated.mp4"
    truncated.write_bytes((d / "example_input.mp4").read_bytes()[:600])
    (d / "notes.mp4").write_text("this is not a video")
    (d / "empty.mp4").write_bytes(b"")
    write_mp4(d / "odd_size.mp4", example_frames("example_input.mp4", 13)[:, :90, :150], 24)
    write_mp4(d / "short_edge.mp4", example_frames("example_edge.mp4", 5), 24)
    return {
        "missing_video": (dict(input_video_path="nope.mp4"), [], "input video not found"),
        "corrupt_mp4": (dict(input_video_path="truncated.mp4"), [], "cannot read input video"),
        "not_a_video": (dict(input_video_path="notes.mp4"), [], "notes.mp4: not a video PyAV/FFmpeg can decode"),
        "empty_video": (dict(input_video_path="empty.mp4"), [], "empty.mp4: empty file"),
        "unknown_control": (dict(depthh={"control_weight": 1}), [], "unknown key 'depthh'"),
        "negative_weight": (dict(edge={"control_weight": -0.5, "input_control": "example_edge.mp4"}), [],
                            "control_weight must be a finite number >= 0, got -0.5"),
        "bad_resolution": (dict(input_video_path="odd_size.mp4"), [], "resolution 150x90 is not a multiple of 16"),
        "short_control": (dict(edge={"control_weight": 1, "input_control": "short_edge.mp4"}), [],
                          "control video for 'edge' has 5 frames, the input has 13"),
        "malformed_json": ('{"prompt": "x", "edge": {', [], "is not valid JSON"),
        "no_input_control": (dict(input_video_path=None, edge={"control_weight": 1}), [],
                             "control 'edge' has no input_control and there is no input_video_path"),
        "missing_preprocessor_weights": (dict(depth={"control_weight": 1}), ["--preprocessor_dir", str(d / "no_models")],
                                         f"computing the 'depth' control needs model weights at {d / 'no_models' / 'depth'}"),
        "missing_prompt": (dict(prompt=None), [], "a non-empty 'prompt' is required"),
        "bad_chunk": (dict(), ["--num_frames_per_chunk", "10"], "--num_frames_per_chunk must be 1 + 4k"),
        "too_many_steps": (dict(), ["--num_steps", "1000000000"], "--num_steps must be in [1, 1000]"),
        "too_many_threads": (dict(), ["--cpu_threads", "100000"], "--cpu_threads must be in [1, 256], got 100000"),
        "vae_group_too_big": (dict(), ["--vae_parallel_degree", "2"],
                              "--vae_parallel_degree 2 must be between 1 and the 1 process(es) started"),
        "bad_name": (dict(), ["--video_save_name", "../escape"], "is not a plain file name"),
        "missing_checkpoint": (dict(), ["--checkpoint_dir", str(d / "no_ckpt")], "checkpoint directory not found"),
        "too_many_frames": (dict(), ["--max_frames", "5"], "has 13 frames, more than --max_frames 5"),
        "too_large": (dict(), ["--max_resolution", "100"], "is 160x96, larger than --max_resolution 100"),
        "json_bomb_nesting": ("[" * 100_000, [], "JSON nested too deeply"),
        "json_bomb_size": ('{"prompt": "' + "a" * (1 << 20) + '"}', [], "more than the 1048576 a spec may have"),
    }


@pytest.fixture(scope="module")
def bad_inputs(short_inputs, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    for p in short_inputs.iterdir():
        shutil.copy(p, d / p.name)
    return d, _bad_cases(d)


@pytest.mark.parametrize("case", [
    "missing_video", "corrupt_mp4", "not_a_video", "empty_video", "unknown_control", "negative_weight", "bad_resolution",
    "short_control", "malformed_json", "no_input_control", "missing_preprocessor_weights", "missing_prompt", "bad_chunk", "too_many_steps",
    "too_many_threads", "vae_group_too_big", "bad_name", "missing_checkpoint", "too_many_frames", "too_large", "json_bomb_nesting", "json_bomb_size",
])
def test_bad_spec_input_fails_cleanly(tiny_ckpt, bad_inputs, tmp_path, capsys, case):
    d, cases = bad_inputs
    fields, extra, message = cases[case]
    spec = d / f"{case}.json"
    if isinstance(fields, str):
        spec.write_text(fields)
    else:
        write_spec(d, **fields).rename(spec)
    out = tmp_path / "out"
    code = main(["--controlnet_specs", str(spec), "--video_save_folder", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err and message in err[-1] and err[-1].startswith("transfer.py: error: ")
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("lines, message", [
    (['["not", "an", "object"]'], "batch.jsonl:1: each line must be a JSON object"),
    (['{"a": ' * 50_000], "batch.jsonl:1: JSON nested too deeply"),
    ([], "has no valid requests"),
])
def test_batch_without_a_valid_line_fails_before_writing(tiny_ckpt, bad_inputs, tmp_path, capsys, lines, message):
    d, _ = bad_inputs
    batch = d / "batch.jsonl"
    batch.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert main(["--batch_input_path", str(batch), "--video_save_folder", str(out), *FAST]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_bad_batch_line_is_recorded_and_the_rest_runs(tiny_ckpt, bad_inputs, tmp_path):
    d, _ = bad_inputs
    batch = d / "mixed.jsonl"
    good = {"prompt": "ok", "input_video_path": "example_input.mp4", "edge": {"input_control": "example_edge.mp4"}}
    batch.write_text("\n".join([json.dumps(good), '{"prompt": "broken", ',
                                json.dumps({**good, "input_video_path": "notes.mp4"})]) + "\n")
    out = tmp_path / "out"
    assert main(["--batch_input_path", str(batch), "--video_save_folder", str(out), *FAST]) == 3
    assert sorted(p.name for p in out.iterdir()) == ["failures.jsonl", "manifest.json", "video_0.mp4", "video_0.txt"]
    records = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert [r["line"] for r in records] == [2, 3]
    assert "invalid JSON" in records[0]["error"] and "cannot read input video" in records[1]["error"]
    assert records[1]["name"] == "video_2"  # default names follow the line, not the count of good lines


def test_error_exit_from_real_process(tiny_ckpt, bad_inputs, tmp_path):
    d, _ = bad_inputs
    spec = write_spec(d, input_video_path="nope.mp4")
    proc = run_cli("--controlnet_specs", str(spec), "--video_save_folder", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("transfer.py: error: ")
    assert "input video not found" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_control_without_controlnet_in_checkpoint_is_refused(tiny_reason_ckpt, short_inputs, tmp_path, capsys):
    spec = write_spec(short_inputs, edge=None, depth={"control_weight": 1.0, "input_control": "example_edge.mp4"})
    out = tmp_path / "out"
    assert main(["--checkpoint_dir", str(tiny_reason_ckpt), "--controlnet_specs", str(spec),
                 "--video_save_folder", str(out)]) == 2
    assert "control 'depth' requested but the checkpoint has no controlnet/depth/ (available: vis, edge)" in capsys.readouterr().err
    assert not out.exists()


def test_refusals_before_any_work_write_nothing(tmp_path):
    """Issue 30: output folders that cannot be, plan-only flags, a size the model cannot take found from metadata
    before a control is computed, the -i form refusing every sample: one line, exit 2, nothing written."""
    import numpy as np

    (tmp_path / "afile").write_text("not a folder")
    write_mp4(tmp_path / "odd.mp4", np.zeros((9, 50, 70, 3), np.uint8), 24)  # 70x50: the demo's unit is 8
    (tmp_path / "odd.json").write_text(json.dumps({"prompt": "a red circle on a blue background",
                                                   "input_video_path": "odd.mp4", "edge": {"control_weight": 1.0}}))
    (tmp_path / "miss25.json").write_text(json.dumps({"name": "m", "prompt": "x", "video_path": "nope.mp4", "edge": {}}))
    demo = str(ROOT / "assets" / "demo_spec.json")
    cases = [
        (["--controlnet_specs", demo, "--video_save_folder", str(tmp_path / "afile")],
         f"output folder {tmp_path / 'afile'} is a file, not a folder"),
        (["--controlnet_specs", demo, "--video_save_folder", str(tmp_path / "afile" / "sub")],
         f"output folder {tmp_path / 'afile' / 'sub'} is inside {tmp_path / 'afile'}, which is a file, not a folder"),
        (["-i", str(ROOT / "assets" / "demo_spec25.json"), "-o", str(tmp_path / "afile")],
         f"output folder {tmp_path / 'afile'} is a file, not a folder"),
        (["--controlnet_specs", demo, "--video_save_folder", str(tmp_path / "out"), "--height", "64"],
         "--height acts only with --plan (the generation size comes from the input video, or --resolution in the -i "
         "form)"),
        (["--controlnet_specs", str(tmp_path / "odd.json"), "--video_save_folder", str(tmp_path / "out")],
         f"{tmp_path / 'odd.json'}: resolution 70x50 is not a multiple of 8 in both dimensions"),
        (["-i", str(tmp_path / "miss25.json"), "-o", str(tmp_path / "out")],
         f"no request can run: {tmp_path / 'miss25.json'}: input video not found: {tmp_path / 'nope.mp4'}"),
    ]
    for args, message in cases:
        proc = run_cli(*args, "--checkpoint_preset", "demo", cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert proc.stderr.strip().splitlines()[-1] == f"transfer.py: error: {message}", args
        assert not (tmp_path / "out").exists(), args
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_a_size_the_checkpoint_never_saw_is_one_warning(tmp_path):
    from demo.world import Scene, render

    write_mp4(tmp_path / "s128.mp4", render(Scene.from_seed(5, 128), 5)[0], 24)
    (tmp_path / "s.json").write_text(json.dumps({"prompt": "a red circle on a blue background",
                                                 "input_video_path": "s128.mp4", "edge": {"control_weight": 1.0}}))
    proc = run_cli("--controlnet_specs", "s.json", "--video_save_folder", "out", "--num_frames_per_chunk", "5",
                   "--num_steps", "2", "--checkpoint_preset", "demo", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [line for line in proc.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and warnings[0].endswith(
        "the checkpoint declares resolution 64 (the size it was trained at); generating at 128x128, which it has not "
        "seen: expect worse results")
