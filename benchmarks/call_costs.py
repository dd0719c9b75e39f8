"""What ``benchmarks/real_size.py`` and its Cosmos 3 part (``benchmarks/cosmos3_costs.py``) share: a call timed on
its device, and the rows that sum a process up."""

from __future__ import annotations

import time

import torch


def timed(device: torch.device, fn, repeats: int = 1):
    """(mean seconds, last result) of ``fn()`` over ``repeats`` calls."""
    result, seconds = None, 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
    return seconds / repeats, result


def add_totals(costs: dict, estimates: dict, load: float, weights: int, load_row: str, weights_row: str) -> dict:
    """``costs`` (``{call: (seconds, measured peak bytes, estimated peak bytes)}``) with the load time, the resident
    weights and the one-process peak (weights + the largest call, measured and estimated) added as rows."""
    costs[load_row] = (load, 0, 0)
    costs[weights_row] = (0, weights, weights)
    largest = [max(c[i] for name, c in costs.items() if name in estimates) for i in (1, 2)]
    costs["one process: weights + largest call"] = (0, weights + largest[0], weights + largest[1])
    return costs
