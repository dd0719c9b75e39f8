"""Cosmos 3 (issue 33): the embedded ``cosmos3-tiny`` checkpoint in diffusers' layout, diffusers' own
``Cosmos3OmniModularPipeline`` running transfer on it from that folder, the stage boundaries, the folder checks
(tests/test_cosmos3_runs.py: through transfer.py)."""

from __future__ import annotations

import numpy as np
import torch

from configs.cosmos3 import COSMOS3_PRESETS, HINTS


def test_presets_describe_nano_and_a_tiny_model():
    from diffusers import Cosmos3OmniTransformer

    nano, tiny = COSMOS3_PRESETS["cosmos3-nano"](), COSMOS3_PRESETS["cosmos3-tiny"]()
    assert not nano.embedded and tiny.embedded and tiny.hints == HINTS == ("edge", "blur", "depth", "seg", "wsm")
    t = nano.transformer
    assert (t["num_hidden_layers"], t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"],
            t["head_dim"]) == (36, 4096, 32, 8, 128)
    with torch.device("meta"):
        params = sum(p.numel() for p in Cosmos3OmniTransformer(**t).parameters())
    assert 15.0e9 < params < 15.5e9, params  # Nano: 16B with its 15.2B transformer
    assert nano.vae["z_dim"] == tiny.vae["z_dim"] == 48 and nano.vae["scale_factor_spatial"] == 16


def test_diffusers_transfer_runs_on_the_embedded_tiny_folder(cache_dir):
    """Two hints, two chunks, text CFG and control guidance: 3 transformer passes per step."""
    from PIL import Image

    from transfer.embedded_checkpoint import ensure_tiny_checkpoint
    from transfer.reference import cosmos3_reference_pipeline

    ckpt = ensure_tiny_checkpoint("cosmos3-tiny")
    assert {p.name for p in ckpt.iterdir()} >= {"transformer", "vae", "scheduler", "text_tokenizer"}
    pipe = cosmos3_reference_pipeline(ckpt)
    calls = []
    forward = pipe.transformer.forward
    pipe.transformer.forward = lambda *a, **k: (calls.append(k["sequence_length"]), forward(*a, **k))[1]
    rng = np.random.default_rng(0)
    video = [[Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(9)] for _ in range(2)]
    torch.set_num_threads(1)
    out = pipe(prompt='{"scene": "a ball"}', negative_prompt="blurry", control_videos={"edge": video[0],
               "depth": video[1]}, height=32, width=32, num_frames=9, num_video_frames_per_chunk=5,
               num_conditional_frames=1, num_inference_steps=2, guidance_scale=3.0, control_guidance=1.5,
               generator=torch.Generator().manual_seed(0), output_type="pt", output=["videos", "num_chunks"])
    assert out["num_chunks"] == 2 and len(calls) == 2 * 2 * 3  # chunks x steps x passes
    videos = out["videos"]
    assert tuple(videos.shape) == (9, 3, 32, 32) and torch.isfinite(videos).all()
    cond_full, cond_no_control, uncond_full = calls[:3]  # the hints' tokens only in the full passes
    assert cond_full > cond_no_control and cond_full != uncond_full


def test_stages_on_separate_states_equal_the_pipeline(cache_dir):
    """The stage boundaries (``transfer.families.cosmos3.blocks``) are complete: text, VAE and DiT each on its own state, only
    the listed fields passed, give diffusers' pipeline's video bit for bit (two hints, two chunks, CFG, control
    guidance and a guidance interval)."""
    from PIL import Image

    from transfer.families.cosmos3.blocks import run_staged
    from transfer.embedded_checkpoint import ensure_tiny_checkpoint
    from transfer.reference import cosmos3_reference_pipeline

    pipe = cosmos3_reference_pipeline(ensure_tiny_checkpoint("cosmos3-tiny"))
    rng = np.random.default_rng(1)
    video = [[Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)) for _ in range(9)] for _ in range(2)]
    torch.set_num_threads(1)

    def inputs():
        return dict(prompt='{"scene": "a box"}', negative_prompt="dark", control_videos={"edge": video[0],
                    "seg": video[1]}, height=32, width=48, num_frames=9, num_video_frames_per_chunk=5,
                    num_conditional_frames=1, num_inference_steps=3, guidance_scale=3.0, control_guidance=1.5,
                    guidance_interval=(0.0, 900.0), generator=torch.Generator().manual_seed(3), output_type="pt")

    reference = pipe(**inputs(), output="videos")
    staged, latents = run_staged(pipe, **inputs())
    assert len(latents) == 2 and latents[0].shape[1] == 48
    assert staged.shape == reference.shape == (9, 3, 32, 48) and torch.equal(staged, reference)


def test_a_cosmos3_folder_given_to_the_transfer25_reader_is_one_line(cache_dir):
    """Transfer2.5's folder reader (the A/B reference's) refuses a Cosmos 3 folder by name, not by a missing part;
    transfer.py recognises it first (``transfer.families.family_of``)."""
    import pytest

    from transfer.checkpoint import inspect_checkpoint
    from transfer.embedded_checkpoint import ensure_tiny_checkpoint
    from transfer.errors import TransferError

    with pytest.raises(TransferError, match="is a Cosmos 3 checkpoint .*Cosmos3OmniTransformer"):
        inspect_checkpoint(ensure_tiny_checkpoint("cosmos3-tiny"))


def test_cosmos3_folder_is_recognised_and_checked(cache_dir, tmp_path):
    """``inspect_cosmos3``: the embedded folder passes; a broken copy fails naming the part."""
    import json
    import shutil

    import pytest

    from transfer.families.cosmos3.checkpoint import inspect_cosmos3, is_cosmos3
    from transfer.embedded_checkpoint import ensure_tiny_checkpoint
    from transfer.errors import TransferError

    ckpt = ensure_tiny_checkpoint("cosmos3-tiny")
    info = inspect_cosmos3(ckpt)
    assert is_cosmos3(ckpt) and not is_cosmos3(ensure_tiny_checkpoint("tiny"))
    assert info.transformer["num_hidden_layers"] == 2 and info.vae["z_dim"] == 48
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    vae = json.loads((bad / "vae" / "config.json").read_text())
    (bad / "vae" / "config.json").write_text(json.dumps({**vae, "z_dim": 16}))
    with pytest.raises(TransferError, match="vae/ z_dim 16 does not fit transformer/ latent_channel 48"):
        inspect_cosmos3(bad)
    shutil.rmtree(bad / "text_tokenizer")
    (bad / "vae" / "config.json").write_text(json.dumps(vae))
    with pytest.raises(TransferError, match="missing the text_tokenizer/ component"):
        inspect_cosmos3(bad)
