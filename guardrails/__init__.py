"""Guardrails: text and video safety checks behind one small interface (docs/guardrails.md).

A guard has ``check_text_safety(prompt) -> bool`` and/or ``check_video_safety(frames) -> frames |
None`` (the interface of diffusers' safety checkers, so a guard can be handed to diffusers too);
ours may also offer ``text_verdict(prompt) -> (safe, why)`` for a better record. ``GuardSet`` runs
them in order and **fails closed**: a guard that raises, or returns something that is not frames,
blocks the request. ``gate.Gate`` applies the ``--guardrail on|async|off`` modes.

Guards are built only where ``build_guards`` is called -- the coordinator rank -- and each model
loads on first use. Modules with heavy imports (transformers, cosmos_guardrail) are imported only
when their guard is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from transfer.config import GuardConfig
from transfer.errors import TransferError

#: Guards built in this process, by name (reported per rank; only the coordinator builds any).
BUILT: list[str] = []


class Guard(Protocol):
    name: str

    def check_text_safety(self, prompt: str) -> bool:
        """True if the prompt may be generated."""

    def check_video_safety(self, frames: np.ndarray) -> np.ndarray | None:
        """The frames (uint8 ``[T, H, W, 3]``, possibly altered) if they may be released, else None."""


@dataclass(frozen=True)
class Blocked:
    """Why a request was blocked: written to ``{name}.blocked.json``."""

    stage: str  # "text" or "video"
    guard: str
    reason: str


class GuardSet:
    """Text guards, then video guards, each fail-closed."""

    def __init__(self, text_guards=(), video_guards=()):
        self.text_guards, self.video_guards = list(text_guards), list(video_guards)

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.text_guards] + [g.name for g in self.video_guards if g not in self.text_guards]

    def check_text(self, prompts: dict[str, str]) -> Blocked | None:
        """Check each named prompt (``prompt``, ``negative_prompt``) with every text guard."""
        for guard in self.text_guards:
            for field, text in prompts.items():
                try:
                    if hasattr(guard, "text_verdict"):
                        safe, why = guard.text_verdict(text)
                    else:
                        safe, why = bool(guard.check_text_safety(text)), "judged unsafe"
                except Exception as e:  # fail closed: a broken guard blocks
                    return Blocked("text", guard.name, f"{field}: guard failed: {type(e).__name__}: {e}")
                if not safe:
                    return Blocked("text", guard.name, f"{field}: {why}")
        return None

    def check_video(self, frames: np.ndarray) -> tuple[np.ndarray | None, Blocked | None]:
        """The frames to release (possibly altered), or a block."""
        for guard in self.video_guards:
            try:
                out = guard.check_video_safety(frames)
            except Exception as e:
                return None, Blocked("video", guard.name, f"guard failed: {type(e).__name__}: {e}")
            if out is None:
                return None, Blocked("video", guard.name, "video judged unsafe")
            out = np.asarray(out)
            if out.shape != frames.shape or out.dtype != np.uint8:
                return None, Blocked("video", guard.name, f"guard returned {out.dtype} {out.shape}, "
                                     f"not uint8 {frames.shape} frames")
            frames = out
        return frames, None


def check_guard_config(guard: GuardConfig) -> None:
    """Validate guard options on every rank before anything loads (the same error everywhere)."""
    if guard.mode == "off":
        return
    from guardrails.blocklist import read_terms

    for path in [*guard.blocklist, *guard.allowlist]:
        read_terms(path)
    if guard.guard_model:
        from guardrails.model import check_model_dir

        check_model_dir(guard.guard_model)
    if guard.cosmos_guardrail_dir:
        from guardrails.cosmos import check_cosmos_dir

        check_cosmos_dir(guard.cosmos_guardrail_dir)
    if guard.face_min_size < 1:
        raise TransferError(f"--face_min_size must be at least 1 pixel, got {guard.face_min_size}")
    if not 0.0 < guard.face_confidence <= 1.0:
        raise TransferError(f"--face_confidence is a detector score in (0, 1], got {guard.face_confidence}")


def build_guards(guard: GuardConfig, device: str = "cpu") -> GuardSet | None:
    """The guards the options ask for (None when off). Call on the one rank that runs guards."""
    if guard.mode == "off":
        return None
    from guardrails.blocklist import BlocklistGuard

    text, video = [BlocklistGuard(guard.blocklist, guard.allowlist)], []
    if guard.guard_model:
        from guardrails.model import ModelTextGuard

        text.append(ModelTextGuard(guard.guard_model, device=device))  # loads on its first prompt
    if guard.cosmos_guardrail_dir:
        from guardrails.cosmos import CosmosGuardrail

        cosmos = CosmosGuardrail(guard.cosmos_guardrail_dir, device=device)
        text.append(cosmos)
        video.append(cosmos)
    if guard.face_pixelation:
        from guardrails.faces import FacePixelationGuard

        video.append(FacePixelationGuard(min_size=guard.face_min_size, confidence=guard.face_confidence))
    guards = GuardSet(text, video)
    BUILT.extend(guards.names)
    return guards
