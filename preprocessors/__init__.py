"""Control preprocessors: compute a control video from the input video when a spec gives none.

One module per modality (the control registry, ``configs.controls``), imported only when a request needs it:

=========  ============================  ===================================================
modality   module                        what it computes
=========  ============================  ===================================================
vis        ``preprocessors.vis``         bilateral blur + down/up resize (OpenCV), presets
edge       ``preprocessors.edge``        Canny edges (OpenCV), threshold presets
depth      ``preprocessors.depth``       Depth-Anything (transformers), local weights
seg        ``preprocessors.seg``         GroundingDINO boxes + SAM2 video masks (transformers)
keypoint   ``preprocessors.keypoint``    person detector + ViTPose (transformers), skeletons
=========  ============================  ===================================================

Each module has ``Config.from_options(options)`` (its own few settings) and ``Preprocessor(config)``
with ``key(request)`` (what, beyond the input video, its output depends on) and
``__call__(frames, request) -> frames`` (uint8 ``[T, H, W, 3]`` in, same size and length out).
A preprocessor is built once per process and reused for the whole batch; model-backed ones load
their weights on first use.

``ControlMaker`` writes each computed control twice, atomically: ``{folder}/{modality}_input_control_{key}_r{RANK}.mp4``
to look at (H.264, lossy) and ``{...}_r{RANK}.lossless.mp4``, the cache (RGB H.264 at qp 0: decodes to the very
frames computed). ``key`` hashes the input video's bytes, the modality and its parameters; ``RANK`` is the global
rank of the writer. Generation uses the frames the preprocessor returned, never a lossy copy; a later run with the
same input and parameters (or the coordinator, when another rank computes) reads the lossless file and gets them bit
for bit. Only the rank that prepares requests (the coordinator), or the placement's preprocess rank, computes.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from loguru import logger

from configs.controls import CONTROLS
from transfer.errors import TransferError

#: Each control's preprocessor module and, for model-backed ones, its weight folders under ``--preprocessor_dir``:
#: from the control registry (``configs.controls``).
REGISTRY = {c.name: c.preprocessor for c in CONTROLS}
MODEL_DIRS = {c.name: c.model_dirs for c in CONTROLS if c.model_dirs}


def check_models(modality: str, model_dir: str | Path | None) -> list[Path]:
    """The weight folders ``modality`` needs; a clear error naming the modality and the path when one is missing."""
    paths = []
    for sub in MODEL_DIRS.get(modality, ()):
        if model_dir is None:
            raise TransferError(f"computing the {modality!r} control needs model weights: give --preprocessor_dir "
                                f"(expects {sub}/ under it)")
        path = Path(model_dir) / sub
        if not (path / "config.json").is_file():
            raise TransferError(f"computing the {modality!r} control needs model weights at {path} (no config.json there)")
        paths.append(path)
    return paths


@dataclass
class ControlMaker:
    """Computes missing controls for the requests of a run (one per process that prepares requests)."""

    folder: Path
    options: dict
    rank: int = field(default_factory=lambda: int(os.environ.get("RANK", "0")))
    """The rank that writes (and names) the files: this process, or the placement's preprocess rank."""
    compute: bool = True
    """False: another rank computes; only read its files (``precompute`` there first)."""
    built: dict = field(default_factory=dict)

    @staticmethod
    def missing(request) -> list[str]:
        return [m for m, c in request.controls.items() if c.input_control is None]

    @staticmethod
    def needs(request) -> list[str]:
        """The preprocessors ``request`` uses: its missing controls', and seg for any ``mask_prompt``."""
        seg = ["seg"] if any(getattr(c, "mask_prompt", None) for c in request.controls.values()) else []
        return sorted({*ControlMaker.missing(request), *seg})

    def precompute(self, request) -> None:
        """Compute and write every control ``request`` lacks (on the preprocess rank)."""
        from transfer.video_io import read_video

        masks = [c.mask_prompt for c in request.controls.values() if getattr(c, "mask_prompt", None)]
        if self.missing(request) or masks:
            frames, fps = read_video(request.input_video_path, "input video")
            for modality in self.missing(request):
                self(modality, request, frames, fps)
            for text in masks:  # a mask_prompt's mask: the seg preprocessor on that text
                self("seg", request.mask_request(text), frames, fps)

    def check(self, modalities) -> None:
        """Fail fast, before anything loads, on a modality whose weights are missing."""
        for m in modalities:
            check_models(m, self.options.get("model_dir"))

    def preprocessor(self, modality: str):
        if modality not in self.built:
            module = importlib.import_module(REGISTRY[modality])
            self.built[modality] = module.Preprocessor(module.Config.from_options(self.options))
        return self.built[modality]

    def path_for(self, modality: str, request, input_digest: str) -> Path:
        """The viewable mp4 of ``modality``'s control for ``request``; ``cache_path`` of it is the lossless copy."""
        key = json.dumps({"input": input_digest, "modality": modality, **self.preprocessor(modality).key(request)},
                         sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return self.folder / f"{modality}_input_control_{digest}_r{self.rank}.mp4"

    @staticmethod
    def cache_path(path: Path) -> Path:
        return path.with_suffix(".lossless.mp4")

    def __call__(self, modality: str, request, frames: np.ndarray, fps: float) -> np.ndarray:
        """The control for ``modality`` computed from ``frames`` (the decoded input video), or read back bit for
        bit from the lossless file of an earlier computation."""
        from transfer.video_io import file_digest, read_video, write_lossless_mp4, write_mp4

        path = self.path_for(modality, request, file_digest(request.input_video_path))
        cache = self.cache_path(path)
        if cache.is_file():  # written atomically, after the viewable mp4: present means both are complete
            logger.info(f"{request.name}: reusing computed {modality} control {cache.name}")
            return read_video(cache, f"computed {modality} control")[0]
        if not self.compute:
            raise TransferError(f"{request.name}: computed {modality} control {cache} is missing (rank {self.rank} computes it)")
        logger.info(f"{request.name}: computing the {modality} control")
        out = self.preprocessor(modality)(frames, request)
        if out.shape != frames.shape or out.dtype != np.uint8:
            raise TransferError(f"{modality} preprocessor returned {out.dtype} {out.shape}, expected uint8 {frames.shape}")
        write_mp4(path, out, fps or 24.0)
        write_lossless_mp4(cache, out, fps or 24.0)
        return out
