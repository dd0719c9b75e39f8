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


@dataclass
class Cosmos3Info:
    """Validated configs of a Cosmos 3 folder (no weights loaded)."""

    root: Path
    transformer: dict
    vae: dict
    scheduler: dict


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
