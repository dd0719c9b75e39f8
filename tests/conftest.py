"""Shared fixtures: tiny checkpoints built once per session into a private cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
#: The suite runs the random-weight ``tiny`` preset (every control, fast) unless a test names another; the user's
#: default (the shipped ``demo``) has tests of its own (tests/test_demo_checkpoint.py).
os.environ["TRANSFER_CHECKPOINT_PRESET"] = "tiny"
#: The suite runs in two pytest-xdist workers (README's test command: ``-n 2 --dist loadfile``, a file's tests in one
#: worker, its module fixtures built once); each worker's torchrun launches take their own rendezvous port (torchrun
#: reads ``PET_MASTER_PORT``; two launches on its default 29500 at once would collide).
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _WORKER.startswith("gw"):
    os.environ["PET_MASTER_PORT"] = str(29500 + 100 * (int(_WORKER[2:]) + 1))

#: Test files in order of their work, most first (measured, --durations), so that the workers, which take whole files
#: in this order, end together instead of one running the last long file alone; files not named follow, as collected.
MOST_WORK_FIRST = ("test_docs.py", "test_distributed.py", "test_sequence_parallel.py", "test_transfer25.py",
                   "test_resume.py", "test_train_demo.py", "test_stage_failures.py", "test_equality.py", "test_ab.py",
                   "test_step_cache.py", "test_guardrails.py", "test_sequence_parallel_benchmark.py",
                   "test_long_video.py", "test_cosmos3_runs.py", "test_signals.py", "test_random_weights.py",
                   "test_acceleration.py", "test_real_size.py", "test_demo_checkpoint.py", "test_cosmos3.py",
                   "test_batch_hostile.py", "test_cli.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(MOST_WORK_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    path = Path(os.environ.get("TRANSFER_TEST_CACHE") or tmp_path_factory.mktemp("cache"))
    os.environ["TRANSFER_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(cache_dir) -> Path:
    from transfer.embedded_checkpoint import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint("tiny")


@pytest.fixture(scope="session")
def tiny_reason_ckpt(cache_dir) -> Path:
    from transfer.embedded_checkpoint import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint("tiny-reason")


def failure(proc: subprocess.CompletedProcess) -> str:
    """What a failed run said: every rank's error lines first (torchrun's summary of the exit codes fills the tail
    and hid them once), then the last lines of its output."""
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [line for line in lines if "rror" in line and "elastic" not in line][:40]
    return "\n".join(["errors:", *errors, "tail:", *lines[-40:]])


def run_cli(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python transfer.py ARGS`` as a user would; returns the completed process."""
    full_env = {**os.environ, "TRANSFER_LOG_LEVEL": "WARNING", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "transfer.py"), *args], cwd=cwd, env=full_env, capture_output=True, text=True,
        timeout=900,
    )


def short_edge_inputs(folder: Path, num_frames: int) -> Path:
    """``folder/in.mp4`` and ``folder/edge.mp4``: the first ``num_frames`` of the example input and its edge control."""
    from transfer.video_io import write_mp4

    write_mp4(folder / "in.mp4", example_frames("example_input.mp4", num_frames), 24)
    write_mp4(folder / "edge.mp4", example_frames("example_edge.mp4", num_frames), 24)
    return folder


def short_edge_spec(folder: Path, num_frames: int, prompt: str) -> Path:
    """``folder/spec.json``: ``prompt`` over ``short_edge_inputs`` (absolute paths, edge weight 1)."""
    import json

    short_edge_inputs(folder, num_frames)
    path = folder / "spec.json"
    path.write_text(json.dumps({"prompt": prompt, "input_video_path": str(folder / "in.mp4"),
                                "edge": {"control_weight": 1.0, "input_control": str(folder / "edge.mp4")}}))
    return path


def example_frames(name: str, num_frames: int | None = None) -> np.ndarray:
    from transfer.video_io import read_video

    frames, _ = read_video(ASSETS / name)
    return frames if num_frames is None else frames[:num_frames]
