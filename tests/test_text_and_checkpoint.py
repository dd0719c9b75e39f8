"""Text embeddings against diffusers' own code; checkpoint loading errors; tiny determinism."""

from __future__ import annotations

import hashlib
import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from configs.models import preset
from transfer.checkpoint import inspect_checkpoint, load_dit, load_text_encoder
from transfer.errors import TransferError
from transfer.embedded_checkpoint import write_checkpoint

CPU, FP32 = torch.device("cpu"), torch.float32
PROMPT = "A robot arm folds a blue cloth on a yellow cushion."


def test_t5_embeddings_equal_diffusers_cosmos_t5(tiny_ckpt):
    from diffusers import CosmosTextToWorldPipeline

    encoder = load_text_encoder(inspect_checkpoint(tiny_ckpt), CPU, FP32)
    ours = encoder.encode(PROMPT)
    fake_pipe = SimpleNamespace(tokenizer=encoder.tokenizer, text_encoder=encoder.model, _execution_device=CPU)
    with torch.no_grad():  # as inside the pipeline's __call__
        ref = CosmosTextToWorldPipeline._get_t5_prompt_embeds(fake_pipe, PROMPT, max_sequence_length=512, device=CPU, dtype=FP32)
    assert ours.shape == ref.shape == (1, 512, 32)
    assert torch.equal(ours, ref)
    length = len(PROMPT) + 1  # character tokenizer + </s>
    assert ours[0, length:].abs().sum() == 0 and ours[0, :length].abs().sum() > 0


def test_reason_embeddings_equal_diffusers_cosmos25(tiny_reason_ckpt):
    from diffusers import Cosmos2_5_TransferPipeline

    info = inspect_checkpoint(tiny_reason_ckpt)
    assert info.text_encoder_type == "qwen2_5_vl"
    encoder = load_text_encoder(info, CPU, FP32)
    ours = encoder.encode(PROMPT)
    fake_pipe = SimpleNamespace(tokenizer=encoder.tokenizer, text_encoder=encoder.model, _execution_device=CPU)
    with torch.no_grad():  # as inside the pipeline's __call__
        ref = Cosmos2_5_TransferPipeline._get_prompt_embeds(fake_pipe, PROMPT, max_sequence_length=512, device=CPU, dtype=FP32)
    assert ours.shape == ref.shape == (1, 512, 64)  # 2 layers x 32 hidden, concatenated
    assert torch.equal(ours, ref)


def test_tiny_checkpoint_is_deterministic(tmp_path):
    a = write_checkpoint(preset("tiny"), tmp_path / "a")
    b = write_checkpoint(preset("tiny"), tmp_path / "b")
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert len(files) == 3 + 5 + 5  # text encoder, transformer, vae, five controlnets, five preprocessor models
    for rel in files:
        assert hashlib.sha256((a / rel).read_bytes()).digest() == hashlib.sha256((b / rel).read_bytes()).digest(), rel


def _copy(ckpt, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(ckpt, dst)
    return dst


@pytest.mark.parametrize("component", ["transformer", "vae", "scheduler", "text_encoder", "tokenizer", "controlnet"])
def test_missing_component_is_named(tiny_ckpt, tmp_path, component):
    ckpt = _copy(tiny_ckpt, tmp_path)
    shutil.rmtree(ckpt / component)
    with pytest.raises(TransferError, match=f"missing the {component}/ component"):
        inspect_checkpoint(ckpt)


def test_inconsistent_components_are_named(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path)
    cfg_path = ckpt / "controlnet" / "depth" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_channels"] = 64
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(TransferError, match=r"controlnet/depth/ has 64 channels, transformer/ has 32"):
        inspect_checkpoint(ckpt)


def test_wrong_class_and_corrupt_weights_are_named(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path)
    cfg_path = ckpt / "vae" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "_class_name": "AutoencoderKL"}))
    with pytest.raises(TransferError, match=r"vae/ holds 'AutoencoderKL', expected AutoencoderKLWan"):
        inspect_checkpoint(ckpt)
    cfg_path.write_text(json.dumps(cfg))
    (ckpt / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(TransferError, match=r"cannot load checkpoint component transformer/"):
        load_dit(inspect_checkpoint(ckpt), ["edge"], CPU, FP32)
