"""Video and file I/O: decode with imageio (PyAV), atomic writes (temp file + rename)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from transfer.errors import TransferError


#: Defaults of ``--max_frames`` / ``--max_resolution``: a video beyond them is refused before it is decoded.
MAX_FRAMES = 10_000
MAX_SIDE = 4096


def read_video(path: str | Path, what: str = "video", max_frames: int = MAX_FRAMES,
               max_side: int = MAX_SIDE) -> tuple[np.ndarray, float]:
    """Decode ``path`` to uint8 frames ``[T, H, W, 3]`` and its fps; ``TransferError`` if unreadable or, from its
    container metadata (nothing decoded yet), longer than ``max_frames`` or larger than ``max_side`` on a side."""
    import imageio.v3 as iio

    path = Path(path)
    if not path.is_file():
        raise TransferError(f"{what} not found: {path}")
    try:
        props = iio.improps(path, plugin="pyav")
    except Exception as e:
        raise TransferError(f"cannot read {what} {path}: {type(e).__name__}: {e}") from None
    shape = props.shape if len(props.shape) == 4 else (1, *props.shape)
    if shape[0] > max_frames:
        raise TransferError(f"{what} {path} has {shape[0]} frames, more than --max_frames {max_frames}")
    if max(shape[1:3]) > max_side:
        raise TransferError(f"{what} {path} is {shape[2]}x{shape[1]}, larger than --max_resolution {max_side}")
    try:
        frames = iio.imread(path, plugin="pyav")
        fps = float(iio.immeta(path, plugin="pyav").get("fps") or 0.0)
    except Exception as e:  # PyAV raises many types for corrupt or non-video files
        raise TransferError(f"cannot read {what} {path}: {type(e).__name__}: {e}") from None
    if frames.ndim == 3:  # a single image decodes as [H, W, 3]
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[0] == 0 or frames.shape[-1] != 3:
        raise TransferError(f"cannot read {what} {path}: decoded shape {frames.shape} is not RGB video frames")
    return frames, fps


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


@contextmanager
def atomic_path(final: str | Path):
    """Yield a temp path beside ``final``; rename it over ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=f".tmp{final.suffix}", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the final file normal permissions
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_mp4(path: str | Path, frames: np.ndarray, fps: float) -> None:
    """Atomically write uint8 frames ``[T, H, W, 3]`` as an H.264 mp4."""
    import imageio.v3 as iio

    with atomic_path(path) as tmp:
        iio.imwrite(tmp, frames, plugin="pyav", codec="libx264", fps=fps, in_pixel_format="rgb24")


def write_npz(path: str | Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
