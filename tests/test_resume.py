"""Resume: rerunning a command skips complete outputs (verified against manifest.json), redoes incomplete ones,
refuses changed settings unless --overwrite; a killed 4-process batch, rerun, equals an uninterrupted run bit for bit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import short_edge_inputs
from tests.test_distributed import _rank_pids, launch, reference_run
from transfer.cli import main
from transfer.manifest import Manifest

FAST = ["--num_steps", "2", "--num_frames_per_chunk", "5", "--save_raw"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return short_edge_inputs(tmp_path_factory.mktemp("resume"), 5)


def write_batch(folder: Path, lines: list[dict]) -> Path:
    edge = {"control_weight": 1.0, "input_control": str(folder / "edge.mp4")}
    path = folder / "batch.jsonl"
    path.write_text("".join(json.dumps({"input_video_path": str(folder / "in.mp4"), "edge": edge, **x}) + "\n" for x in lines))
    return path


LINES = [{"name": "a", "prompt": "a ball", "seed": 1}, {"name": "b", "prompt": "a box", "seed": 2},
         {"name": "c", "prompt": "a nude figure", "seed": 3}]  # c: blocked by the built-in blocklist


def snapshot(folder: Path) -> dict[str, tuple[bytes, int, int]]:
    """name -> (bytes, inode, mtime_ns) of every file."""
    return {p.name: (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def run(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def test_rerun_skips_complete_outputs_and_redoes_incomplete_ones(tiny_ckpt, inputs, tmp_path, capsys):
    batch = write_batch(inputs, LINES)
    out = tmp_path / "out"
    args = ["--batch_input_path", str(batch), "--video_save_folder", str(out), *FAST]
    assert run(capsys, *args)[0] == 0
    first = snapshot(out)
    assert sorted(first) == ["a.mp4", "a.npz", "a.txt", "b.mp4", "b.npz", "b.txt", "c.blocked.json", "manifest.json"]
    entries = json.loads((out / "manifest.json").read_text())["requests"]
    assert {n: e["state"] for n, e in entries.items()} == {"a": "written", "b": "written", "c": "blocked"}
    assert sorted(entries["a"]["files"]) == ["a.mp4", "a.npz", "a.txt"]

    # the same command again: everything is complete, nothing is rewritten
    code, err = run(capsys, *args)
    assert code == 0 and "3 request(s) complete from an earlier run, skipped: a, b, c" in err
    assert "checkpoint" not in err  # no model was loaded
    assert snapshot(out) == first

    # a truncated video and a deleted npz are redone (verified, not just present); the rest is left alone
    (out / "a.mp4").write_bytes(first["a.mp4"][0][:1000])
    (out / "b.npz").unlink()
    code, err = run(capsys, *args)
    assert code == 0
    assert "a: redoing: a.mp4 differs from the one recorded" in err and "b: redoing: b.npz is missing" in err
    assert "1 request(s) complete from an earlier run, skipped: c" in err
    again = snapshot(out)
    assert sorted(again) == sorted(first)
    for name in ("a.mp4", "a.npz", "b.mp4", "b.npz"):
        assert again[name][0] == first[name][0], name  # regenerated bit for bit
    assert again["c.blocked.json"] == first["c.blocked.json"]  # untouched: same inode and mtime


def test_changed_settings_are_refused_unless_overwrite(tiny_ckpt, inputs, tmp_path, capsys):
    batch = write_batch(inputs, LINES[:2])
    out = tmp_path / "out"
    args = ["--batch_input_path", str(batch), "--video_save_folder", str(out), *FAST]
    assert run(capsys, *args)[0] == 0
    first = snapshot(out)

    write_batch(inputs, [LINES[0], {**LINES[1], "seed": 99}])  # the same file, one seed changed
    code, err = run(capsys, *args)
    assert code == 3  # b refused and recorded, a skipped
    assert "b: " in err and "holds its outputs made with other settings (seed: 2 -> 99); pass --overwrite" in err
    (record,) = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert record["name"] == "b" and record["line"] == 2 and "seed: 2 -> 99" in record["error"]
    assert {k: v for k, v in snapshot(out).items() if k.startswith(("a.", "b."))} == \
        {k: v for k, v in first.items() if k.startswith(("a.", "b."))}

    # a run-wide flag changes every request; a single spec fails with one line
    code, err = run(capsys, *args, "--fps", "12")
    assert code == 3
    records = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert [r["name"] for r in records] == ["a", "b"] and all("fps: 24.0 -> 12.0" in r["error"] for r in records)

    code, err = run(capsys, *args, "--overwrite")
    assert code == 0 and "b: replacing outputs made with other settings (seed: 2 -> 99) (--overwrite)" in err
    now = snapshot(out)
    assert not (out / "failures.jsonl").exists()  # a run without failures removes the old record
    assert now["a.mp4"] == first["a.mp4"] and now["b.mp4"][0] != first["b.mp4"][0]
    assert json.loads((out / "manifest.json").read_text())["requests"]["b"]["settings"]["seed"] == 99


def test_single_spec_refusal_is_one_line_and_a_moved_input_is_no_change(tiny_ckpt, inputs, tmp_path, capsys):
    spec = tmp_path / "spec.json"
    edge = {"control_weight": 1.0, "input_control": str(inputs / "edge.mp4")}
    spec.write_text(json.dumps({"prompt": "a ball", "input_video_path": str(inputs / "in.mp4"), "edge": edge}))
    out = tmp_path / "out"
    args = ["--controlnet_specs", str(spec), "--video_save_folder", str(out), *FAST]
    assert run(capsys, *args)[0] == 0
    first = snapshot(out)
    code, err = run(capsys, *args, "--num_steps", "3")
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"transfer.py: error: output: {out} holds its outputs made with other settings (generation.num_steps: 2 -> 3); "
        "pass --overwrite to replace them, or give another --video_save_folder")
    # the same bytes under another path are the same input
    shutil.copy(inputs / "in.mp4", tmp_path / "moved.mp4")
    spec.write_text(json.dumps({"prompt": "a ball", "input_video_path": str(tmp_path / "moved.mp4"), "edge": edge}))
    code, err = run(capsys, *args)
    assert code == 0 and "output: complete from an earlier run" in err
    assert snapshot(out) == first


def test_folder_is_held_and_leftovers_of_a_killed_run_are_removed(tiny_ckpt, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--batch_input_path", str(write_batch(inputs, LINES[:1])), "--video_save_folder", str(out), *FAST]
    holder = Manifest(out)
    holder.hold_folder()  # as another run writing there would
    code, err = run(capsys, *args)
    assert code == 2 and f"another run is writing to {out}" in err
    assert sorted(p.name for p in out.iterdir()) == []
    holder.release_folder()
    (out / ".a.k3j_x9q2.tmp.mp4").write_bytes(b"half a video")  # what a SIGKILL in the middle of a write leaves
    (out / ".keep").write_text("not ours")
    code, err = run(capsys, *args)
    assert code == 0 and "removing .a.k3j_x9q2.tmp.mp4, left by an interrupted run" in err
    assert sorted(p.name for p in out.iterdir()) == [".keep", "a.mp4", "a.npz", "a.txt", "manifest.json"]


@pytest.mark.parametrize("content", ["{", '{"version": 1, "requests": []}', '{"version": 7, "requests": {}}'])
def test_a_broken_manifest_stops_the_run_before_anything_is_written(tiny_ckpt, inputs, tmp_path, capsys, content):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(content)
    code, err = run(capsys, "--batch_input_path", str(write_batch(inputs, LINES[:1])), "--video_save_folder", str(out), *FAST)
    assert code == 2 and "manifest" in err.strip().splitlines()[-1] and "move it away" in err
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]


# -- the acceptance test: a 4-process batch stopped the hard way, rerun --------------------------------------------

SLOW = ["--num_steps", "12", "--num_frames_per_chunk", "9", "--save_raw", "--guardrail", "async"]


@pytest.fixture(scope="module")
def killable(tmp_path_factory) -> Path:
    d = short_edge_inputs(tmp_path_factory.mktemp("killable"), 9)
    write_batch(d, [{"name": f"r{j}", "prompt": f"a ball, take {j}", "seed": j} for j in range(4)])
    return d


@pytest.fixture(scope="module")
def uninterrupted(tiny_ckpt, killable, tmp_path_factory) -> Path:
    return reference_run(killable / "batch.jsonl", tmp_path_factory.mktemp("uninterrupted"), *SLOW)


def outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "manifest.json"}


def test_stage_processes_resume_a_single_process_folder(tiny_ckpt, killable, uninterrupted, tmp_path):
    """The placement is not a setting: a 4-rank rerun into a 1-process run's folder has nothing to do."""
    shutil.copytree(uninterrupted, tmp_path / "out")
    proc = launch(4, "--batch_input_path", str(killable / "batch.jsonl"), "--video_save_folder", str(tmp_path / "out"), *SLOW)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 request(s) complete from an earlier run, skipped: r0, r1, r2, r3" in proc.stderr
    assert outputs(tmp_path / "out") == outputs(uninterrupted)


@pytest.mark.parametrize("how", ["SIGKILL rank 3 (dit)", "SIGKILL rank 0 (coordinator, writer)", "SIGTERM torchrun"])
def test_killed_batch_rerun_equals_uninterrupted_run(tiny_ckpt, killable, uninterrupted, tmp_path, how):
    out = tmp_path / "out"
    args = ["--batch_input_path", str(killable / "batch.jsonl"), "--video_save_folder", str(out), *SLOW]
    proc = launch(4, *args, popen=True)
    start = time.monotonic()
    while '"r0"' not in ((out / "manifest.json").read_text() if (out / "manifest.json").exists() else ""):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() - start < 300
        time.sleep(0.1)
    pids = _rank_pids(proc.pid)
    if how.startswith("SIGKILL"):
        os.kill(pids[int(how.split()[2])], signal.SIGKILL)
    else:
        os.kill(proc.pid, signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, log[-3000:]
    done = json.loads((out / "manifest.json").read_text())["requests"]
    assert "r0" in done and len(done) < 4, log[-3000:]  # stopped mid-batch
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir() if p.stem in done}

    rerun = launch(4, *args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{len(done)} request(s) complete from an earlier run, skipped: {', '.join(sorted(done))}" in rerun.stderr
    # every output exactly once, complete, equal to the uninterrupted run's; no temp file, no failure record
    assert sorted(p.name for p in out.iterdir()) == sorted([*outputs(uninterrupted), "manifest.json"])
    assert outputs(out) == outputs(uninterrupted)
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir() if p.stem in done} == kept  # not redone
    assert sorted(json.loads((out / "manifest.json").read_text())["requests"]) == ["r0", "r1", "r2", "r3"]
