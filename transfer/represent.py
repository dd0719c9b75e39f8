"""World-model representations: the VAE encoder's latents of videos and images, nothing else loaded.

    python -m transfer.represent INPUTS... --out DIR [--pool mean|max|none] [--layout thw|tokens]

Each input (a video, an image, or a folder of them) goes through the Wan VAE encoder of the
checkpoint (``--checkpoint_dir``, default: the embedded tiny one): ``latent_dist.mode()``
(deterministic), normalised with the VAE config's ``latents_mean`` / ``latents_std`` -- the 16-channel
latents the DiT sees. Videos are encoded whole, trimmed to the longest ``1 + 4k`` frames (the causal
VAE's step); an image is one frame. Width and height are cropped to multiples of 16 (centre).
No text encoder and no DiT are loaded.

Output per input: ``DIR/{stem}.npy``, float32:

- ``--pool mean`` (default) / ``max``: a ``(16,)`` vector (over time and space);
- ``--pool none --layout thw``: ``(T', H/8, W/8, 16)``; ``--layout tokens``: ``(T' * H/8 * W/8, 16)``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from transfer.errors import TransferError

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def load_vae_only(checkpoint_dir: str | None = None):
    """The checkpoint's VAE (our ``VideoVAE``) in fp32 on the default device; nothing else."""
    from transfer.checkpoint import inspect_checkpoint, load_vae
    from transfer.device import default_device

    if checkpoint_dir is None:
        from transfer.embedded_checkpoint import ensure_tiny_checkpoint

        checkpoint_dir = ensure_tiny_checkpoint("tiny")
    return load_vae(inspect_checkpoint(Path(checkpoint_dir)), default_device(), torch.float32)


def crop16(frames: np.ndarray) -> np.ndarray:
    h, w = frames.shape[1:3]
    h16, w16 = h // 16 * 16, w // 16 * 16
    if not h16 or not w16:
        raise TransferError(f"frames of {w}x{h} are smaller than 16 pixels")
    y, x = (h - h16) // 2, (w - w16) // 2
    return frames[:, y : y + h16, x : x + w16]


@torch.no_grad()
def encode_frames(vae, frames: np.ndarray) -> np.ndarray:
    """Normalised latents ``(T', h, w, 16)`` of uint8 frames ``(T, H, W, 3)``."""
    from transfer.chunks import to_model_video

    frames = crop16(frames)
    frames = frames[: 1 + (len(frames) - 1) // 4 * 4]
    latents = vae.encode(to_model_video(frames), torch.float32)[0]  # [16, T', h, w]
    return latents.permute(1, 2, 3, 0).cpu().numpy().astype(np.float32)


def pooled(latents: np.ndarray, pool: str, layout: str) -> np.ndarray:
    if pool == "mean":
        return latents.reshape(-1, latents.shape[-1]).mean(0)
    if pool == "max":
        return latents.reshape(-1, latents.shape[-1]).max(0)
    return latents if layout == "thw" else latents.reshape(-1, latents.shape[-1])


def read_input(path: Path) -> np.ndarray:
    from transfer.video_io import read_video

    if path.suffix.lower() in IMAGE_SUFFIXES:
        import imageio.v3 as iio

        try:
            image = iio.imread(path)
        except Exception as e:
            raise TransferError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        return np.ascontiguousarray(image[None, ..., :3]).astype(np.uint8)
    return read_video(path)[0]


def expand(inputs: list[Path]) -> list[Path]:
    out = []
    for p in inputs:
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if q.suffix.lower() in VIDEO_SUFFIXES + IMAGE_SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            raise TransferError(f"input not found: {p}")
    stems = [p.stem for p in out]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise TransferError(f"two inputs share the name {dup[0]!r}: outputs are named by stem")
    return out


def main(argv: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tqdm import tqdm

    p = argparse.ArgumentParser(prog="python -m transfer.represent", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", type=Path, help="videos, images, or folders of them")
    p.add_argument("--out", type=Path, required=True, help="output folder for {stem}.npy")
    p.add_argument("--pool", choices=("mean", "max", "none"), default="mean", help="pool over time and space (default: mean)")
    p.add_argument("--layout", choices=("thw", "tokens"), default="thw",
                   help="with --pool none: (T, H, W, 16) or tokens (T*H*W, 16) (default: thw)")
    p.add_argument("--checkpoint_dir", help="checkpoint whose VAE is used (default: the embedded tiny one)")
    args = p.parse_args(argv)
    try:
        inputs = expand(args.inputs)
        vae = load_vae_only(args.checkpoint_dir)
        args.out.mkdir(parents=True, exist_ok=True)
        from transfer.video_io import atomic_path

        for path in tqdm(inputs, desc="encode", unit="input"):
            vec = pooled(encode_frames(vae, read_input(path)), args.pool, args.layout)
            with atomic_path(args.out / f"{path.stem}.npy") as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, vec)
    except TransferError as e:
        print(f"python -m transfer.represent: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(inputs)} representation(s) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
