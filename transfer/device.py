"""The device a process computes on, its dtype (``--dtype``) and its CPU threads (``--cpu_threads``)."""

from __future__ import annotations

import contextlib
import os

import torch

from transfer.errors import TransferError


#: Bound of ``--cpu_threads`` (a typo must not start a million threads).
MAX_CPU_THREADS = 256


def pin_cpu_threads(count: int) -> None:
    """``--cpu_threads``: a CPU process's torch threads are a setting, not the machine's core count (torch's default)
    or torchrun's ``OMP_NUM_THREADS=1``: matrix products split their sums by thread, so the thread count reaches
    the outputs' bits (one process with 2 threads vs 4 ranks with 1: latents 6e-6 apart, raw frames 1 level).
    Nothing to do on CUDA, whose kernels do not depend on it."""
    if not 1 <= count <= MAX_CPU_THREADS:
        raise TransferError(f"--cpu_threads must be in [1, {MAX_CPU_THREADS}], got {count}")
    if default_device().type == "cpu":
        torch.set_num_threads(count)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


#: ``--dtype`` choices and what they mean.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Modules built inside get ``dtype`` parameters (``torch.set_default_dtype``, restored after)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def dtype_for(device: torch.device, choice: str = "auto") -> torch.dtype:
    """``--dtype``: ``auto`` is bf16 on CUDA, fp32 on CPU."""
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[choice]
