"""scripts/train_demo.py: each stage runs a few steps, and a stopped-then-resumed training equals an uninterrupted one."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "train_demo.py"


def train(work, stage: str, steps: int, *more: str, batch: int = 1):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--work", str(work), "--stage", stage, "--steps", str(steps),
                           "--batch", str(batch), "--save_every", "1", "--threads", "1", *more],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_vae_resume_equals_uninterrupted_and_dit_stage_runs_and_exports(tmp_path, cache_dir):
    train(tmp_path / "a", "vae", 3)
    train(tmp_path / "b", "vae", 3, "--stop_at", "2")  # interrupted after step 2 (the lr schedule is the 3-step one)
    train(tmp_path / "b", "vae", 3)  # resumed from its step-2 checkpoint
    a, b = (torch.load(tmp_path / w / "vae" / "state.pt", weights_only=False) for w in ("a", "b"))
    assert a["step"] == b["step"] == 3
    assert all(torch.equal(a["models"]["vae"][k], b["models"]["vae"][k]) for k in a["models"]["vae"])
    logs = [json.loads(x) for x in (tmp_path / "b" / "vae" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3]
    # on the trained VAE (latent statistics first): one per-frame step, then one clip step, shapes weighted
    train(tmp_path / "a", "dit", 2, "--keep_every", "1", "--image_steps", "1", "--image_batch", "3",
          "--shape_weight", "3", batch=2)
    log = (tmp_path / "a" / "dit" / "log.jsonl").read_text().splitlines()
    assert len(log) == 2 and all(json.loads(line)["loss"] > 0 for line in log)
    train(tmp_path / "a", "dit", 1, "--dit_name", "ft", "--init", "dit")  # a fine-tune: a second run from those
    ft = torch.load(tmp_path / "a" / "ft" / "state.pt", weights_only=False)
    before = torch.load(tmp_path / "a" / "dit" / "state.pt", weights_only=False)
    moved = (ft["models"]["controlnet"]["patch_embed.proj.weight"]
             - before["models"]["controlnet"]["patch_embed.proj.weight"]).abs().max()
    assert ft["step"] == 1 and 0 < moved < 1e-2  # one AdamW step (lr 3e-4) from the first run's weights
    stats = json.loads((tmp_path / "a" / "vae" / "latent_stats.json").read_text())
    assert len(stats["mean"]) == 16

    proc = subprocess.run([sys.executable, str(SCRIPT), "--work", str(tmp_path / "a"), "--stage", "export",
                           "--snapshot", "1", "--out", str(tmp_path / "ckpt")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import AutoTokenizer

    from transfer.checkpoint import inspect_checkpoint

    info = inspect_checkpoint(tmp_path / "ckpt")  # the product's checks: every part present and consistent
    assert info.modalities == ("edge",) and info.vae["latents_mean"] == stats["mean"]
    assert json.loads((tmp_path / "ckpt" / "training.json").read_text())["dit"]["steps"] == 1
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ckpt" / "tokenizer")  # one token per word of the world
    ids = tokenizer("A red circle, a blue square on a gray background")["input_ids"]
    assert len(ids) == 12 and ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer("a purple circle")["input_ids"][1] == tokenizer.unk_token_id


def test_latent_coverage_follows_the_causal_vae_grouping():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_demo", SCRIPT)
    train_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_demo)
    shapes = torch.zeros(1, 9, 16, 16, dtype=torch.bool)
    shapes[0, 0, :4, :4] = True  # frame 0: latent frame 0, cell (0, 0) fully covered
    shapes[0, 3, 4:6, 4:8] = True  # frame 3: latent frame 2 (frames 3 and 4), cell (1, 1) half covered
    cover = train_demo.latent_coverage(shapes, temporal=2, spatial=4)
    assert cover.shape == (1, 1, 5, 4, 4)
    assert cover[0, 0, 0, 0, 0] == 1.0 and cover[0, 0, 2, 1, 1] == 0.5
    assert float(cover.sum()) == 1.5  # nothing anywhere else


def test_patch_one_on_the_shipped_vae_trains_and_exports(tmp_path, cache_dir):
    """``--stage vae_from`` takes the shipped checkpoint's VAE (no VAE training); ``--patch 1`` is kept with the stage
    (a resume with another patch is refused) and written into the exported transformer's config."""
    from configs.models import DEMO_CHECKPOINT
    from transfer.checkpoint import inspect_checkpoint

    proc = subprocess.run([sys.executable, str(SCRIPT), "--work", str(tmp_path), "--stage", "vae_from"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shipped = json.loads((DEMO_CHECKPOINT / "vae" / "config.json").read_text())
    assert json.loads((tmp_path / "vae" / "latent_stats.json").read_text())["mean"] == shipped["latents_mean"]
    train(tmp_path, "dit", 1, "--patch", "1")
    refused = subprocess.run([sys.executable, str(SCRIPT), "--work", str(tmp_path), "--stage", "dit", "--steps", "2",
                              "--patch", "2"], capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "was started with --patch 1, not 2" in refused.stderr
    proc = subprocess.run([sys.executable, str(SCRIPT), "--work", str(tmp_path), "--stage", "export",
                           "--out", str(tmp_path / "ckpt")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = inspect_checkpoint(tmp_path / "ckpt")
    assert list(info.transformer["patch_size"]) == [1, 1, 1]


def test_corpus_stage_feeds_the_dit_stage_and_a_resumed_corpus_run_equals_an_uninterrupted_one(tmp_path):
    """Issue 40's loop: clips encoded once (``--stage corpus``: the shipped VAE's latents of video and edge control,
    float16, with coverage and prompts), then DiT steps drawn from them, fine-tuning the shipped model
    (``--init_from``); a run stopped after step 1 and resumed equals the uninterrupted one."""
    for work in ("a", "b"):
        proc = subprocess.run([sys.executable, str(SCRIPT), "--work", str(tmp_path / work), "--stage", "vae_from"],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    train(tmp_path / "a", "corpus", 0, "--clips", "4", "--shard", "2")
    shards = sorted((tmp_path / "a" / "corpus").glob("shard_*.pt"))
    assert [p.name for p in shards] == ["shard_0000.pt", "shard_0001.pt"]
    shard = torch.load(shards[1], weights_only=False)
    assert shard["z0"].shape == shard["zc"].shape == (2, 16, 5, 16, 16) and shard["z0"].dtype == torch.float16
    assert shard["cover"].dtype == torch.uint8 and shard["cover"].shape == (2, 1, 5, 16, 16)
    assert len(shard["prompts"]) == 2 and all(p.endswith("background") for p in shard["prompts"])
    (tmp_path / "b" / "corpus").symlink_to(tmp_path / "a" / "corpus")
    more = ("--corpus", "--init_from", str(ROOT / "demo" / "checkpoint"), "--shape_weight", "1")
    train(tmp_path / "a", "dit", 2, *more, batch=3)
    train(tmp_path / "b", "dit", 2, "--stop_at", "1", *more, batch=3)
    train(tmp_path / "b", "dit", 2, *more, batch=3)
    a, b = (torch.load(tmp_path / w / "dit" / "state.pt", weights_only=False) for w in ("a", "b"))
    assert a["step"] == b["step"] == 2
    for part in ("transformer", "controlnet", "text_encoder"):
        assert all(torch.equal(a["models"][part][k], b["models"][part][k]) for k in a["models"][part]), part
    from safetensors.torch import load_file

    shipped = load_file(ROOT / "demo" / "checkpoint" / "controlnet" / "edge" / "diffusion_pytorch_model.safetensors")
    moved = (a["models"]["controlnet"]["patch_embed.proj.weight"] - shipped["patch_embed.proj.weight"]).abs().max()
    assert 0 < moved < 1e-2  # two AdamW steps from the shipped weights, not from random ones
    record = json.loads((tmp_path / "a" / "dit" / "model.json").read_text())
    assert record["patch"] == 2 and record["init_from"]["path"] == "demo/checkpoint"
    assert record["init_from"]["training"] == json.loads((ROOT / "demo" / "checkpoint" / "training.json").read_text())


def test_batched_prompt_encoding_equals_the_products_text_encoder():
    """Training encodes a batch's prompts in one T5 call over the longest prompt's tokens; the product pads each to
    512 and zeroes past it: the same embeddings (within float rounding)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_demo
    from transformers import T5EncoderModel

    from transfer.families.transfer25.text_encoding import TextEncoder

    model, tokenizer = T5EncoderModel.from_pretrained(ROOT / "demo" / "checkpoint" / "text_encoder"), \
        train_demo.demo_tokenizer()
    prompts = ["a black circle and a yellow square on a blue background", "a red triangle on a gray background"]
    product = TextEncoder(model, tokenizer, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        batched = train_demo.encode_prompts(model, tokenizer, prompts, "cpu")
        one_by_one = torch.cat([product._encode_t5(p) for p in prompts])
    assert batched.shape == one_by_one.shape == (2, 512, 64)
    assert (batched - one_by_one).abs().max() < 1e-5 and batched[1, 10:].abs().max() == 0


def test_the_padding_as_one_weighted_token_equals_the_512_token_context():
    """Training's cross-attention over the longest prompt's tokens plus one zero key weighted for the padding
    (``PaddingAsOneToken``) and one image-context token gives the DiT's output over the product's context (512 text
    tokens, 256 zero image tokens), within float rounding; without the weight it does not."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_demo
    from diffusers import CosmosTransformer3DModel
    from transformers import T5EncoderModel

    from transfer.specs import DEFAULT_NEGATIVE_PROMPT

    checkpoint = ROOT / "demo" / "checkpoint"
    dit = CosmosTransformer3DModel.from_pretrained(checkpoint / "transformer")
    t5, tokenizer = T5EncoderModel.from_pretrained(checkpoint / "text_encoder"), train_demo.demo_tokenizer()
    prompts = ["a red circle on a blue background", DEFAULT_NEGATIVE_PROMPT]
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 5, 16, 16, generator=g), torch.rand(2, 1, 5, 1, 1, generator=g)
    kwargs = dict(hidden_states=x, timestep=t, condition_mask=torch.zeros(2, 1, 5, 16, 16),
                  padding_mask=torch.zeros(1, 1, 64, 64), return_dict=False)
    image = torch.zeros(2, dit.config.img_context_num_tokens, dit.config.img_context_dim_in)
    with torch.no_grad():
        full = dit(encoder_hidden_states=(train_demo.encode_prompts(t5, tokenizer, prompts, "cpu"), image), **kwargs)[0]
        processors = []
        for block in dit.transformer_blocks:
            block.attn2.set_processor(train_demo.PaddingAsOneToken(block.attn2.processor))
            processors.append(block.attn2.processor)
        embeds = train_demo.encode_prompts(t5, tokenizer, prompts, "cpu", pad=False)
        context = train_demo.short_context(embeds, processors)
        short = dit(encoder_hidden_states=(context, image[:, :1]), **kwargs)[0]
        for p in processors:
            p.mask = torch.zeros_like(p.mask)  # the zero key unweighted: the padding's mass is lost
        unweighted = dit(encoder_hidden_states=(context, image[:, :1]), **kwargs)[0]
    assert context.shape[1] == embeds.shape[1] + 1 < 120
    assert (full - short).abs().max() < 1e-5 < (full - unweighted).abs().max()
