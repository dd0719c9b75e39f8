"""Guardrails: text and video safety checks behind one small interface (DESIGN.md section 6).

The interface is diffusers-compatible so a guard can also be handed to diffusers'
pipelines. No guard is wired into generation yet; the guardrails work adds the
blocklist, model and face-pixelation guards and the on / async / off modes.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Guard(Protocol):
    def check_text_safety(self, prompt: str) -> bool:
        """True if the prompt may be generated."""

    def check_video_safety(self, frames: np.ndarray) -> np.ndarray | None:
        """The frames (uint8 ``[T, H, W, 3]``, possibly altered) if they may be released, else None."""
