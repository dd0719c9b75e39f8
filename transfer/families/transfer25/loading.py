"""Loading the stages a process holds: checkpoint loaders, then ``--compile`` and ``--offload`` registration.

The top of the loading chain: ``transfer.residency`` (device residency) <- the model wrappers (``transfer.families.transfer25.models``,
``transfer.families.transfer25.text_encoding``) <- ``transfer.checkpoint`` (loaders) <- here; ``transfer.acceleration`` (compile) beside.
"""

from __future__ import annotations

import torch
from loguru import logger

from transfer.acceleration import attention_backend_for, compile_stage, set_attention_backend
from transfer.checkpoint import load_stage
from transfer.config import RuntimeConfig
from transfer.residency import Residency
from transfer.embedded_checkpoint import cache_root


def load_stages(info, names: list[str], modalities, device: torch.device, dtype: torch.dtype,
                runtime: RuntimeConfig = RuntimeConfig()) -> tuple[dict, Residency]:
    """Load the stages ``names`` (of text, vae, dit) this process holds, set the DiT's attention backend
    (``--attention_backend``) and step cache (``--step_cache``), compile them (``--compile``) and register them for
    ``--offload`` (all in ``runtime``). Offloading on CUDA, weights are loaded into CPU memory and reach the GPU on
    first use."""
    residency = Residency(device, runtime.offload == "stages" and len(names) > 1)
    load_on = torch.device("cpu") if residency.offload else device
    cache = cache_root()
    stages = {}
    for name in names:
        stage = stages[name] = load_stage(info, name, modalities, load_on, dtype)
        stage.device = device  # computes there; its weights may wait in CPU memory until it is used
        if name == "dit":
            backend = attention_backend_for(runtime.attention, device)
            set_attention_backend(name, stage, backend)
            logger.info(f"dit: attention backend {backend}"
                        + (" (default for this device)" if runtime.attention == "auto" else ""))
            stage.step_cache = runtime.step_cache
        compile_stage(name, stage, runtime.compile, cache)
        residency.add(name, stage)
    return stages, residency
