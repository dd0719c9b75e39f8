"""Device residency of the stages one process holds: where each stage's weights are, moving them for ``--offload
stages``, and the memory report. Below the model wrappers (``transfer.families.transfer25.models``, ``transfer.families.transfer25.text_encoding`` mix in
``OnDevice``); nothing here imports a model or a loader.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch


def stage_modules(name: str, stage) -> dict[str, torch.nn.Module]:
    """The ``nn.Module``s holding a stage's weights, by name."""
    if name == "text":
        return {"text_encoder": stage.model}
    if name == "vae":
        return {"vae": stage.vae}
    modules = {"transformer": stage.transformer}
    modules.update({f"controlnet.{m}": c for m, c in stage.controlnets.items()})
    return modules


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

    Stages call ``use(name)`` before they compute (``transfer.families.transfer25.models`` / ``transfer.families.transfer25.text_encoding`` do it through
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
