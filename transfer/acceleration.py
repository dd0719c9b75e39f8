"""Acceleration and low-memory modes for the stages one process holds (docs/performance.md).

``--compile``

- ``none``: eager.
- ``torch``: ``nn.Module.compile()`` (TorchInductor) on the unmodified diffusers modules -- the DiT's transformer and
  ControlNets, the VAE's encoder and decoder -- in place, so weights, state dict keys and offloading are unchanged.
  Static shapes: a chunk configuration (frames per chunk, resolution) compiles once. Works on CPU (needs a C++
  compiler) and CUDA.
- ``tensorrt``: the same modules through torch-tensorrt's ``torch.compile`` backend (``pip install '.[tensorrt]'``,
  CUDA only), static shapes, engines cached on disk under ``{cache}/tensorrt/{model}-{dtype}/`` (torch-tensorrt keys
  each engine by its graph, input shapes and dtypes and settings; weights are refitted on reuse). Not installed, or
  no GPU: a one-line error before anything loads, never a silent fallback.

``--offload stages``: in a process holding several stages on one device (the single process holds all three), only
the stage at work keeps its weights on the device; using a stage first moves the others' weights off it. On CUDA they
go to CPU memory (``Module.to``); on a CPU run, where CPU memory *is* the device, they go to a safetensors file in a
temp folder and the parameters become meta tensors, so the resident bytes really drop. The weights come back bit for
bit, so the output is the same. Each process reports per-stage weight bytes, the peak of resident parameter bytes,
the moves and the time they took (and on CUDA ``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import time
from pathlib import Path

import torch
from loguru import logger

from transfer.errors import TransferError

COMPILE_MODES = ("none", "torch", "tensorrt")
OFFLOAD_MODES = ("none", "stages")
#: cosmos-transfer1's per-model offload flags; each maps onto ``--offload stages`` (docs/performance.md).
UPSTREAM_OFFLOAD_FLAGS = ("offload_diffusion_transformer", "offload_text_encoder_model", "offload_tokenizer",
                          "offload_guardrail_models", "offload_prompt_upsampler")


def offload_mode(args) -> str:
    if any(getattr(args, flag, False) for flag in UPSTREAM_OFFLOAD_FLAGS):
        return "stages"
    return getattr(args, "offload", "none")


def check_acceleration(args, cuda: bool | None = None) -> None:
    """Validate ``--compile`` / ``--offload`` on every rank before anything loads (the same error everywhere)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if args.compile == "tensorrt":
        if importlib.util.find_spec("torch_tensorrt") is None:
            raise TransferError("--compile tensorrt needs the torch-tensorrt package, which is not installed: "
                                "pip install '.[tensorrt]' (CUDA only), or use --compile torch")
        if not cuda:
            raise TransferError("--compile tensorrt needs a CUDA GPU and none is visible: use --compile torch or none")
        if offload_mode(args) == "stages":
            raise TransferError("--offload stages cannot move weights built into TensorRT engines: use it with "
                                "--compile torch or none")


def stage_modules(name: str, stage) -> dict[str, torch.nn.Module]:
    """The ``nn.Module``s holding a stage's weights, by name."""
    if name == "text":
        return {"text_encoder": stage.model}
    if name == "vae":
        return {"vae": stage.vae}
    modules = {"transformer": stage.transformer}
    modules.update({f"controlnet.{m}": c for m, c in stage.controlnets.items()})
    return modules


def compiled_modules(name: str, stage) -> dict[str, torch.nn.Module]:
    """What ``--compile`` compiles: the DiT's transformer and ControlNets, the VAE's encoder and decoder."""
    if name == "vae":
        return {"vae.encoder": stage.vae.encoder, "vae.decoder": stage.vae.decoder}
    if name == "dit":
        return stage_modules(name, stage)
    return {}


def compile_stage(name: str, stage, mode: str, cache_dir: Path | None = None) -> list[str]:
    """Compile ``stage``'s modules in place for ``mode``; returns what was compiled."""
    if mode == "none":
        return []
    done = []
    for label, module in compiled_modules(name, stage).items():
        if mode == "torch":
            module.compile(dynamic=False)
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


class OnDevice:
    """Mixin of the stage objects: ``resident()`` first thing in every method that computes with the weights."""

    residency: "Residency | None" = None
    stage_name = ""

    def resident(self) -> None:
        if self.residency is not None:
            self.residency.use(self.stage_name)


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Residency:
    """Where each stage's weights are, for one process; with ``offload``, one stage on the device at a time.

    Stages call ``use(name)`` before they compute (``transfer.stages`` / ``transfer.text_encoding`` do it through
    their ``residency`` attribute)."""

    def __init__(self, device: torch.device, offload: bool):
        self.device, self.offload = torch.device(device), offload
        self.stages: dict[str, dict[str, torch.nn.Module]] = {}
        self.active: str | None = None
        self.peak = 0
        self.moves = 0
        self.move_seconds = 0.0
        self._spill_dir: Path | None = None
        self._spilled: set[str] = set()

    # -- bookkeeping -----------------------------------------------------------------------------
    def add(self, name: str, stage) -> None:
        """Register a loaded stage; with offload its weights leave the device at once (until it is used)."""
        self.stages[name] = stage_modules(name, stage)
        stage.residency, stage.stage_name = self, name
        if self.offload:
            self._move_off(name)
        self._note_peak()

    def _slots(self, name: str):
        """``(key, owner dict, attr, tensor)`` for every parameter and buffer slot of the stage's modules; a module
        reached by two paths (T5's shared embedding) is visited once."""
        for label, root in self.stages[name].items():
            for path, module in root.named_modules():
                for slots in (module._parameters, module._buffers):
                    for attr, t in slots.items():
                        if t is not None:
                            yield f"{label}.{path}.{attr}", slots, attr, t

    def _tensors(self, name: str):
        """``(key, tensor)`` of every distinct parameter and buffer of the stage (a tied one once)."""
        seen = set()
        for key, _, _, t in self._slots(name):
            if id(t) not in seen:
                seen.add(id(t))
                yield key, t

    def stage_bytes(self, name: str) -> int:
        return sum(tensor_bytes(t) for _, t in self._tensors(name))

    def resident_bytes(self) -> int:
        """Bytes of parameters and buffers now on the compute device (meta tensors hold none)."""
        return sum(tensor_bytes(t) for name in self.stages for _, t in self._tensors(name)
                   if t.device == self.device or (t.device.type == self.device.type == "cuda"))

    def _note_peak(self) -> None:
        self.peak = max(self.peak, self.resident_bytes())

    # -- moving ----------------------------------------------------------------------------------
    def use(self, name: str) -> None:
        """Make stage ``name``'s weights resident (with offload: the others' leave the device first)."""
        if not self.offload or self.active == name:
            return
        start = time.perf_counter()
        for other in self.stages:
            if other != name:
                self._move_off(other)
        self._move_on(name)
        self.active = name
        self.moves += 1
        self.move_seconds += time.perf_counter() - start
        self._note_peak()

    def _move_off(self, name: str) -> None:
        if self.device.type == "cpu":
            self._spill(name)
        else:
            for module in self.stages[name].values():
                module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _move_on(self, name: str) -> None:
        if self.device.type == "cpu":
            self._unspill(name)
        else:
            for module in self.stages[name].values():
                module.to(self.device)

    def _spill(self, name: str) -> None:
        """CPU device: the stage's tensors to ``{tmp}/{name}.safetensors``, meta tensors in their place."""
        from safetensors.torch import save_file

        if name in self._spilled:
            return
        if self._spill_dir is None:
            self._spill_dir = Path(tempfile.mkdtemp(prefix="transfer-offload-"))
        save_file({key: t.detach().contiguous() for key, t in self._tensors(name)}, str(self._spill_dir / f"{name}.safetensors"))
        self._replace(name, lambda key, t: torch.empty_like(t, device="meta"))
        self._spilled.add(name)

    def _unspill(self, name: str) -> None:
        from safetensors.torch import load_file

        if name not in self._spilled:
            return
        path = self._spill_dir / f"{name}.safetensors"
        saved = load_file(str(path), device="cpu")
        self._replace(name, lambda key, t: saved[key])
        path.unlink()
        self._spilled.discard(name)

    def _replace(self, name: str, make) -> None:
        """Put ``make(key, tensor)`` in every slot (a Parameter where one was). Tied slots get one shared new object,
        made under their first key -- the key ``_tensors`` gives, in the same traversal order before and after."""
        made = {}
        for key, slots, attr, t in list(self._slots(name)):
            if id(t) not in made:
                new = make(key, t)
                made[id(t)] = torch.nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else new
            slots[attr] = made[id(t)]

    def close(self) -> None:
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)

    # -- report ----------------------------------------------------------------------------------
    def report(self) -> dict:
        sizes = {name: self.stage_bytes(name) for name in self.stages}
        out = {"device": str(self.device), "offload": self.offload, "stage_bytes": sizes,
               "all_stages_bytes": sum(sizes.values()), "peak_resident_bytes": self.peak, "moves": self.moves,
               "move_seconds": round(self.move_seconds, 3)}
        if self.device.type == "cuda":
            out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return out


def describe(report: dict) -> str:
    """One line of ``Residency.report()``."""
    mb = lambda b: f"{b / 2**20:.1f} MB"  # noqa: E731
    stages = ", ".join(f"{n} {mb(b)}" for n, b in report["stage_bytes"].items())
    line = (f"weights on {report['device']} ({'--offload stages' if report['offload'] else 'no offload'}): {stages}; "
            f"peak resident {mb(report['peak_resident_bytes'])} of {mb(report['all_stages_bytes'])}")
    if report["offload"]:
        line += f"; {report['moves']} stage switches, {report['move_seconds']:.2f} s moving weights"
    if "cuda_max_allocated_bytes" in report:
        line += f"; CUDA peak allocated {mb(report['cuda_max_allocated_bytes'])}"
    return line


def load_stages(info, names: list[str], modalities, device: torch.device, dtype: torch.dtype, compile_mode: str = "none",
                offload: str = "none") -> tuple[dict, Residency]:
    """Load the stages ``names`` (of text, vae, dit) this process holds, compile them (``--compile``) and register
    them for ``--offload``. Offloading on CUDA, weights are loaded into CPU memory and reach the GPU on first use."""
    from transfer.checkpoint import load_dit, load_text_encoder, load_vae
    from transfer.tiny import cache_root

    residency = Residency(device, offload == "stages" and len(names) > 1)
    load_on = torch.device("cpu") if residency.offload else device
    loaders = {"text": lambda: load_text_encoder(info, load_on, dtype), "vae": lambda: load_vae(info, load_on, dtype),
               "dit": lambda: load_dit(info, modalities, load_on, dtype)}
    cache = cache_root()
    stages = {}
    for name in names:
        stage = stages[name] = loaders[name]()
        stage.device = device  # computes there; its weights may wait in CPU memory until it is used
        compile_stage(name, stage, compile_mode, cache)
        residency.add(name, stage)
    return stages, residency
