"""Tiny random-weight guard models saved locally, loaded through the product's loading code."""

from __future__ import annotations

from pathlib import Path

import torch

from transfer.embedded_checkpoint import build_tokenizer

#: A guard LLM chat template with plain string content (Llama Guard / Qwen3Guard style turns).
GUARD_CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                       "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def save_classifier(path: Path, unsafe: bool | None) -> Path:
    """A BERT sequence classifier with labels safe / unsafe. ``unsafe`` True or False pins its answer (the
    head's weight is zeroed and its bias decides), None keeps the random head."""
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = build_tokenizer(chat=False)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=512, id2label={0: "safe", 1: "unsafe"},
                        label2id={"safe": 0, "unsafe": 1}, pad_token_id=tokenizer.pad_token_id)
    model = BertForSequenceClassification(config)
    if unsafe is not None:
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.copy_(torch.tensor([0.0, 5.0] if unsafe else [5.0, 0.0]))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_guard_llm(path: Path) -> Path:
    """A tiny random Qwen2 causal LM with a chat template: its answers are gibberish (no verdict)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer(chat=True)
    tokenizer.chat_template = GUARD_CHAT_TEMPLATE
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=32, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
