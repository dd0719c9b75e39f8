"""A request that fails inside a stage process (out of memory, say) is recorded and the rest of the batch runs.

The fault is injected by tests/faults/sitecustomize.py into one rank's stage method, for the one 128-pixel-high
("poison") request; the other requests must come out bit-identical to a single-process run of them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import ROOT, example_frames
from tests.test_distributed import FAST, launch, reference_run
from transfer.video_io import write_mp4


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("poison")
    for name in ("example_input.mp4", "example_edge.mp4"):
        frames = example_frames(name, 9)
        write_mp4(d / name, frames, 24)
        write_mp4(d / f"tall_{name}", np.stack([cv2.resize(f, (160, 128)) for f in frames]), 24)
    ok = {"input_video_path": "example_input.mp4", "edge": {"control_weight": 1.0, "input_control": "example_edge.mp4"}}
    poison = {"input_video_path": "tall_example_input.mp4",
              "edge": {"control_weight": 1.0, "input_control": "tall_example_edge.mp4"}}
    lines = [{"name": "first", "prompt": "a ball", "seed": 1, **ok}, {"name": "second", "prompt": "a box", "seed": 2, **ok},
             {"name": "poison", "prompt": "a poison apple", "seed": 3, **poison},  # j = 2: DiT group (3, 4) with 6 ranks
             {"name": "last", "prompt": "a lamp", "seed": 4, **ok}]
    (d / "batch.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (d / "good.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines if x["name"] != "poison"))
    # the coordinator is also the CFG leader: it must hear of its partner's failure while waiting for a velocity
    (d / "leader_is_coordinator.json").write_text(json.dumps({"coordinator": 0, "text": 2, "vae": 2, "dit_groups": [[0, 1]]}))
    # every stage on a rank of its own (the small-GPU layout): a failure is caught where it happens
    (d / "four.json").write_text(json.dumps({"coordinator": 0, "text": 1, "vae": 2, "dit_groups": [[3]]}))
    (d / "six.json").write_text(json.dumps({"coordinator": 0, "text": 1, "vae": 2, "dit_groups": [[3, 4], [5]]}))
    return d


@pytest.fixture(scope="module")
def reference(tiny_ckpt, batch, tmp_path_factory) -> Path:
    return reference_run(batch / "good.jsonl", tmp_path_factory.mktemp("reference"), "--save_raw", *FAST)


@pytest.mark.parametrize("nproc, fault, where, placement", [
    (4, "3:dit", "rank 3 (dit) failed on it (denoise)", "four.json"),
    (4, "2:vae", "rank 2 (vae) failed on it (encode_controls)", "four.json"),
    (4, "1:text", "rank 1 (text) failed on it (text)", "four.json"),
    (6, "4:partner", "rank 4 (dit) failed on it (shard_chunk)", "six.json"),
    (3, "1:partner", "rank 1 (dit) failed on it (shard_chunk)", "leader_is_coordinator.json"),
])
def test_a_request_failing_in_a_stage_is_recorded_and_the_rest_runs(tiny_ckpt, batch, reference, tmp_path, nproc, fault, where,
                                                                   placement):
    env = {"TRANSFER_TEST_FAULT": fault, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "faults"), str(ROOT)])}
    extra = ["--placement", str(batch / placement)] if placement else []
    proc = launch(nproc, "--batch_input_path", str(batch / "batch.jsonl"), "--video_save_folder", str(tmp_path), "--save_raw",
                  *FAST, *extra, env=env)
    # the coordinator exits 3 (some requests failed, the others were written); torchrun itself exits 1
    assert proc.returncode == 1 and "exitcode  : 3" in proc.stderr, proc.stderr[-3000:]
    (record,) = [json.loads(x) for x in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert record["name"] == "poison" and record["line"] == 3
    assert record["error"] == f"{where}: RuntimeError: CUDA out of memory (injected by tests/faults)"
    assert sorted(p.stem for p in tmp_path.glob("*.mp4")) == ["first", "last", "second"]
    for name in ("first", "second", "last"):
        ref, got = np.load(reference / f"{name}.npz"), np.load(tmp_path / f"{name}.npz")
        assert np.array_equal(ref["frames"], got["frames"]) and np.array_equal(ref["latents"], got["latents"]), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    if fault == "3:dit":  # the fault gone (say, a bigger GPU), the rerun makes only what is missing
        again = launch(nproc, "--batch_input_path", str(batch / "batch.jsonl"), "--video_save_folder", str(tmp_path),
                       "--save_raw", *FAST, *extra)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "3 request(s) complete from an earlier run, skipped: first, second, last" in again.stderr
        assert (tmp_path / "poison.mp4").is_file() and not (tmp_path / "failures.jsonl").exists()


def test_a_failing_sequence_shard_ends_every_rank(tiny_ckpt, batch, reference, tmp_path):
    """4 ranks, ``--context_parallel_size 2``: the preset's one cfg 2 x sp 2 DiT group: rank 2 (a sequence shard of the unconditional branch) fails on
    the poison request. Its branch partner is inside a collective with it, so the run ends (non-zero, bounded time,
    every rank gone); the requests written before it are complete and equal the reference; nothing half-written."""
    import time

    env = {"TRANSFER_TEST_FAULT": "2:dit", "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "faults"), str(ROOT)])}
    start = time.monotonic()
    proc = launch(4, "--batch_input_path", str(batch / "batch.jsonl"), "--video_save_folder", str(tmp_path), "--save_raw",
                  "--context_parallel_size", "2", *FAST, env=env)
    assert proc.returncode != 0 and time.monotonic() - start < 180, proc.stderr[-3000:]
    assert "DiT groups [0, 1, 2, 3] (cfg 2 x sp 2)" in proc.stderr
    assert "rank 2 (vae+dit) failed" in proc.stderr or "rank 2 (dit) failed" in proc.stderr, proc.stderr[-3000:]
    assert "CUDA out of memory (injected by tests/faults)" in proc.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    written = sorted(p.stem for p in tmp_path.glob("*.mp4"))
    assert set(written) <= {"first", "second"}, written  # in order through the one group; the coordinator is a shard
    for name in written:
        ref, got = np.load(reference / f"{name}.npz"), np.load(tmp_path / f"{name}.npz")
        assert np.array_equal(ref["frames"], got["frames"]) and np.array_equal(ref["latents"], got["latents"]), name
