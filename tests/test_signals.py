"""SIGTERM / SIGINT: stop within a bounded time, non-zero on every rank, no half-written or temp file left."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, example_frames
from tests.test_distributed import _rank_pids, launch
from transfer.video_io import read_video, write_mp4


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("signals")
    write_mp4(d / "in.mp4", example_frames("example_input.mp4", 9), 24)
    write_mp4(d / "edge.mp4", example_frames("example_edge.mp4", 9), 24)
    edge = {"control_weight": 1.0, "input_control": "edge.mp4"}
    lines = [{"name": f"r{j}", "prompt": f"a ball, take {j}", "seed": j, "input_video_path": "in.mp4", "edge": edge}
             for j in range(4)]
    (d / "batch.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return d


def wait_for_file(path: Path, proc, timeout: float = 300) -> None:
    start = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() - start < timeout
        time.sleep(0.2)


def check_folder(folder: Path) -> list[str]:
    """Only complete outputs; no temp file."""
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]
    written = sorted(p.stem for p in folder.glob("*.mp4"))
    for name in written:
        assert read_video(folder / f"{name}.mp4")[0].shape == (9, 96, 160, 3)
        assert (folder / f"{name}.txt").exists()
    return written


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_single_process_stops_cleanly(tiny_ckpt, batch, tmp_path, sig, code):
    proc = launch(1, "--batch_input_path", str(batch / "batch.jsonl"), "--video_save_folder", str(tmp_path),
                  "--num_steps", "12", "--num_frames_per_chunk", "9", "--guardrail", "async", popen=True)
    wait_for_file(tmp_path / "r0.mp4", proc)
    os.kill(proc.pid, sig)
    start = time.monotonic()
    out, _ = proc.communicate(timeout=60)
    assert time.monotonic() - start < 30
    assert proc.returncode == code, out[-3000:]
    assert f"stopped by {sig.name}" in out
    written = check_folder(tmp_path)
    assert "r0" in written and written != ["r0", "r1", "r2", "r3"]


def test_a_stop_signal_lost_in_a_finalizer_still_stops_the_run(tiny_ckpt, batch, tmp_path):
    """SIGTERM landing inside an object's ``__del__`` (seen: imageio's reader finalizer): Python drops the handler's
    exception; the run must still stop as stopped (it used to generate the whole batch and exit 0)."""
    env = {"TRANSFER_TEST_FAULT": "0:finalizer",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "faults"), str(ROOT)])}
    proc = launch(1, "--batch_input_path", str(batch / "batch.jsonl"), "--video_save_folder", str(tmp_path),
                  "--num_steps", "12", "--num_frames_per_chunk", "9", "--guardrail", "async", env=env)
    out = proc.stdout + proc.stderr
    assert "Exception ignored" in out and "Terminated: SIGTERM" in out  # the handler's exception was dropped
    assert proc.returncode == 143, out[-3000:]
    assert "stopped by SIGTERM" in out
    assert check_folder(tmp_path) != ["r0", "r1", "r2", "r3"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_to_torchrun_stops_every_rank(tiny_ckpt, batch, tmp_path, sig):
    """SIGTERM to torchrun, or SIGINT to its process group (Ctrl-C in a terminal): its agent passes it on to every
    rank (each in a session of its own), and each rank prints one line and exits; the agent's own traceback
    (SignalException) follows, which nothing in a worker can prevent (docs/usage.md)."""
    proc = launch(4, "--batch_input_path", str(batch / "batch.jsonl"), "--video_save_folder", str(tmp_path),
                  "--num_steps", "12", "--num_frames_per_chunk", "9", "--guardrail", "async", popen=True)
    wait_for_file(tmp_path / "r0.mp4", proc)
    pids = _rank_pids(proc.pid)
    assert set(pids) == {0, 1, 2, 3}
    (os.killpg if sig == signal.SIGINT else os.kill)(proc.pid, sig)
    start = time.monotonic()
    out, _ = proc.communicate(timeout=90)
    assert time.monotonic() - start < 60
    assert proc.returncode != 0
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids.values())
    stopped = sorted(line for line in out.splitlines() if line.startswith("transfer.py: rank ") and " stopped by " in line)
    assert [line.split(" stopped by ")[0] for line in stopped] == [f"transfer.py: rank {r}" for r in range(4)], out[-3000:]
    assert all(f"stopped by {sig.name}" in line for line in stopped)
    written = check_folder(tmp_path)
    assert "r0" in written and written != ["r0", "r1", "r2", "r3"]


def test_a_stop_while_starting_is_one_line(tiny_ckpt, batch, tmp_path):
    """SIGINT 1.5 s in (importing torch and diffusers): the one line and 130, no KeyboardInterrupt traceback."""
    proc = launch(1, "--batch_input_path", str(batch / "batch.jsonl"), "--video_save_folder", str(tmp_path), popen=True)
    time.sleep(1.5)
    os.kill(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out and out.strip().splitlines()[-1].startswith("transfer.py: stopped by SIGINT")
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_a_main_thread_stuck_in_c_code_is_ended_after_the_grace(tmp_path):
    """The main thread inside a long C call (here numpy matrix products, which never run Python's signal handler;
    under torchrun: a collective waiting for a rank that already stopped) when SIGINT comes: the watchdog removes the
    temp file being written, prints the stop line and ends the process ``STOP_GRACE_S`` after the signal."""
    import subprocess
    import sys

    from transfer.errors import STOP_GRACE_S

    script = f"""
import os, signal, threading
import numpy as np
from transfer.errors import raise_on_stop_signals
from transfer.video_io import atomic_path
raise_on_stop_signals()
a = np.ones((6000, 6000))  # one product: about 10 s at one thread, with no signal check inside
with atomic_path({str(tmp_path / "out.bin")!r}) as tmp:
    open(tmp, "wb").write(b"partial")
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
    a @ a
print("not stopped")
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    elapsed = time.monotonic() - start
    assert proc.returncode == 130, proc.stdout + proc.stderr
    assert "not stopped" not in proc.stdout
    *_, stopped, removed = proc.stderr.strip().splitlines()
    assert stopped.startswith(f"transfer.py: stopped by SIGINT (ended {STOP_GRACE_S} s after it")
    assert removed.startswith("transfer.py: unfinished at the stop, removed: ") and removed.endswith(".tmp.bin")
    assert list(tmp_path.iterdir()) == []  # the temp file went, no final file
    assert elapsed < 60
