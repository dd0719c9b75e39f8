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
    train(tmp_path / "a", "dit", 1, "--keep_every", "1", batch=2)  # on the trained VAE (latent statistics first)
    log = (tmp_path / "a" / "dit" / "log.jsonl").read_text().splitlines()
    assert len(log) == 1 and json.loads(log[0])["loss"] > 0
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
