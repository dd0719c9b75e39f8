"""Files are a function of their contents: byte-identical across processes under CPU load; temp files are removed
only when their writer is gone."""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT
from transfer import video_io
from transfer.manifest import Manifest
from transfer.video_io import atomic_path, read_video, write_mp4, write_npz, write_text

#: Busy-loops torch matmuls on one thread until killed (two of them keep both cores of a CI machine busy).
BURNER = "import torch\ntorch.set_num_threads(1)\na = torch.randn(384, 384)\nwhile True:\n    a = torch.tanh(a @ a)\n"

#: One writer process: torch work first (it leaves the heap in a state of its own), then every kind of file.
WRITER = """
import sys
import numpy as np
import torch
from transfer.video_io import write_lossless_mp4, write_mp4, write_npz, write_text
out = sys.argv[1]
a = torch.randn(256, 256)
for _ in range(int(sys.argv[2])):
    a = torch.tanh(a @ a)
frames = np.load(sys.argv[3])
write_mp4(out + "/v.mp4", frames, 24)
write_mp4(out + "/v720.mp4", np.load(sys.argv[4]), 24)  # big enough for x264 to use its slice threads
write_lossless_mp4(out + "/v.lossless.mp4", frames, 24)
write_npz(out + "/v.npz", frames=frames, latents=np.linspace(0, 1, 1000, dtype=np.float32))
write_text(out + "/v.txt", "a prompt\\n")
"""


def frames_for_test(n: int = 24, height: int = 96, width: int = 160) -> np.ndarray:
    """Moving gradients and a square with mild noise: content on which libx264's default rate control (mbtree)
    gave a different bitstream on most encodes of the same frames (see transfer/video_io.py)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    out = np.empty((n, height, width, 3), np.uint8)
    for t in range(n):
        f = np.stack([np.sin((x + 3 * t) / 37) * 60 + 100 + y / height * 60, np.cos((y - 2 * t) / 23) * 60 + 120,
                      x * y / (width * height) * 200 + t], -1)
        cx, cy = (40 + 5 * t) % width, (30 + 3 * t) % height
        f[max(cy - 20, 0):cy + 20, max(cx - 20, 0):cx + 20] = (250, 30, 30)
        out[t] = np.clip(f + rng.normal(0, 4, f.shape), 0, 255)
    return out


@pytest.fixture
def busy_cores():
    """Two CPU-bound torch processes beside the test, for its whole duration."""
    procs = [subprocess.Popen([sys.executable, "-c", BURNER]) for _ in range(2)]
    time.sleep(1.0)
    yield
    for p in procs:
        p.kill()
        p.wait()


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_eight_processes_write_identical_files_under_load(tmp_path, busy_cores):
    frames = frames_for_test()
    np.save(tmp_path / "frames.npy", frames)
    np.save(tmp_path / "frames720.npy", frames_for_test(8, 720, 1280))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    outs, procs = [], []
    for i in range(8):  # all eight at once, each after a different amount of torch work
        outs.append(tmp_path / f"p{i}")
        outs[-1].mkdir()
        procs.append(subprocess.Popen([sys.executable, "-c", WRITER, str(outs[-1]), str(5 + 7 * i), str(tmp_path / "frames.npy"),
                                       str(tmp_path / "frames720.npy")],
                                      env=env, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    first = digests(outs[0])
    assert sorted(first) == ["v.lossless.mp4", "v.mp4", "v.npz", "v.txt", "v720.mp4"]
    for out in outs[1:]:
        assert digests(out) == first, out.name
    # and in this process too, where the test's own imports and allocations came first
    write_mp4(tmp_path / "here.mp4", frames, 24)
    assert hashlib.sha256((tmp_path / "here.mp4").read_bytes()).hexdigest() == first["v.mp4"]
    # the lossless file gives back the frames; the viewable one is a close (lossy) copy
    assert np.array_equal(read_video(outs[0] / "v.lossless.mp4")[0], frames)
    viewable = read_video(outs[0] / "v.mp4")[0]
    assert viewable.shape == frames.shape and np.abs(viewable.astype(int) - frames).mean() < 8


def test_pinned_settings_reach_the_encoder(tmp_path):
    """x264 writes the settings it encoded with into the stream: a fixed count of slice threads (the default: one
    per CPU core), macroblock-tree off, the pinned rate factor."""
    write_mp4(tmp_path / "a.mp4", frames_for_test(4, 720, 1280), 24)
    data = (tmp_path / "a.mp4").read_bytes()
    start = data.index(b"x264 - core")
    used = dict(o.split("=", 1) for o in data[start:data.index(b"\0", start)].decode().split() if "=" in o)
    assert used["threads"] == str(video_io.ENCODER_THREADS)
    assert used["mbtree"] == "0" and used["crf"] == "23.0" and used["sliced_threads"] == "1"
    assert b"Lavf" not in data  # bitexact container: no muxer version string


#: Holds a temp file of the project's writer open (and locked) until a line arrives on stdin.
HOLDER = """
import sys
from transfer.video_io import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("partial")
    print(tmp, flush=True)
    sys.stdin.readline()
    tmp.write_text("complete")
"""


def test_cleanup_removes_only_temp_files_whose_writer_is_gone(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder / "live.mp4")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    live = Path(holder.stdout.readline().strip())
    leftover = folder / ".dead.abcd1234.tmp.mp4"  # a killed writer's: nobody holds its lock
    leftover.write_text("partial")
    with atomic_path(folder / "mine.txt") as mine:  # one of this process's, being written
        mine.write_text("x")
        Manifest(folder).hold_folder()
        assert live.is_file() and mine.is_file() and not leftover.exists()
    holder.stdin.write("go\n")
    holder.stdin.close()
    assert holder.wait(timeout=60) == 0
    assert (folder / "live.mp4").read_text() == "complete" and (folder / "mine.txt").read_text() == "x"
    assert sorted(p.name for p in folder.iterdir()) == ["live.mp4", "mine.txt"]


def test_writer_makes_a_new_temp_file_when_a_cleanup_took_the_first(tmp_path, monkeypatch):
    """The moment between creating a temp file and locking it: a cleanup that wins it removes the file; the writer
    notices (its name no longer leads to the file it locked) and writes through a new one."""
    real_flock = fcntl.flock
    calls = []

    def flock(fd, op):
        if not calls:  # the first temp file: a cleanup gets there first
            calls.append(fd)
            assert video_io.remove_stale_temp_files(tmp_path)
        return real_flock(fd, op)

    monkeypatch.setattr(video_io.fcntl, "flock", flock)
    write_text(tmp_path / "a.txt", "hello")
    monkeypatch.undo()
    assert (tmp_path / "a.txt").read_text() == "hello" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_npz_carries_no_time(tmp_path):
    write_npz(tmp_path / "a.npz", x=np.arange(5))
    time.sleep(2.1)  # zip entries store times to 2 s
    write_npz(tmp_path / "b.npz", x=np.arange(5))
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
