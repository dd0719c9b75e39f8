"""``vis``: a blurred copy of the input (OpenCV bilateral filter + bicubic down/up resize).

Presets (upstream's ``--blur_strength``): bilateral ``d`` / ``sigmaColor`` / ``sigmaSpace`` and a
downscale factor. Per frame: shrink by ``downscale`` (area), bilateral filter, back to full size
(bicubic); then a down/up resize by ``DOWNUP`` (bicubic both ways). Upstream draws the down/up
factor at random from 4..16 on every run; here it is fixed, so the control is reproducible.
``none`` returns the input unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from transfer.errors import TransferError

#: blur_strength -> (d, sigmaColor, sigmaSpace, downscale)
PRESETS = {
    "none": (1, 1, 1, 1),
    "very_low": (15, 100, 50, 1),
    "low": (15, 100, 50, 4),
    "medium": (30, 150, 100, 2),
    "high": (50, 300, 150, 1),
    "very_high": (50, 300, 150, 4),
}
DOWNUP = 4


@dataclass(frozen=True)
class Config:
    blur_strength: str = "medium"

    @classmethod
    def from_options(cls, options: dict) -> "Config":
        strength = options.get("blur_strength") or "medium"
        if strength not in PRESETS:
            raise TransferError(f"--blur_strength {strength!r}: one of {', '.join(PRESETS)}")
        return cls(strength)


def blur_frame(frame: np.ndarray, d: int, sigma_color: float, sigma_space: float, downscale: int) -> np.ndarray:
    h, w = frame.shape[:2]
    small = frame if downscale == 1 else cv2.resize(frame, (max(1, w // downscale), max(1, h // downscale)),
                                                     interpolation=cv2.INTER_AREA)
    small = cv2.bilateralFilter(small, d, sigma_color, sigma_space)
    full = small if downscale == 1 else cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    tiny = cv2.resize(full, (max(1, w // DOWNUP), max(1, h // DOWNUP)), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(tiny, (w, h), interpolation=cv2.INTER_CUBIC)


class Preprocessor:
    def __init__(self, config: Config):
        self.config = config

    def strength(self, request) -> str:
        """The request's own preset (Transfer2.5 ``vis.preset_blur_strength``), else ``--blur_strength``."""
        control = None if request is None else request.controls.get("vis")
        return getattr(control, "preset", None) or self.config.blur_strength

    def key(self, request) -> dict:
        strength = self.strength(request)
        return {"blur_strength": strength, "params": PRESETS[strength], "downup": DOWNUP}

    def __call__(self, frames: np.ndarray, request=None) -> np.ndarray:
        strength = self.strength(request)
        if strength == "none":
            return frames.copy()
        return np.stack([blur_frame(f, *PRESETS[strength]) for f in frames])
