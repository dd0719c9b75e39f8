"""The embedded default checkpoint: random weights in the real diffusers layout.

``ensure_tiny_checkpoint()`` writes (once, then reuses from the cache) a complete
checkpoint directory -- ``text_encoder/ tokenizer/ transformer/ vae/ scheduler/
controlnet/<modality>/`` and tiny control preprocessors in ``preprocessors/`` -- so the CLI runs on a fresh CPU-only machine with no
download. Weights come from fixed seeds, so every machine builds the same files.
It is loaded by the same code as a real checkpoint. Its output is noise-like
imagery, not a meaningful video.
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile
from pathlib import Path

import torch
from loguru import logger

from configs.cosmos3 import COSMOS3_PRESETS, Cosmos3Config
from configs.models import CheckpointConfig, preset
from transfer.errors import TransferError
from transfer.families.transfer25.text_encoding import text_encoder_class

#: Bump when the tiny layout or weights change, so stale caches are not reused.
TINY_VERSION = 2  # 2: preprocessors/ (depth, seg, keypoint) added
#: The embedded Cosmos 3 preset's version (3: its tokenizer's context is a chat model's, not T5's 512).
COSMOS3_TINY_VERSION = 3
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
#: A minimal chat template in Qwen's shape, for the tiny Qwen2.5-VL tokenizer.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}<|im_end|>\n{% endfor %}"
)


def cache_root() -> Path:
    """Where built presets live: ``$TRANSFER_CACHE_DIR`` or ``~/.cache/cosmos-transfer-pp``."""
    env = os.environ.get("TRANSFER_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "cosmos-transfer-pp"


def build_tokenizer(chat: bool, words: tuple[str, ...] | None = None, eos: str = EOS,
                    chat_tokens: tuple[str, ...] = CHAT_TOKENS, template: str = CHAT_TEMPLATE, max_length: int = 512):
    """A fast tokenizer built locally (no download), saved like any HF tokenizer: one token per character, or with
    ``words`` one per word (lower-cased, punctuation split off; any other word is ``<unk>``: the demo checkpoint's
    tokenizer over its world's words, ``demo.world.WORDS``). ``eos``, ``chat_tokens`` and ``template``: a chat
    model's own (Cosmos 3's: ``<|endoftext|>``, ``<|vision_start|>``, messages with string content); ``max_length``:
    the longest input it takes (T5's 512; a chat model's context)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, eos, UNK, *chat_tokens] if chat else [PAD, eos, UNK]
    pieces = list(dict.fromkeys(words)) if words else sorted(set(string.printable) - set("\x0b\x0c"))
    vocab = {tok: i for i, tok in enumerate([*specials, *pieces])}
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    if words:
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
    else:
        tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    if not chat:  # T5 appends </s> to every sequence
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}", special_tokens=[(eos, vocab[eos])]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=eos, unk_token=UNK,
        additional_special_tokens=list(chat_tokens) if chat else None,
        model_max_length=max_length,
    )
    if chat:
        fast.chat_template = template
    return fast


def _save_models(cfg: CheckpointConfig, out: Path, seed: int) -> None:
    from diffusers import AutoencoderKLWan, CosmosControlNetModel, CosmosTransformer3DModel, UniPCMultistepScheduler

    tokenizer = build_tokenizer(chat=cfg.text_encoder_type == "qwen2_5_vl")
    tokenizer.save_pretrained(out / "tokenizer")

    torch.manual_seed(seed)
    ids = dict(vocab_size=len(tokenizer))
    if cfg.text_encoder_type != "t5":  # Qwen's config carries the tokenizer's special ids
        ids.update(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    text_encoder = text_encoder_class(cfg.text_encoder_type)(cfg.text_config(**ids))
    text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)

    torch.manual_seed(seed + 1)
    CosmosTransformer3DModel(**cfg.transformer).save_pretrained(out / "transformer", safe_serialization=True)
    torch.manual_seed(seed + 2)
    AutoencoderKLWan(**cfg.vae).save_pretrained(out / "vae", safe_serialization=True)
    UniPCMultistepScheduler(**cfg.scheduler).save_pretrained(out / "scheduler")
    for i, modality in enumerate(cfg.modalities):
        torch.manual_seed(seed + 10 + i)
        CosmosControlNetModel(**cfg.controlnet).save_pretrained(
            out / "controlnet" / modality, safe_serialization=True
        )
    from preprocessors.random_weights import write_tiny_preprocessors

    write_tiny_preprocessors(out / "preprocessors", seed)


#: Cosmos 3's chat template in Qwen's shape (messages with string content), for the embedded tokenizer.
COSMOS3_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _save_cosmos3(cfg: Cosmos3Config, out: Path, seed: int) -> None:
    """A Cosmos 3 folder in diffusers' layout: transformer, Wan2.2 VAE, scheduler, the tokenizer of the transformer's
    own language stream (``text_tokenizer``, the modular pipeline's component name)."""
    from diffusers import AutoencoderKLWan, Cosmos3OmniTransformer, UniPCMultistepScheduler

    tokenizer = build_tokenizer(chat=True, eos="<|endoftext|>", chat_tokens=("<|im_start|>", "<|im_end|>",
                                                                             "<|vision_start|>"),
                                template=COSMOS3_CHAT_TEMPLATE, max_length=131072)  # a chat model's context
    if len(tokenizer) > cfg.transformer["vocab_size"]:
        raise ValueError(f"{cfg.name}: {len(tokenizer)} tokens exceed the transformer's vocabulary")
    tokenizer.save_pretrained(out / "text_tokenizer")
    torch.manual_seed(seed + 1)
    Cosmos3OmniTransformer(**cfg.transformer).save_pretrained(out / "transformer", safe_serialization=True)
    torch.manual_seed(seed + 2)
    AutoencoderKLWan(**cfg.vae).save_pretrained(out / "vae", safe_serialization=True)
    UniPCMultistepScheduler(**cfg.scheduler).save_pretrained(out / "scheduler")


def write_checkpoint(cfg: CheckpointConfig | Cosmos3Config, out: Path, seed: int = 0) -> Path:
    """Write a complete random-weight checkpoint for ``cfg`` at ``out`` (atomically)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (_save_cosmos3 if isinstance(cfg, Cosmos3Config) else _save_models)(cfg, staging, seed)
        try:
            os.rename(staging, out)
        except OSError:  # another process (e.g. another rank) finished first; keep theirs
            if not (out / "transformer").is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def ensure_tiny_checkpoint(name: str = "tiny") -> Path:
    """Return the cached checkpoint directory for a tiny preset, building it on first use; a shipped preset's
    (``demo``) directory as it is."""
    cfg = COSMOS3_PRESETS[name]() if name in COSMOS3_PRESETS else preset(name)
    if getattr(cfg, "shipped", None) is not None:
        if not (cfg.shipped / "transformer").is_dir():
            raise TransferError(f"checkpoint preset {name!r}: its shipped weights are missing from {cfg.shipped} "
                                "(a checkout without them: run scripts/train_demo.py, or --checkpoint_preset tiny)")
        return cfg.shipped
    if not cfg.embedded:
        raise TransferError(f"checkpoint preset {name!r} is configs only (for --plan); "
                            "give --checkpoint_dir with real weights to generate")
    path = cache_root() / f"{name}-v{COSMOS3_TINY_VERSION if name in COSMOS3_PRESETS else TINY_VERSION}"
    if not (path / "transformer").is_dir():
        logger.info(f"building the embedded {name!r} random-weight checkpoint at {path}")
        write_checkpoint(cfg, path)
    return path
