"""``edge``: Canny edges of the input (OpenCV), white on black, 3 channels.

Threshold presets (upstream's ``--canny_threshold``, which upstream ignores in favour of random
thresholds; here it is honoured): low / high hysteresis thresholds on the grayscale frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from transfer.errors import TransferError

#: canny_threshold -> (low, high)
PRESETS = {"very_low": (20, 50), "low": (50, 100), "medium": (100, 200), "high": (200, 300), "very_high": (300, 400)}


@dataclass(frozen=True)
class Config:
    canny_threshold: str = "medium"

    @classmethod
    def from_options(cls, options: dict) -> "Config":
        threshold = options.get("canny_threshold") or "medium"
        if threshold not in PRESETS:
            raise TransferError(f"--canny_threshold {threshold!r}: one of {', '.join(PRESETS)}")
        return cls(threshold)


class Preprocessor:
    def __init__(self, config: Config):
        self.config = config

    def threshold(self, request) -> str:
        """The request's own preset (Transfer2.5 ``edge.preset_edge_threshold``), else ``--canny_threshold``."""
        control = None if request is None else request.controls.get("edge")
        return getattr(control, "preset", None) or self.config.canny_threshold

    def key(self, request) -> dict:
        threshold = self.threshold(request)
        return {"canny_threshold": threshold, "thresholds": PRESETS[threshold]}

    def __call__(self, frames: np.ndarray, request=None) -> np.ndarray:
        low, high = PRESETS[self.threshold(request)]
        edges = [cv2.Canny(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), low, high) for f in frames]
        return np.repeat(np.stack(edges)[..., None], 3, axis=-1)
