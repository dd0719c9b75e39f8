"""Acceleration and low-memory modes for the stages one process holds (docs/performance.md).

``--compile``

- ``none``: eager.
- ``torch``: ``nn.Module.compile()`` (TorchInductor) on the unmodified diffusers modules -- each repeated block of the
  DiT's transformer and ControlNets (regional compilation; the VAE stays eager, ``compiled_modules``) -- in place, so
  weights, state dict keys and offloading are unchanged.
  Static shapes: a chunk configuration (frames per chunk, resolution) compiles once. Works on CPU (needs a C++
  compiler) and CUDA.
- ``tensorrt``: the same modules through torch-tensorrt's ``torch.compile`` backend (``pip install '.[tensorrt]'``,
  CUDA only), static shapes, engines cached on disk under ``{cache}/tensorrt/{model}-{dtype}/`` (torch-tensorrt keys
  each engine by its graph, input shapes and dtypes and settings; weights are refitted on reuse). Not installed, or
  no GPU: a one-line error before anything loads, never a silent fallback.

``--attention_backend``: the attention kernel of the DiT and ControlNets, by diffusers' dispatcher name
(``diffusers.models.attention_dispatch``): ``native`` is torch's ``scaled_dot_product_attention`` choosing its own
kernel; ``_native_cudnn`` / ``_native_flash`` / ``_native_efficient`` / ``_native_math`` force one of torch's; ``flash``,
``_flash_3``, ``sage``, ``xformers`` need their packages. ``auto`` (default) takes ``DEFAULT_ATTENTION`` for the GPU,
``native`` on the CPU. Each process prints the backend it uses.

``--offload stages``: in a process holding several stages on one device (the single process holds all three), only
the stage at work keeps its weights on the device; using a stage first moves the others' weights off it. On CUDA they
go to CPU memory (``Module.to``); on a CPU run, where CPU memory *is* the device, they go to a safetensors file in a
temp folder and the parameters become meta tensors, so the resident bytes really drop. The weights come back bit for
bit, so the output is the same. Each process reports per-stage weight bytes, the peak of resident parameter bytes,
the moves and the time they took (and on CUDA ``torch.cuda.max_memory_allocated``). The offload mechanics live in
``transfer.residency`` (below the model wrappers), the loading of whole stages in ``transfer.families.transfer25.loading`` (above them).
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import torch
from loguru import logger

from transfer.errors import TransferError
from transfer.residency import stage_modules

COMPILE_MODES = ("none", "torch", "tensorrt")
#: Backends that run on a CPU (the others need CUDA).
CPU_ATTENTION = ("native", "_native_math", "flex")
#: ``auto`` per CUDA compute capability: the fastest exact backend that benchmarks/gpu_check.sh measured on such a GPU
#: (docs/performance.md); anything else, and the CPU, gets ``native`` (torch's SDPA choosing its kernel). A fixed
#: table, not a timing at start: the backend changes the output's low bits, and an output must never depend on a
#: timing.
DEFAULT_ATTENTION: dict[tuple[int, int], str] = {}
OFFLOAD_MODES = ("none", "stages")
def check_acceleration(runtime, cuda: bool | None = None) -> None:
    """Validate ``--compile`` / ``--offload`` / ``--attention_backend`` (``runtime``: ``transfer.config.RuntimeConfig``)
    on every rank before anything loads (the same error everywhere)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    check_attention_backend(runtime.attention, cuda)
    if runtime.compile == "tensorrt":
        if importlib.util.find_spec("torch_tensorrt") is None:
            raise TransferError("--compile tensorrt needs the torch-tensorrt package, which is not installed: "
                                "pip install '.[tensorrt]' (CUDA only), or use --compile torch")
        if not cuda:
            raise TransferError("--compile tensorrt needs a CUDA GPU and none is visible: use --compile torch or none")
        if runtime.offload == "stages":
            raise TransferError("--offload stages cannot move weights built into TensorRT engines: use it with "
                                "--compile torch or none")


def check_attention_backend(name: str, cuda: bool) -> None:
    """A one-line error, before anything loads, for a backend this machine cannot run."""
    if name in ("auto", "native"):
        return
    if not cuda and name not in CPU_ATTENTION:
        raise TransferError(f"--attention_backend {name} needs a CUDA GPU and none is visible: use native (or "
                            f"{', '.join(CPU_ATTENTION[1:])}) on the CPU")
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except RuntimeError as e:
        raise TransferError(f"--attention_backend {name}: {str(e).splitlines()[0]}") from None


def attention_backend_for(requested: str, device: torch.device) -> str:
    """The backend a process uses on ``device`` for ``--attention_backend requested`` (``auto``: ``DEFAULT_ATTENTION``)."""
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "native"
    return DEFAULT_ATTENTION.get(torch.cuda.get_device_capability(device), "native")


def set_attention_backend(name: str, stage, backend: str) -> None:
    """Every attention of the DiT stage's models (transformer, ControlNets, their sequence-parallel processors) through
    diffusers' dispatcher ``backend``. The VAE's and text encoder's attention are not the dispatcher's."""
    if name != "dit":
        return
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "Attention backends are an experimental feature..."
    try:
        for module in stage_modules(name, stage).values():
            module.set_attention_backend(backend)
    finally:
        diffusers_logging.set_verbosity(verbosity)


def compiled_modules(name: str, stage, mode: str = "torch") -> dict[str, torch.nn.Module]:
    """What ``--compile`` compiles: the DiT's transformer and ControlNets; for ``tensorrt`` also the VAE's encoder and
    decoder. ``torch`` leaves the VAE eager: on an H200 a 6-step 93x704x1280 chunk with the VAE compiled took 263 s
    against ~110 s of load, DiT compile (37 s) and compute; the rest, presumably compiling the Wan VAE's
    frame-by-frame causal loops (not timed apart), for calls that are ~4% of a chunk (docs/performance.md)."""
    if name == "vae" and mode != "torch":
        return {"vae.encoder": stage.vae.encoder, "vae.decoder": stage.vae.decoder}
    if name == "dit":
        return stage_modules(name, stage)
    return {}


#: The block lists of diffusers' Cosmos models (``CosmosTransformer3DModel``, ``CosmosControlNetModel``).
BLOCK_LISTS = ("transformer_blocks", "control_blocks")


def repeated_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a DiT-like model, which ``--compile torch`` compiles one by one (regional compilation,
    as diffusers' ``compile_repeated_blocks``: identical blocks share one compiled graph, so a 28-block DiT compiles
    about as fast as one block, and the glue between blocks stays eager); empty for other modules."""
    return [block for attr in BLOCK_LISTS for block in getattr(module, attr, None) or []]


def compile_stage(name: str, stage, mode: str, cache_dir: Path | None = None) -> list[str]:
    """Compile ``stage``'s modules in place for ``mode``; returns what was compiled."""
    if mode == "none":
        return []
    done = []
    for label, module in compiled_modules(name, stage, mode).items():
        if mode == "torch":
            for part in repeated_blocks(module) or [module]:
                part.compile(dynamic=False)
        else:
            dtype = next(module.parameters()).dtype
            engines = Path(cache_dir or tempfile.gettempdir()) / "tensorrt" / f"{label}-{str(dtype).removeprefix('torch.')}"
            engines.mkdir(parents=True, exist_ok=True)
            module.compile(backend="tensorrt", dynamic=False, options={
                "enabled_precisions": {dtype}, "min_block_size": 1, "use_python_runtime": False,
                "immutable_weights": False, "cache_built_engines": True, "reuse_cached_engines": True,
                "engine_cache_dir": str(engines)})
        done.append(label)
    if done:
        logger.info(f"{name}: compiled {', '.join(done)} ({mode})")
    return done
