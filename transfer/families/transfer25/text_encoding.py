"""The text stage: prompt -> embedding tensor ``[1, 512, D]``; the DiT only sees the tensor.

Two encoders, chosen from ``text_encoder/config.json``:
- T5 (``model_type == "t5"``): last hidden state, zeros after the prompt's length,
  exactly as diffusers' Cosmos T5 pipelines make it.
- Cosmos-Reason1 / Qwen2.5-VL (``model_type == "qwen2_5_vl"``): the chat-templated
  prompt, every layer's hidden state normalised and concatenated, as diffusers'
  Cosmos 2.5 pipelines do (28 x 3584 = 100352 channels for the real model).
"""

from __future__ import annotations

import torch

from transfer.residency import OnDevice

MAX_SEQUENCE_LENGTH = 512
SYSTEM_PROMPT = "You are a helpful assistant who will provide prompts to an image generator."
TEXT_ENCODER_TYPES = ("t5", "qwen2_5_vl")


def text_encoder_class(kind: str):
    """The ``transformers`` model class for a text encoder ``model_type`` (one of ``TEXT_ENCODER_TYPES``)."""
    if kind == "t5":
        from transformers import T5EncoderModel

        return T5EncoderModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration


def embedding_dim(config) -> int:
    """Channels of the embedding a text encoder config produces (no weights needed)."""
    if config.model_type == "t5":
        return config.d_model
    text = getattr(config, "text_config", config)
    return text.num_hidden_layers * text.hidden_size


class TextEncoder(OnDevice):
    """Wraps a loaded text encoder and its tokenizer; ``encode`` one prompt at a time.

    Prompts are encoded singly (never batched with padding) so an embedding does not
    depend on which other prompts share a batch, a placement or a process.
    """

    def __init__(self, model, tokenizer, device: torch.device, dtype: torch.dtype):
        self.model, self.tokenizer, self.device, self.dtype = model, tokenizer, device, dtype
        self.kind = model.config.model_type
        if self.kind not in TEXT_ENCODER_TYPES:
            raise ValueError(f"unsupported text encoder model_type {self.kind!r}")

    @torch.no_grad()
    def encode(self, prompt: str) -> torch.Tensor:
        """Return the prompt embedding, ``[1, 512, D]`` in ``self.dtype``."""
        self.resident()
        if self.kind == "t5":
            return self._encode_t5(prompt)
        return self._encode_reason(prompt)

    def _encode_t5(self, prompt: str) -> torch.Tensor:
        inputs = self.tokenizer([prompt], padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True)
        length = sum(inputs["attention_mask"][0])  # tokens of the prompt, counted on the host
        mask = torch.tensor(inputs["attention_mask"], dtype=torch.bool).to(self.device)
        embeds = self.model(torch.tensor(inputs["input_ids"]).to(self.device), attention_mask=mask).last_hidden_state
        embeds = embeds.to(self.dtype)
        embeds[0, length:] = 0  # [1, L, D]: zeros past the prompt, as the DiT was trained
        return embeds

    def _encode_reason(self, prompt: str) -> torch.Tensor:
        conversation = [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
            {"role": "user", "content": [{"type": "text", "text": prompt}]},
        ]
        ids = self.tokenizer.apply_chat_template(
            conversation, tokenize=True, add_generation_prompt=False, add_vision_id=False,
            max_length=MAX_SEQUENCE_LENGTH, truncation=True, padding="max_length",
        )
        ids = ids["input_ids"] if not isinstance(ids, list) and "input_ids" in ids else ids
        hidden = self.model(torch.LongTensor(ids)[None].to(self.device), output_hidden_states=True).hidden_states
        normalised = [(h - h.mean(dim=-1, keepdim=True)) / (h.std(dim=-1, keepdim=True) + 1e-8) for h in hidden[1:]]
        return torch.cat(normalised, dim=-1).to(self.dtype)  # [1, L, layers * hidden]
