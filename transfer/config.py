"""The run's configuration: typed and frozen, built once at the command-line edge (``transfer.cli.build_config``) from
either command form, the checkpoint's own defaults and the flags given. Library code takes the piece it needs:

* ``GenerationSettings``: steps, guidance, chunking (a request's own, a Transfer2.5 sample may set them);
* ``InputConfig``: where the requests come from (either form) and the per-request defaults and limits;
* ``CheckpointChoice``: which weights (a folder, a preset, or a preset's configs with random weights);
* ``ParallelConfig``: process count, ``sp_degree`` (``--context_parallel_size``), a placement file;
* ``RuntimeConfig``: dtype, CPU threads, compilation, offload, attention kernel, step cache (``StepCacheConfig``);
* ``GuardConfig``, ``PreprocessorOptions``, ``OutputConfig``, ``PlanConfig``.

Each default lives here once (``GenerationSettings``' fields, ``FORM_DEFAULTS`` for the Transfer2.5 form's two); the
command line's ``--help`` and the Transfer2.5 spec reader read them from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

#: ``--step_cache`` methods (``transfer.families.transfer25.step_cache``).
STEP_CACHE_METHODS = ("off", "taylorseer", "adaptive")


@dataclass(frozen=True)
class StepCacheConfig:
    method: str = "off"
    threshold: float = 0.03
    """``adaptive``: the accumulated relative velocity change allowed across skipped steps."""
    interval: int = 2
    """``taylorseer``: compute every ``interval``-th step after the warm-up."""
    warmup: int = 2
    """Steps always computed at the start."""
    max_skips: int = 3
    """``adaptive``: consecutive skipped steps at most."""

    def __post_init__(self):
        if self.method not in STEP_CACHE_METHODS:
            raise ValueError(f"step cache method {self.method!r}: one of {', '.join(STEP_CACHE_METHODS)}")

    def describe(self) -> str:
        if self.method == "taylorseer":
            return f"taylorseer (interval {self.interval}, warmup {self.warmup})"
        if self.method == "adaptive":
            return f"adaptive (threshold {self.threshold}, warmup {self.warmup}, max skips {self.max_skips})"
        return "off"


def cfg_on(guidance: float) -> bool:
    """Whether classifier-free guidance runs (a negative branch per step): the one place this is decided."""
    return guidance > 1.0


@dataclass(frozen=True)
class GenerationSettings:
    num_steps: int = 36
    """Denoising steps per chunk (cosmos-transfer1's default; ``FORM_DEFAULTS`` has Transfer2.5's)."""
    guidance: float = 3.0
    """Classifier-free guidance scale; <= 1 disables the negative branch (``cfg_on``)."""
    num_frames_per_chunk: int = 93
    """Frames generated per chunk; must be 1 + 4k for the Wan VAE."""
    num_conditional_frames: int = 1
    """Frames of overlap: chunk k + 1 is conditioned on the last frames of chunk k."""
    chunk_conditioning: str = "roundtrip"
    """``roundtrip`` (decode chunk k, re-encode its last frames) or ``latent`` (reuse chunk k's latents)."""

    @property
    def cfg(self) -> bool:
        return cfg_on(self.guidance)

    @property
    def reencodes_condition(self) -> bool:
        """Whether each later chunk waits for the previous one's decode + re-encode (``roundtrip`` with overlap)."""
        return self.chunk_conditioning == "roundtrip" and self.num_conditional_frames > 0

    @property
    def reuses_latents(self) -> bool:
        """Whether each later chunk is conditioned on the previous one's own latents (``latent`` with overlap)."""
        return self.chunk_conditioning == "latent" and self.num_conditional_frames > 0


#: The request seed's default (cosmos-transfer1's).
DEFAULT_SEED = 1
#: Defaults that differ in the cosmos-transfer2.5 form (its ``examples/inference.py``), by flag name.
FORM_DEFAULTS = {"transfer1": {}, "transfer2.5": {"seed": 2025, "num_steps": 35}}
#: Flags a checkpoint may give its own default for, in ``transfer_defaults.json`` at its root (the demo's: its
#: training clip length, steps, guidance and 64 px); a flag given on the command line or a spec field wins.
CHECKPOINT_DEFAULT_FLAGS = ("num_steps", "guidance", "num_frames_per_chunk", "resolution")


@dataclass(frozen=True)
class InputConfig:
    """Where the run's requests come from, and what a request leaves out."""

    form: str = "transfer1"
    """``transfer1`` (``--controlnet_specs`` / ``--batch_input_path``) or ``transfer2.5`` (``-i``)."""
    controlnet_specs: str | None = None
    batch_input_path: str | None = None
    input_files: tuple[str, ...] = ()
    video_save_name: str = "output"
    defaults: Mapping[str, object] = field(default_factory=dict)
    """A transfer1 request's defaults: ``seed`` and, when given, ``prompt``, ``negative_prompt``, ``input_video_path``."""
    sample_flags: Mapping[str, object] = field(default_factory=dict)
    """Transfer2.5 sample fields given as flags (they override every sample's), by field name."""
    sample_defaults: Mapping[str, object] = field(default_factory=dict)
    """The checkpoint's own defaults for Transfer2.5 sample fields (they replace upstream's), by field name."""
    model: str | None = None
    """``--model``: the one control the samples may name (Transfer2.5 form)."""
    keep_going: bool | None = None
    """Transfer2.5 form: a failing sample is recorded and the others run (None: the default, yes)."""
    max_frames: int = 10_000
    max_resolution: int = 4096

    @property
    def batch(self) -> bool:
        """A batch records a failing request and goes on; a single request's failure fails the run."""
        return bool(self.batch_input_path) or (self.form == "transfer2.5" and self.keep_going is not False)


@dataclass(frozen=True)
class CheckpointChoice:
    dir: str | None = None
    """``--checkpoint_dir``: a diffusers-layout folder."""
    preset: str = "demo"
    """``--checkpoint_preset`` (``configs.models.PRESETS``), used without ``dir``."""
    random_weights: bool = False
    """Build the preset's models from their configs with random weights."""
    defaults: Mapping[str, object] = field(default_factory=dict)
    """The checkpoint's own ``transfer_defaults.json`` values that took effect (flags given on the command line win)."""


@dataclass(frozen=True)
class ParallelConfig:
    num_gpus: int = 1
    """Processes (must equal WORLD_SIZE)."""
    sp_degree: int | None = None
    """``--context_parallel_size``: ranks splitting each DiT branch along the sequence (None: the preset chooses)."""
    placement_file: str | None = None
    """``--placement``: a JSON stage placement instead of the preset."""
    pass_degree: int | None = None
    """``--cfgp-size`` (Cosmos 3): branches of a DiT group dealing each step's transformer passes (None: as many as fit)."""
    vae_degree: int | None = None
    """``--vae_parallel_degree``: ranks splitting each VAE call by rows (None: the preset chooses)."""


@dataclass(frozen=True)
class RuntimeConfig:
    dtype: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32."""
    cpu_threads: int = 1
    compile: str = "none"
    """none, torch or tensorrt (``transfer.acceleration``)."""
    offload: str = "none"
    """none or stages (also set by upstream's ``--offload_*`` flags)."""
    attention: str = "auto"
    """The DiT's attention kernel by diffusers' dispatcher name (``transfer.acceleration``)."""
    step_cache: StepCacheConfig = StepCacheConfig()
    trace: str | None = None
    """``--trace``: a Chrome/Perfetto trace file (multi-process runs)."""


@dataclass(frozen=True)
class GuardConfig:
    mode: str = "on"
    """on, async or off."""
    blocklist: tuple[str, ...] = ()
    allowlist: tuple[str, ...] = ()
    guard_model: str | None = None
    cosmos_guardrail_dir: str | None = None
    face_pixelation: bool = True
    face_min_size: int = 20
    face_confidence: float = 0.9


@dataclass(frozen=True)
class PreprocessorOptions:
    """Settings of the preprocessors that compute controls (each module's ``Config`` picks what it needs)."""

    blur_strength: str = "medium"
    canny_threshold: str = "medium"
    model_dir: str | None = None


@dataclass(frozen=True)
class OutputConfig:
    folder: Path = Path("outputs")
    layout: str = "transfer1"
    """``transfer2.5``: upstream's per-sample files, ``config.yaml`` and ``console.log`` too."""
    fps: float = 24.0
    save_raw: bool = False
    overwrite: bool = False


@dataclass(frozen=True)
class PlanConfig:
    """``--plan``: memory of a placement at a chunk size, for GPUs of a size."""

    gpu_memory_gb: float = 80.0
    dtype: str = "bf16"
    device: str = "cuda"
    height: int = 704
    width: int = 1280
    frames: int | None = None


@dataclass(frozen=True)
class RunConfig:
    generation: GenerationSettings = GenerationSettings()
    inputs: InputConfig = InputConfig()
    checkpoint: CheckpointChoice = CheckpointChoice()
    parallel: ParallelConfig = ParallelConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    guard: GuardConfig = GuardConfig()
    preprocess: PreprocessorOptions = PreprocessorOptions()
    output: OutputConfig = OutputConfig()
    plan: PlanConfig | None = None
    """Set for ``--plan`` (print a memory plan, generate nothing)."""
    record: Mapping[str, object] = field(default_factory=dict)
    """Every flag's resolved value, by flag name: the Transfer2.5 layout's ``config.yaml``."""
