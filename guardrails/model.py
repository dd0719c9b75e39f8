"""Text guard backed by a transformers model from a local directory, loaded on first use.

Two kinds, told apart by ``config.json``'s ``architectures``:

- a sequence classifier (``*ForSequenceClassification``): blocked when the probability of the
  labels whose names mean unsafe (``UNSAFE_LABEL``: unsafe, toxic, nsfw, harmful, ...) reaches
  ``threshold`` (softmax; sigmoid per label for multi-label models);
- a guard LLM (Llama Guard, Qwen3Guard, any chat model answering in their format): the prompt goes
  in as the user turn of the tokenizer's chat template, the answer is generated greedily and
  parsed: ``safe`` / ``unsafe\\nS1`` (Llama Guard) or ``Safety: Safe|Unsafe|Controversial``
  (Qwen3Guard; controversial counts as unsafe). An answer in neither format blocks (fail closed).
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

from transfer.errors import TransferError

UNSAFE_LABEL = re.compile(r"unsafe|toxic|nsfw|harm|hate|offensive|violen|sexual|jailbreak|injection|not.?safe", re.I)
MAX_NEW_TOKENS = 32


def parse_guard_answer(text: str) -> tuple[bool | None, str]:
    """(safe, detail) from a guard LLM's answer; safe is None when the answer is in no known format."""
    m = re.search(r"safety\s*:\s*(safe|unsafe|controversial)", text, re.I)
    if m:
        verdict = m.group(1).lower()
        cats = re.search(r"categories\s*:\s*(.+)", text, re.I)
        return verdict == "safe", f"{verdict}" + (f" ({cats.group(1).strip()})" if cats and verdict != "safe" else "")
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if lines and lines[0].lower() == "safe":
        return True, "safe"
    if lines and lines[0].lower() == "unsafe":
        return False, "unsafe" + (f" ({lines[1]})" if len(lines) > 1 else "")
    return None, f"unrecognised guard answer {text.strip()[:80]!r}"


def check_model_dir(path: str | Path) -> Path:
    """Fail fast (before any model loads) on a guard model path that cannot work."""
    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        raise TransferError(f"--guard_model {path}: no config.json (a transformers model directory is needed)")
    try:
        archs = json.loads(config.read_text()).get("architectures") or []
    except ValueError as e:
        raise TransferError(f"--guard_model {path}: config.json is not JSON: {e}") from None
    if not archs:
        raise TransferError(f"--guard_model {path}: config.json names no architectures")
    return path


class ModelTextGuard:
    name = "model"

    def __init__(self, path: str | Path, device: str = "cpu", threshold: float = 0.5):
        self.path, self.device, self.threshold = check_model_dir(path), device, threshold
        self.model = self.tokenizer = None
        self._lock = threading.Lock()

    def load(self) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        config = AutoConfig.from_pretrained(self.path, local_files_only=True)
        self.classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or ())
        if self.classifier:
            labels = {int(i): str(n) for i, n in config.id2label.items()}
            self.unsafe = [i for i, n in labels.items() if UNSAFE_LABEL.search(n) and not re.fullmatch(r"safe", n, re.I)]
            if not self.unsafe:
                raise TransferError(f"--guard_model {self.path}: none of its labels {sorted(labels.values())} names an "
                                    "unsafe class (unsafe, toxic, nsfw, harmful, ...): set id2label in config.json")
            self.multi_label = config.problem_type == "multi_label_classification"
            cls = AutoModelForSequenceClassification
        else:
            cls = AutoModelForCausalLM
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        if not self.classifier and not self.tokenizer.chat_template:
            raise TransferError(f"--guard_model {self.path}: a guard LLM needs a tokenizer with a chat template")
        dtype = torch.bfloat16 if str(self.device).startswith("cuda") else torch.float32
        self.model = cls.from_pretrained(self.path, local_files_only=True, dtype=dtype).to(self.device).eval()

    def text_verdict(self, prompt: str) -> tuple[bool, str]:
        """(safe, why)."""
        import torch

        with self._lock:
            if self.model is None:
                self.load()
            with torch.no_grad():
                if self.classifier:
                    enc = self.tokenizer(prompt, return_tensors="pt", truncation=True).to(self.device)
                    logits = self.model(**enc).logits[0].float()
                    probs = logits.sigmoid() if self.multi_label else logits.softmax(-1)
                    p = float(probs[self.unsafe].max() if self.multi_label else probs[self.unsafe].sum())
                    return p < self.threshold, f"classifier p(unsafe) = {p:.3f} (threshold {self.threshold})"
                ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                         return_tensors="pt", return_dict=True).to(self.device)
                out = self.model.generate(**ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                          pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
                answer = self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        safe, detail = parse_guard_answer(answer)
        return bool(safe), f"guard LLM: {detail}"

    def check_text_safety(self, prompt: str) -> bool:
        return self.text_verdict(prompt)[0]
