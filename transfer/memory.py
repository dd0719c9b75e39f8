"""Activation memory of each stage call at a request size: estimated from shapes, and measured.

**Estimate** (``estimate_calls``, used by ``--plan``): every stage is built by the product's own loaders with empty
weights under ``FakeTensorMode`` -- tensors with a shape, a dtype and a device but no storage, so each op runs its
shape logic and nothing else: the real Transfer2.5-2B at 720p takes about a minute on a CPU -- and the stage's real
methods (``TextEncoder.encode``, ``VideoVAE.encode``/``decode``, ``DiT.prepare``/``predict``: one denoising step)
run on fake inputs of the request's size. ``TensorMemory``, a dispatch mode, counts the bytes of every storage an op
creates and takes them off when the storage's last tensor dies; the peak of that count during a call is its
activation peak. What the dispatcher does not see is a kernel's private workspace: the one that matters on CPU, the
im2col buffer of ``slow_conv3d`` (fp32 3-D convolutions: the VAE), is added from its known size; cuDNN's and other
libraries' workspaces are not modelled (the GPU check sets the estimate beside ``torch.cuda.max_memory_allocated``).

**Measurement** (``measured_peak``, used by ``benchmarks/real_size.py``): the same calls on real tensors; on CUDA the
allocator's peak (``torch.cuda.max_memory_allocated``) above what was allocated before the call; on CPU the peak of
the running sum of the allocation and free events the profiler records from torch's CPU allocator (what
``max_memory_allocated`` is on CUDA: exact, unlike sampled RSS, which also counts pages freed and not yet returned).

Inputs of a call are made before it, on the host, as the pipeline makes them; what a call moves to its device
counts.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from transfer.checkpoint import CheckpointInfo, load_stage
from transfer.families.transfer25.text_encoding import embedding_dim

PROMPT = "a robot arm picks up a red cube from a wooden table, sunlight, high detail"
#: Convolution backends whose kernel allocates an im2col buffer of ``N * C_in * prod(kernel) * prod(out)`` elements.
_IM2COL = {torch._C._ConvBackend.Slow3d, torch._C._ConvBackend.SlowDilated3d, torch._C._ConvBackend.Slow2d,
           torch._C._ConvBackend.SlowDilated2d}


def _im2col_bytes(args) -> int:
    x, w, bias, stride, padding, dilation, transposed, output_padding, groups = args[:9]
    backend = torch._C._select_conv_backend(x, w, bias, stride, padding, dilation, transposed, output_padding,
                                            groups, None)
    if backend not in _IM2COL:
        return 0
    out = [(size + 2 * p - d * (k - 1) - 1) // s + 1
           for size, k, s, p, d in zip(x.shape[2:], w.shape[2:], stride, padding, dilation)]
    columns = x.shape[0] * x.shape[1] * torch.Size(w.shape[2:]).numel() * torch.Size(out).numel()
    return columns * x.element_size()


class TensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storage alive at once during a block (real or fake tensors), counting only storages
    created inside it. An op's output that shares an input's storage (a view, an in-place op) is not new memory.
    ``workspace``: add the im2col buffer of CPU's slow convolutions while they run."""

    def __init__(self, workspace: bool = True):
        super().__init__()
        self.workspace = workspace
        self.live = self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        conv = self.workspace and func is torch.ops.aten.convolution.default
        workspace = _im2col_bytes(args) if conv else 0
        out = func(*args, **kwargs)
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if id(storage) in inputs or storage in self._seen:
                continue
            size = storage.nbytes()
            self._seen[storage] = size
            self.live += size
            weakref.finalize(storage, self._free, size)
        self.peak = max(self.peak, self.live + workspace)  # the workspace lives while the op runs, beside its output
        return out

    def _free(self, size: int) -> None:
        self.live -= size


@dataclass(frozen=True)
class ChunkSize:
    """The size of one chunk of a request: pixels, frames, controls and guidance."""

    height: int
    width: int
    frames: int
    modalities: tuple[str, ...]
    guidance: float = 3.0


@dataclass(frozen=True)
class Call:
    stage: str
    name: str
    run: Callable
    """``run(stage_object, inputs)``."""


#: The calls of each stage that a chunk makes (the VAE re-encode of ``roundtrip`` conditioning is an encode).
CALLS = (
    Call("text", "text encode", lambda text, x: text.encode(PROMPT)),
    Call("vae", "VAE encode (one control)", lambda vae, x: vae.encode(x["video"], x["dtype"])),
    Call("vae", "VAE decode (one chunk)", lambda vae, x: vae.decode(x["latents"])),
    Call("dit", "DiT step, CFG (2 branches)", lambda dit, x: dit_step(dit, x, x["guidance"])),
    Call("dit", "DiT step, no CFG", lambda dit, x: dit_step(dit, x, 1.0)),
)


def dit_step(dit, x: dict, guidance: float) -> torch.Tensor:
    """One denoising step of a chunk: the loop's state, then one guided velocity (the scheduler's update, a few
    latent-sized tensors, is left out: its step reads sigmas as Python numbers, which fake tensors do not have)."""
    state = dit.prepare(x["noise"], None, 0, x["controls"], x["embeds"], x["embeds"], guidance, x["pixels"])
    return dit.predict(state, 0, 0.5, x["scales"], guidance)


def call_inputs(info: CheckpointInfo, request: ChunkSize, dtype: torch.dtype) -> dict:
    """Host tensors as the pipeline hands them to the stages: a control chunk in [-1, 1] (float32), its latents,
    the DiT's noise (float32) and control latents and prompt embeddings (run dtype)."""
    from transfer.prepare import ModelLimits

    limits = ModelLimits.from_info(info)
    f = limits.spatial_factor
    latents = (1, 16, limits.latent_frames(request.frames), request.height // f, request.width // f)
    embeds = torch.zeros(1, 512, embedding_dim(info.text_config), dtype=dtype)
    return {"video": torch.zeros(1, 3, request.frames, request.height, request.width), "dtype": dtype,
            "latents": torch.zeros(latents), "noise": torch.zeros(latents),
            "controls": {m: torch.zeros(latents, dtype=dtype) for m in request.modalities},
            "scales": {m: 0.5 for m in request.modalities}, "embeds": embeds,
            "guidance": request.guidance, "pixels": (request.height, request.width)}


def estimate_calls(info: CheckpointInfo, request: ChunkSize, dtype: torch.dtype, target: str = "cuda",
                   names=None) -> dict[str, dict[str, int]]:
    """``{stage: {call: activation peak bytes}}`` of the ``CALLS`` named in ``names`` (default: all), run on fake
    tensors with empty weights built by the product's loaders, for a ``target`` device type.

    The fake tensors live on the CPU whatever the target: fake CUDA tensors would pick attention kernels without
    asking a GPU (the math path, a sequence-squared score matrix: terabytes at 720p) where a GPU runs flash or
    memory-efficient attention, whose memory -- the output and a log-sum-exp -- is what the CPU's flash kernel has.
    The target only decides the kernel workspace added (CPU: im2col of the slow convolutions)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    shapes_only = replace(info, root=None)  # a checkpoint directory's configs; its weights are never read
    cpu = torch.device("cpu")
    peaks: dict[str, dict[str, int]] = {}
    with FakeTensorMode(allow_non_fake_inputs=True):
        inputs = call_inputs(info, request, dtype)
        for stage in ("text", "vae", "dit"):
            calls = [c for c in CALLS if c.stage == stage and (names is None or c.name in names)]
            if not calls:
                continue
            obj = load_stage(shapes_only, stage, request.modalities, cpu, dtype)
            for call in calls:
                with TensorMemory(workspace=target == "cpu") as memory:
                    call.run(obj, inputs)
                peaks.setdefault(stage, {})[call.name] = memory.peak
            del obj
    return peaks


def measured_peak(device: torch.device, fn):
    """``(peak bytes above what was allocated before, result)`` of ``fn()`` on real tensors: the CUDA allocator's
    peak, or on CPU the running sum of the profiler's allocation events."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, result
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak, result
