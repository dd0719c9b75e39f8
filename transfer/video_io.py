"""Video and file I/O: decode with imageio (PyAV), encode with PyAV under pinned settings, atomic writes.

Every file written here is a function of its contents, never of the machine, its load or thread timing:

- **mp4 (viewable)**: H.264 (libx264) with every setting that decides the bytes pinned (``MP4_OPTIONS``): a fixed
  count of slice threads (``ENCODER_THREADS``; the default through PyAV is one per CPU core:
  each count its own bytes), frame timestamps set from the
  frame index, the container written ``bitexact`` (no muxer version string), and x264's macroblock-tree rate
  control off (``mbtree=0``): with it on, the same frames encoded twice in one single-threaded process gave
  different bitstreams (measured with PyAV 18.1 / x264 core 165 at 160x96: 5 hashes in 5 tries; at 720p: 1).
- **lossless mp4** (``write_lossless_mp4``): libx264rgb at qp 0 (RGB, no chroma subsampling, no rate control),
  decoded bit for bit; the cache of computed controls, so generation never sees a lossy copy.
- npz / txt: numpy's zip writer stamps no time (1980-01-01 in every entry).

Writes are atomic: a temp file beside the target, locked (``flock``) by its writer from creation to rename, so a
cleanup (``remove_stale_temp_files``) removes only temp files whose writer is gone.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from transfer.errors import BEFORE_FORCED_EXIT, TransferError


#: Defaults of ``--max_frames`` / ``--max_resolution``: a video beyond them is refused before it is decoded.
MAX_FRAMES = 10_000
MAX_SIDE = 4096


_SHAPES: dict[tuple, tuple[int, int, int]] = {}


def video_shape(path: str | Path, what: str = "video", max_frames: int = MAX_FRAMES,
                max_side: int = MAX_SIDE) -> tuple[int, int, int]:
    """``(frames, height, width)`` of ``path`` from its container metadata (nothing decoded); ``TransferError`` if it
    is missing, empty or not a video, or longer than ``max_frames`` or larger than ``max_side`` on a side. Read once
    per process for a given (path, size, mtime), as ``file_digest``."""
    import imageio.v3 as iio

    path = Path(path)
    if not path.is_file():
        raise TransferError(f"{what} not found: {path}")
    stat = path.stat()
    if stat.st_size == 0:
        raise TransferError(f"cannot read {what} {path}: empty file")
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHAPES:
        try:
            props = iio.improps(path, plugin="pyav")
        except Exception:  # PyAV's own words ("can not handle the given uri", "unknown error ... plugin") say nothing
            raise TransferError(f"cannot read {what} {path}: not a video PyAV/FFmpeg can decode") from None
        shape = props.shape if len(props.shape) == 4 else (1, *props.shape)
        _SHAPES[key] = tuple(int(v) for v in shape[:3])
    shape = _SHAPES[key]
    if shape[0] > max_frames:
        raise TransferError(f"{what} {path} has {shape[0]} frames, more than --max_frames {max_frames}")
    if max(shape[1:3]) > max_side:
        raise TransferError(f"{what} {path} is {shape[2]}x{shape[1]}, larger than --max_resolution {max_side}")
    return shape


def read_video(path: str | Path, what: str = "video", max_frames: int = MAX_FRAMES,
               max_side: int = MAX_SIDE) -> tuple[np.ndarray, float]:
    """Decode ``path`` to uint8 frames ``[T, H, W, 3]`` and its fps; ``TransferError`` if unreadable or, from its
    container metadata (``video_shape``: nothing decoded yet), longer than ``max_frames`` or larger than ``max_side``
    on a side."""
    import imageio.v3 as iio

    path = Path(path)
    video_shape(path, what, max_frames, max_side)
    try:  # one open: imageio's PyAV plugin runs a full gc.collect() on every close (freeze_heap)
        with iio.imopen(path, "r", plugin="pyav") as video:
            frames = video.read()
            fps = float(video.metadata().get("fps") or 0.0)
    except Exception as e:  # PyAV raises many types for corrupt or non-video files
        raise TransferError(f"cannot read {what} {path}: {type(e).__name__}: {e}") from None
    if frames.ndim == 3:  # a single image decodes as [H, W, 3]
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[0] == 0 or frames.shape[-1] != 3:
        raise TransferError(f"cannot read {what} {path}: decoded shape {frames.shape} is not RGB video frames")
    return frames, fps


def freeze_heap() -> None:
    """Hide what is on the heap now (modules, models) from Python's cyclic collector. imageio's PyAV plugin runs a
    full ``gc.collect()`` each time it closes a video (PyAV's filter graphs are cycles whose destructor joins
    threads): with torch, diffusers and the models loaded, each one took 0.16 s on this 2-core machine, about 4 s of
    every request of a tiny-model batch. After ``gc.freeze()`` a collection walks only what was made since; garbage
    made later is still collected. Called once the imports are done and again once the models are loaded."""
    import gc

    gc.collect()  # what is already garbage goes now, not frozen with the rest
    gc.freeze()


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str | Path, cached: bool = True) -> str:
    """SHA-256 of a file's bytes; ``cached``: once per process for a given (path, size, mtime) -- inputs are hashed
    for control file names and for the resume manifest, outputs (``cached=False``) are read again each time."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if cached and key in _DIGESTS:
        return _DIGESTS[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if cached:
        _DIGESTS[key] = h.hexdigest()
    return h.hexdigest()


#: Names ``atomic_path`` gives its temp files (``.STEM.`` + mkstemp's 8 random characters + ``.tmp.EXT``).
TEMP_FILE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$")


def _locked_temp_file(final: Path) -> tuple[int, Path]:
    """A new temp file beside ``final`` and an open fd holding an exclusive ``flock`` on it.

    A cleanup may take the lock of a file created a moment ago, before its writer locked it, and remove it; so after
    locking, the writer checks that its name still leads to the file it locked, and makes another one if not."""
    while True:
        fd, tmp = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=f".tmp{final.suffix}", dir=final.parent)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # blocks only while a cleanup holds it
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            return fd, Path(tmp)  # a file system without flock: no cleanup can lock it either
        try:
            if os.path.samestat(os.stat(tmp), os.fstat(fd)):
                return fd, Path(tmp)
        except FileNotFoundError:
            pass
        os.close(fd)  # removed by a cleanup before we locked it: never written, nothing lost


@contextmanager
def atomic_path(final: str | Path):
    """Yield a temp path beside ``final``, locked by this process until it is renamed over ``final`` (only if the
    block succeeds) or removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _locked_temp_file(final)
    _LIVE_TEMPS.add(str(tmp))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the final file normal permissions
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        os.close(fd)  # releases the lock, after the rename or the removal
        _LIVE_TEMPS.discard(str(tmp))


#: Temp files this process is writing (``atomic_path``): a forced exit after a stop signal removes them.
_LIVE_TEMPS: set[str] = set()


def _remove_live_temp_files() -> list[str]:
    removed = []
    for name in list(_LIVE_TEMPS):
        try:
            os.unlink(name)
            removed.append(name)
        except OSError:
            pass
    return removed


BEFORE_FORCED_EXIT.append(_remove_live_temp_files)


def remove_stale_temp_files(folder: str | Path) -> list[str]:
    """Remove the temp files in ``folder`` whose writer is gone (a killed run's); names of the removed.

    A temp file is removed only while holding its ``flock``, which a live writer -- this process, another rank or
    another run -- holds from its creation to its rename; and only if its name still leads to the locked file."""
    removed = []
    for path in sorted(Path(folder).iterdir()):
        if not TEMP_FILE.match(path.name):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # renamed or removed meanwhile, or not a plain file
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False)):
                os.unlink(path)
                removed.append(path.name)
        except OSError:  # locked (its writer is alive), no flock here, or renamed meanwhile: leave it
            pass
        finally:
            os.close(fd)
    return removed


#: Encoder threads of every mp4, as x264 *slices*: each frame is cut into this many slices, encoded independently
#: and joined before the next frame, so no decision depends on thread timing. A constant, so the bytes do not follow
#: the machine's CPU count (PyAV's default, 0 = auto, does). x264 uses fewer on small frames (1 below about 200 rows).
ENCODER_THREADS = 2
#: libx264 settings of the viewable mp4 (``mbtree=0``: see the module docstring).
MP4_OPTIONS = {"preset": "medium", "crf": "23", "x264-params": "mbtree=0"}
#: libx264rgb settings of the lossless mp4 (qp 0 is lossless; ultrafast: the cache is written once per input).
LOSSLESS_OPTIONS = {"preset": "ultrafast", "qp": "0"}


def _encode(path: Path, frames: np.ndarray, fps: float, codec: str, pix_fmt: str, options: dict) -> None:
    """Encode uint8 frames ``[T, H, W, 3]`` to ``path`` with PyAV (imageio's writer does not expose the codec
    options and thread count that make the bytes reproducible)."""
    from fractions import Fraction

    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    rate = Fraction(fps).limit_denominator(65535)
    with av.open(str(path), "w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        stream.time_base = time_base = 1 / rate
        stream.codec_context.thread_type = "SLICE"
        stream.codec_context.thread_count = ENCODER_THREADS
        stream.options = dict(options)
        for i, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            picture.pts, picture.time_base = i, time_base
            container.mux(stream.encode(picture))
        container.mux(stream.encode(None))


def write_mp4(path: str | Path, frames: np.ndarray, fps: float) -> None:
    """Atomically write uint8 frames ``[T, H, W, 3]`` as an H.264 mp4 (yuv420p, reproducible bytes)."""
    with atomic_path(path) as tmp:
        _encode(tmp, frames, fps, "libx264", "yuv420p", MP4_OPTIONS)


def write_lossless_mp4(path: str | Path, frames: np.ndarray, fps: float) -> None:
    """Atomically write uint8 frames as a lossless RGB H.264 mp4: ``read_video`` gives back the same frames."""
    with atomic_path(path) as tmp:
        _encode(tmp, frames, fps, "libx264rgb", "rgb24", LOSSLESS_OPTIONS)


def write_npz(path: str | Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
