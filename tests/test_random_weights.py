"""``--random_weights``: a configs-only preset's models built with random weights on each rank's device, through the
same loaders and pipeline as real weights; outputs marked; every placement gives the same bytes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from configs.models import preset
from tests.conftest import failure, run_cli, short_edge_spec
from tests.test_distributed import launch
from transfer.checkpoint import info_from_preset, load_text_encoder, random_model

SMALL = ["--random_weights", "--checkpoint_preset", "transfer2.5-2b-small", "--num_steps", "2",
         "--num_frames_per_chunk", "9", "--save_raw"]


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return short_edge_spec(tmp_path_factory.mktemp("random_weights"), 9, "a robot arm")


def test_one_and_four_processes_give_the_same_random_weight_outputs(spec, tmp_path):
    """The reduced Transfer2.5-2B layout (Qwen2.5-VL full-concat text, cross-attn projection, 130-channel
    ControlNet, Wan VAE), every stage, built with random weights in each process that holds it."""
    outs = {}
    for nproc in (1, 4):
        outs[nproc] = tmp_path / str(nproc)
        proc = launch(nproc, "--controlnet_specs", str(spec), "--video_save_folder", str(outs[nproc]), *SMALL)
        assert proc.returncode == 0, failure(proc)
        assert "--random_weights: every output of this run is made with random transfer2.5-2b-small weights" in proc.stderr
    one, four = np.load(outs[1] / "output.npz"), np.load(outs[4] / "output.npz")
    assert np.array_equal(one["frames"], four["frames"]) and np.array_equal(one["latents"], four["latents"])
    assert not np.isnan(one["latents"]).any() and one["frames"].std() > 1
    assert (outs[1] / "output.mp4").read_bytes() == (outs[4] / "output.mp4").read_bytes()
    settings = json.loads((outs[4] / "manifest.json").read_text())["requests"]["output"]["settings"]
    assert settings["random_weights"] == "transfer2.5-2b-small" and settings["checkpoint"] is None


def test_random_model_is_built_in_the_run_dtype_with_ties_and_fp32_modules_kept():
    info = info_from_preset(preset("tiny"))
    text = load_text_encoder(info, torch.device("cpu"), torch.bfloat16).model
    assert text.encoder.embed_tokens.weight is text.shared.weight  # T5's tied embedding stays tied
    dtypes = {name: p.dtype for name, p in text.named_parameters()}
    assert {d for n, d in dtypes.items() if ".wo." in n} == {torch.float32}  # T5's _keep_in_fp32_modules
    assert {d for n, d in dtypes.items() if ".wo." not in n} == {torch.bfloat16}
    assert not any(p.is_meta for p in text.parameters())
    from diffusers import AutoencoderKLWan

    def build(seed):
        return random_model(lambda: AutoencoderKLWan(**info.vae), torch.device("cpu"), torch.float32, seed)

    a, b, c = build(2), build(2), build(3)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name  # the same seed, the same weights
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_random_weights_refuses_a_checkpoint_dir(tiny_ckpt, spec, tmp_path):
    proc = run_cli("--controlnet_specs", str(spec), "--random_weights", "--checkpoint_dir", str(tiny_ckpt),
                   "--video_save_folder", str(tmp_path / "out"))
    assert proc.returncode == 2 and "drop --checkpoint_dir" in proc.stderr
    assert not (tmp_path / "out").exists()
