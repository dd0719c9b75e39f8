"""Shared by the model-backed preprocessors: device choice, loading from a local folder, batching."""

from __future__ import annotations

from pathlib import Path

import torch

BATCH = 8


def device() -> torch.device:
    """The process's own GPU when there is one (the coordinator's, in stage-process runs), else the CPU."""
    from transfer.device import default_device

    return default_device()


def load(auto_class, path: Path, dev: torch.device):
    """A transformers model from a local folder only (no download), in eval mode on ``dev``."""
    return auto_class.from_pretrained(path, local_files_only=True).to(dev).eval()


def batches(n: int, size: int = BATCH):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))
