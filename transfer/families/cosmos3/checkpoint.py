"""A Cosmos 3 checkpoint folder (diffusers' layout, ``configs.cosmos3``): its configs read and cross-checked before any
weight loads, each problem one error naming the part (as ``transfer.checkpoint.inspect_checkpoint`` does for
Transfer2.5 folders)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transfer.checkpoint import COSMOS3_TRANSFORMER, _expect_class, _read_config
from transfer.errors import TransferError

COMPONENTS = {"transformer": COSMOS3_TRANSFORMER, "vae": "AutoencoderKLWan",
              "scheduler": "UniPCMultistepScheduler"}
#: The tokens the transfer branch needs from the tokenizer (diffusers' ``llm_special_tokens`` and its chat format).
SPECIAL_TOKENS = ("<|vision_start|>", "<|im_start|>", "<|im_end|>")


#: This fork's control names -> Cosmos 3's hints (``vis`` is the blurred input video: Cosmos 3's ``blur``).
HINT_OF = {"vis": "blur", "edge": "edge", "depth": "depth", "seg": "seg", "wsm": "wsm"}
#: The largest side Cosmos 3 generates here, in pixels (its mRoPE has no fixed table; 4K is far past what it saw).
MAX_SIDE_PX = 4096


@dataclass
class Cosmos3Info:
    """Validated configs of a Cosmos 3 folder (no weights loaded); ``root`` None: a preset's configs
    (``--random_weights``, ``--plan``)."""

    root: Path | None
    transformer: dict
    vae: dict
    scheduler: dict

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(HINT_OF)

    def limits(self):
        """What the Wan2.2 VAE takes: 1 + 4k frames, sides in multiples of 16 (the patch-2 token grid is padded inside
        the transformer)."""
        from transfer.prepare import ModelLimits

        unit = self.vae.get("scale_factor_spatial", 16)
        return ModelLimits(temporal_factor=self.vae.get("scale_factor_temporal", 4), spatial_factor=unit,
                           patch_size=(1, 1, 1), max_rope_positions=MAX_SIDE_PX // unit)

    def check_request(self, request, settings) -> None:
        """Refuse in one line what Cosmos 3 cannot do with a request: a control it has no hint for, a control weight
        (it has none: ``control_guidance`` scales every hint), latent chunk conditioning."""
        where = request.where
        for modality, control in request.controls.items():
            if modality not in HINT_OF:
                raise TransferError(f"{where}: control {modality!r}: Cosmos 3 has no such hint (hints: edge, blur or vis, "
                                    "depth, seg, wsm)")
            if control.spatial or control.weight != 1.0:
                raise TransferError(f"{where}: control {modality!r}: Cosmos 3 has no per-hint weight, mask or weight "
                                    "map (control_weight 1 only; control_guidance scales every hint)")
        if settings.chunk_conditioning != "roundtrip":
            raise TransferError(f"{where}: Cosmos 3 seeds each chunk from the previous chunk's decoded frames: "
                                "--chunk_conditioning roundtrip only")


    def check_runtime(self, runtime) -> None:
        """Refuse in one line, before anything loads, a runtime flag the Cosmos 3 path does not apply (``runtime``:
        ``transfer.config.RuntimeConfig``): it loads diffusers' modular pipeline as it is, so ``--compile``,
        ``--offload``, ``--step_cache`` and ``--attention_backend`` (Transfer2.5's DiT stages) would do nothing."""
        refused = [(runtime.compile != "none", f"--compile {runtime.compile}"),
                   (runtime.offload != "none", f"--offload {runtime.offload}"),
                   (runtime.step_cache.method != "off", f"--step_cache {runtime.step_cache.method}"),
                   (runtime.attention != "auto", f"--attention_backend {runtime.attention}")]
        for bad, flag in refused:
            if bad:
                raise TransferError(f"{flag} is Transfer2.5's: the Cosmos 3 path does not apply it yet (leave it out; "
                                    "docs/cosmos3.md, 'Flags')")


def cosmos3_preset_info(name: str) -> Cosmos3Info:
    """A Cosmos 3 preset's configs (no folder): ``--random_weights`` and ``--plan``."""
    from configs.cosmos3 import COSMOS3_PRESETS

    cfg = COSMOS3_PRESETS[name]()
    return Cosmos3Info(None, dict(cfg.transformer), dict(cfg.vae), dict(cfg.scheduler))


def is_cosmos3(root: str | Path) -> bool:
    """Whether ``root``'s transformer is Cosmos 3's (read from its config only)."""
    path = Path(root) / "transformer" / "config.json"
    try:
        return json.loads(path.read_text()).get("_class_name") == COMPONENTS["transformer"]
    except (OSError, ValueError):
        return False


def inspect_cosmos3(root: str | Path) -> Cosmos3Info:
    """Read and cross-check a Cosmos 3 folder; raise ``TransferError`` naming the bad part."""
    root = Path(root)
    if not root.is_dir():
        raise TransferError(f"checkpoint directory not found: {root}")
    configs = {}
    for component, cls in COMPONENTS.items():
        configs[component] = _read_config(root, component,
                                          "scheduler_config.json" if component == "scheduler" else "config.json")
        _expect_class(configs[component], component, cls)
    t, vae = configs["transformer"], configs["vae"]
    if vae.get("z_dim") != t.get("latent_channel", 48):
        raise TransferError(f"inconsistent checkpoint: vae/ z_dim {vae.get('z_dim')} does not fit transformer/ "
                            f"latent_channel {t.get('latent_channel', 48)}")
    if not (root / "text_tokenizer").is_dir():
        raise TransferError(f"checkpoint {root} is missing the text_tokenizer/ component (Cosmos 3 has no text "
                            "encoder: the prompt's token ids go to the transformer)")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(root / "text_tokenizer", local_files_only=True)
    except Exception as e:  # transformers raises several types for a bad tokenizer folder
        raise TransferError(f"checkpoint component text_tokenizer/: {e}") from None
    missing = [tok for tok in SPECIAL_TOKENS if tok not in tokenizer.get_vocab()]
    if missing or tokenizer.eos_token_id is None:
        raise TransferError(f"checkpoint component text_tokenizer/ lacks {missing or ['an eos token']}: not Cosmos 3's")
    if len(tokenizer) > t.get("vocab_size", 151936):
        raise TransferError(f"inconsistent checkpoint: text_tokenizer/ has {len(tokenizer)} tokens, transformer/ "
                            f"embeds {t.get('vocab_size', 151936)}")
    return Cosmos3Info(root, t, vae, configs["scheduler"])
