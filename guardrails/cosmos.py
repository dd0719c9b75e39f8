"""Adapter for NVIDIA's guardrail models through the ``cosmos_guardrail`` package (optional).

``cosmos_guardrail.CosmosSafetyChecker`` is the checker diffusers' Cosmos pipelines use: text =
blocklist + Aegis (Llama Guard with an adapter), video = SigLIP safety classifier + RetinaFace
face pixelation. It already has our interface (``check_text_safety`` / ``check_video_safety``);
this adapter loads it from a local directory only (no download) and gives it a name. Note that
its Aegis text check returns *safe* when Aegis raises (upstream fails open there); errors raised
anywhere else are turned into blocks by ``GuardSet`` like any guard's.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from transfer.errors import TransferError


def check_cosmos_dir(path: str | Path) -> Path:
    """Fail fast (before loading) when the package or the weights are not there."""
    if importlib.util.find_spec("cosmos_guardrail") is None:
        raise TransferError("--cosmos_guardrail_dir needs the cosmos_guardrail package "
                            "(pip install cosmos_guardrail), which is not installed")
    path = Path(path)
    if not path.is_dir():
        raise TransferError(f"--cosmos_guardrail_dir {path}: not a directory (a local copy of nvidia/Cosmos-Guardrail1)")
    return path


class CosmosGuardrail:
    """The ``cosmos_guardrail`` safety checker as one text guard and one video guard."""

    name = "cosmos_guardrail"

    def __init__(self, path: str | Path, device: str = "cpu"):
        from cosmos_guardrail import CosmosSafetyChecker

        self.checker = CosmosSafetyChecker(checkpoint_id=str(check_cosmos_dir(path)))
        self.checker.to(device)

    def check_text_safety(self, prompt: str) -> bool:
        return bool(self.checker.check_text_safety(prompt))

    def check_video_safety(self, frames):
        return self.checker.check_video_safety(frames)
