"""Load a diffusers-layout checkpoint directory, one stage at a time.

Layout (safetensors weights, configs beside them)::

    text_encoder/  tokenizer/  transformer/  vae/  scheduler/  controlnet/<modality>/

``inspect_checkpoint`` reads configs only and checks that the parts fit together,
so a missing or inconsistent component is reported (by name) before any weight
loads. The ``load_*`` functions then build only the stage a process needs.

``--random_weights`` (``info_from_preset``: a ``CheckpointInfo`` without a directory): the same
``load_*`` functions build each model from its config with random weights, directly on the
process's device and in the run dtype -- the modules are made on the meta device, then every
parameter is allocated on the device and initialised there (seeded per component, so every
placement builds the same weights) -- with no CPU copy of the weights. Time and memory do not
depend on weight values: this is how real-size runs are measured without a download.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from configs.models import MODALITIES
from transfer.errors import TransferError

if TYPE_CHECKING:
    from transfer.config import CheckpointChoice
from transfer.families.transfer25.text_encoding import TEXT_ENCODER_TYPES, embedding_dim

COMPONENT_CLASSES = {
    "transformer": "CosmosTransformer3DModel",
    "vae": "AutoencoderKLWan",
    "scheduler": "UniPCMultistepScheduler",
}
CONTROLNET_CLASS = "CosmosControlNetModel"
#: A Cosmos 3 folder's transformer (``transfer.families.cosmos3.checkpoint`` reads those folders).
COSMOS3_TRANSFORMER = "Cosmos3OmniTransformer"


@dataclass
class CheckpointInfo:
    """Validated configs of a checkpoint directory (no weights loaded)."""

    root: Path | None
    """The directory; None for configs taken from a preset (``--plan`` without weights)."""
    text_encoder_type: str
    text_config: object  # transformers.PretrainedConfig
    transformer: dict
    vae: dict
    scheduler: dict
    controlnets: dict[str, dict]

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if m in self.controlnets)


def _read_config(root: Path, component: str, filename: str = "config.json") -> dict:
    path = root / component / filename
    if not (root / component).is_dir():
        raise TransferError(f"checkpoint {root} is missing the {component}/ component")
    if not path.is_file():
        raise TransferError(f"checkpoint component {component}/ has no {filename} ({path})")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TransferError(f"checkpoint component {component}/: cannot parse {path}: {e}") from None


def _expect_class(config: dict, component: str, expected: str) -> None:
    found = config.get("_class_name")
    if found != expected:
        raise TransferError(f"checkpoint component {component}/ holds {found!r}, expected {expected}")


def _check_consistent(info: CheckpointInfo) -> None:
    t, vae = info.transformer, info.vae
    hidden = t["num_attention_heads"] * t["attention_head_dim"]
    if vae["z_dim"] + 1 != t["in_channels"]:
        raise TransferError(
            f"inconsistent checkpoint: vae/ z_dim {vae['z_dim']} does not fit transformer/ in_channels "
            f"{t['in_channels']} (expected z_dim + 1 for the condition mask)"
        )
    text_dim = embedding_dim(info.text_config)
    for name, cfg in [("transformer", t), *((f"controlnet/{m}", c) for m, c in info.controlnets.items())]:
        want = cfg["crossattn_proj_in_channels"] if cfg.get("use_crossattn_projection") else cfg["text_embed_dim"]
        if want != text_dim:
            raise TransferError(
                f"inconsistent checkpoint: text_encoder/ makes {text_dim}-channel embeddings but {name}/ expects {want}"
            )
    needed_blocks = math.ceil(t["num_layers"] / (t.get("controlnet_block_every_n") or t["num_layers"]))
    for m, c in info.controlnets.items():
        if c["model_channels"] != hidden:
            raise TransferError(
                f"inconsistent checkpoint: controlnet/{m}/ has {c['model_channels']} channels, transformer/ has {hidden}"
            )
        if c["n_controlnet_blocks"] < needed_blocks:
            raise TransferError(
                f"inconsistent checkpoint: controlnet/{m}/ has {c['n_controlnet_blocks']} blocks, "
                f"the transformer needs {needed_blocks}"
            )
        if c["latent_channels"] != t["in_channels"] + 1 or c["in_channels"] - 2 < vae["z_dim"]:
            raise TransferError(f"inconsistent checkpoint: controlnet/{m}/ input channels do not fit the vae/ latents")


def inspect_checkpoint(root: str | Path) -> CheckpointInfo:
    """Read and cross-check every component's config; raise ``TransferError`` naming the bad part."""
    from transformers import AutoConfig

    root = Path(root)
    if not root.is_dir():
        raise TransferError(f"checkpoint directory not found: {root}")
    transformer = _read_config(root, "transformer")
    if transformer.get("_class_name") == COSMOS3_TRANSFORMER:
        raise TransferError(f"checkpoint {root} is a Cosmos 3 checkpoint (transformer/ holds {COSMOS3_TRANSFORMER}): "
                            "this reads Transfer2.5 / transfer1 folders (transfer.py runs Cosmos 3 ones, docs/cosmos3.md)")
    configs = {}
    for component, cls in COMPONENT_CLASSES.items():
        filename = "scheduler_config.json" if component == "scheduler" else "config.json"
        configs[component] = _read_config(root, component, filename)
        _expect_class(configs[component], component, cls)
    _read_config(root, "text_encoder")
    if not (root / "tokenizer").is_dir():
        raise TransferError(f"checkpoint {root} is missing the tokenizer/ component")
    try:
        text_config = AutoConfig.from_pretrained(root / "text_encoder", local_files_only=True)
    except Exception as e:  # transformers raises several types for a bad config
        raise TransferError(f"checkpoint component text_encoder/: {e}") from None
    if text_config.model_type not in TEXT_ENCODER_TYPES:
        raise TransferError(
            f"checkpoint component text_encoder/ is {text_config.model_type!r}; supported: {', '.join(TEXT_ENCODER_TYPES)}"
        )
    controlnets = {}
    cn_root = root / "controlnet"
    if not cn_root.is_dir():
        raise TransferError(f"checkpoint {root} is missing the controlnet/ component")
    for sub in sorted(p for p in cn_root.iterdir() if p.is_dir()):
        if sub.name not in MODALITIES:
            raise TransferError(f"checkpoint controlnet/{sub.name}/ is not a known modality ({', '.join(MODALITIES)})")
        cfg = _read_config(root, f"controlnet/{sub.name}")
        _expect_class(cfg, f"controlnet/{sub.name}", CONTROLNET_CLASS)
        controlnets[sub.name] = cfg
    if not controlnets:
        raise TransferError(f"checkpoint {root} has no controlnet/<modality>/ directories")
    info = CheckpointInfo(
        root, text_config.model_type, text_config, configs["transformer"], configs["vae"], configs["scheduler"], controlnets
    )
    _check_consistent(info)
    return info


#: Seeds of the random-weight components (``--random_weights``): one per model, whatever the placement.
RANDOM_SEEDS = {"text_encoder": 0, "transformer": 1, "vae": 2, "controlnet": 10}


def keeps_fp32(model, name: str) -> bool:
    """Whether parameter ``name`` stays fp32 in a low-precision run (the class's ``_keep_in_fp32_modules``)."""
    return any(k in name for k in (getattr(model, "_keep_in_fp32_modules", None) or []))


@contextmanager
def _parameters_on_meta():
    """Every parameter a module registers inside the block goes to the meta device (its initialisation then costs
    nothing); buffers are made for real. Plain torch: accelerate's ``init_empty_weights`` does the same but rebuilds
    each parameter from its ``__dict__``, which fails under ``FakeTensorMode`` with accelerate 1.15 on torch 2.11
    (``FakeTensor.__new__() got an unexpected keyword argument 'fake_device'``)."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None:
            param = torch.nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def empty_model(make, device: torch.device, dtype: torch.dtype):
    """``make()`` with uninitialised weights on ``device`` in ``dtype`` (fp32 where the class keeps modules in fp32):
    built on the meta device (buffers, which modules compute at construction, are made for real: they are small),
    then each parameter allocated on ``device``. A tied parameter stays tied. Under ``FakeTensorMode`` the
    parameters are fake (``transfer.memory``: shapes, no storage)."""
    with _parameters_on_meta():
        model = make()
    if hasattr(model, "tie_weights"):  # the meta context gives each registration its own tensor: tie them again
        model.tie_weights()
    made: dict[int, torch.nn.Parameter] = {}
    for module_name, module in model.named_modules():
        for attr, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in made:
                name = f"{module_name}.{attr}" if module_name else attr
                value = torch.empty(param.shape, dtype=torch.float32 if keeps_fp32(model, name) else dtype, device=device)
                made[id(param)] = torch.nn.Parameter(value, requires_grad=False)
            module._parameters[attr] = made[id(param)]
        for attr, buffer in list(module._buffers.items()):  # not model.to(device): that would re-make the parameters
            if buffer is not None:
                module._buffers[attr] = buffer.to(device)
    return model.eval()


def random_model(make, device: torch.device, dtype: torch.dtype, seed: int):
    """``make()`` with random weights on ``device`` in ``dtype`` (``empty_model``, then each parameter initialised
    where it lies): normal with std 1/sqrt(fan in) for matrices, ones for 1-D weights (norm scales), zeros for
    biases. Deterministic for a given ``seed`` and device type. Fake parameters (planning) are left as they are."""
    from torch._subclasses.fake_tensor import FakeTensor

    model = empty_model(make, device, dtype)
    params = list(model.named_parameters())  # a tied parameter once, in registration order
    if any(isinstance(p, FakeTensor) for _, p in params):
        return model
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, value in params:
            if name.rsplit(".", 1)[-1] == "bias":
                value.zero_()
            elif value.dim() == 1:
                value.fill_(1.0)
            else:
                value.normal_(0.0, math.prod(value.shape[1:]) ** -0.5, generator=generator)
    return model


def info_from_preset(cfg) -> CheckpointInfo:
    """A ``CheckpointInfo`` from a ``configs.models.CheckpointConfig`` (configs only, nothing on disk)."""
    info = CheckpointInfo(
        None, cfg.text_encoder_type, cfg.text_config(), dict(cfg.transformer), dict(cfg.vae), dict(cfg.scheduler),
        {m: dict(cfg.controlnet) for m in cfg.modalities},
    )
    _check_consistent(info)
    return info


def require_modalities(info: CheckpointInfo, modalities, where: str = "") -> None:
    """Raise ``TransferError`` unless the checkpoint has a ControlNet for every modality."""
    missing = [m for m in modalities if m not in info.controlnets]
    if missing:
        prefix = f"{where}: " if where else ""
        raise TransferError(
            f"{prefix}control {missing[0]!r} requested but the checkpoint has no controlnet/{missing[0]}/ "
            f"(available: {', '.join(info.modalities)})"
        )


def _load(component: str, fn, *args, **kwargs):
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a "Loading weights" bar per component, every run: noise
    diffusers_logging.disable_progress_bar()
    try:
        return fn(*args, **kwargs)
    except TransferError:
        raise
    except Exception as e:  # a missing or corrupt weight file surfaces here
        raise TransferError(f"cannot load checkpoint component {component}/: {type(e).__name__}: {e}") from None


def load_text_encoder(info: CheckpointInfo, device: torch.device, dtype: torch.dtype):
    """Build the text stage: tokenizer + encoder model (eval, on ``device``)."""
    from transformers import AutoTokenizer

    from transfer.families.transfer25.text_encoding import TextEncoder, text_encoder_class

    cls = text_encoder_class(info.text_encoder_type)
    if info.root is None:  # --random_weights: a local character tokenizer, the preset's config
        from transfer.embedded_checkpoint import build_tokenizer

        tokenizer = build_tokenizer(chat=info.text_encoder_type != "t5")  # ids below any vocabulary's size
        model = random_model(lambda: cls(info.text_config), device, dtype, RANDOM_SEEDS["text_encoder"])
        return TextEncoder(model, tokenizer, device, dtype)
    tokenizer = _load("tokenizer", AutoTokenizer.from_pretrained, info.root / "tokenizer", local_files_only=True)
    model = _load("text_encoder", cls.from_pretrained, info.root / "text_encoder", dtype=dtype, local_files_only=True)
    return TextEncoder(model.to(device).eval(), tokenizer, device, dtype)


def load_vae(info: CheckpointInfo, device: torch.device, dtype: torch.dtype):
    """Build the VAE stage (AutoencoderKLWan with its latent normalisation)."""
    from diffusers import AutoencoderKLWan

    from transfer.families.transfer25.models import VideoVAE

    if info.root is None:  # --random_weights
        return VideoVAE(random_model(lambda: AutoencoderKLWan(**info.vae), device, dtype, RANDOM_SEEDS["vae"]), device)
    vae = _load("vae", AutoencoderKLWan.from_pretrained, info.root / "vae", torch_dtype=dtype, local_files_only=True)
    return VideoVAE(vae.to(device).eval(), device)


def load_dit(info: CheckpointInfo, modalities, device: torch.device, dtype: torch.dtype):
    """Build the DiT stage: transformer, the ControlNets for ``modalities``, the scheduler."""
    from diffusers import CosmosControlNetModel, CosmosTransformer3DModel, UniPCMultistepScheduler

    from transfer.families.transfer25.models import Denoiser

    require_modalities(info, modalities)
    if info.root is None:  # --random_weights; ControlNet seeds follow the checkpoint's modality order
        transformer = random_model(lambda: CosmosTransformer3DModel(**info.transformer), device, dtype,
                                   RANDOM_SEEDS["transformer"])
        controlnets = {m: random_model(lambda m=m: CosmosControlNetModel(**info.controlnets[m]), device, dtype,
                                       RANDOM_SEEDS["controlnet"] + info.modalities.index(m)) for m in modalities}
        return Denoiser(transformer, controlnets, UniPCMultistepScheduler(**info.scheduler), device)
    transformer = _load(
        "transformer", CosmosTransformer3DModel.from_pretrained, info.root / "transformer",
        torch_dtype=dtype, local_files_only=True,
    )
    controlnets = {
        m: _load(
            f"controlnet/{m}", CosmosControlNetModel.from_pretrained, info.root / "controlnet" / m,
            torch_dtype=dtype, local_files_only=True,
        ).to(device).eval()
        for m in modalities
    }
    scheduler = _load("scheduler", UniPCMultistepScheduler.from_pretrained, info.root / "scheduler", local_files_only=True)
    return Denoiser(transformer.to(device).eval(), controlnets, scheduler, device)


def load_stage(info: CheckpointInfo, name: str, modalities, device: torch.device, dtype: torch.dtype):
    """The stage ``name`` (text, vae or dit) built by its loader."""
    if name == "text":
        return load_text_encoder(info, device, dtype)
    if name == "vae":
        return load_vae(info, device, dtype)
    return load_dit(info, list(modalities), device, dtype)


def resolve_checkpoint(choice: "CheckpointChoice") -> Path:
    if choice.dir:
        return Path(choice.dir)
    from transfer.embedded_checkpoint import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint(choice.preset)


def checkpoint_info(choice: "CheckpointChoice") -> CheckpointInfo:
    """The run's checkpoint configs: a directory's (``--checkpoint_dir``, or the embedded tiny one), or with
    ``--random_weights`` the ``--checkpoint_preset``'s, whose models are then built with random weights."""
    if not choice.random_weights:
        return inspect_checkpoint(resolve_checkpoint(choice))
    if choice.dir:
        raise TransferError("--random_weights builds the --checkpoint_preset's models from their configs: "
                            "drop --checkpoint_dir")
    from configs.models import preset

    return info_from_preset(preset(choice.preset))
