"""Sequence-parallel DiT groups (cfg x sp) under torchrun with gloo: the single-process result, bit for bit.

Bit-equality holds here because Ulysses moves whole heads between ranks (attention of one head is the same
arithmetic on every rank) and the tiny models' row-wise GEMMs give the same bits for any number of rows on this CPU
(OMP_NUM_THREADS=1). A model-level run of the 4-head DiT over 4 ranks with other shapes showed differences up to
4e-7 (GEMM blocking on fewer rows): were that to reach these runs, the bound is 1e-5 on latents and 1 level on frames.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import ROOT, example_frames
from tests.test_distributed import ENV, FAST, launch
from transfer.video_io import write_mp4


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """9 frames (2 chunks of 5), 112 x 144 pixels: 2 x 7 x 9 = 126 tokens per chunk, which 4 ranks do not divide.
    The vis control's weight is a spatial map (transfer1's .pt: 1 on the left, 0.25 on the right), so every rank must
    cut the token weights exactly as diffusers cuts the residuals (``SequenceParallelDiT.shard_tokens``)."""
    import torch

    d = tmp_path_factory.mktemp("sp")
    for name in ("example_input.mp4", "example_edge.mp4", "example_vis.mp4"):
        frames = example_frames(name, 9)
        write_mp4(d / name, np.stack([cv2.resize(f, (144, 112)) for f in frames]), 24)
    weight_map = torch.full((112, 144), 0.25)
    weight_map[:, :72] = 1.0
    torch.save(weight_map, d / "vis_map.pt")
    (d / "spec.json").write_text(json.dumps({
        "prompt": "two controls, two chunks", "input_video_path": str(d / "example_input.mp4"),
        "edge": {"control_weight": 1.0, "input_control": str(d / "example_edge.mp4")},
        "vis": {"control_weight": str(d / "vis_map.pt"), "input_control": str(d / "example_vis.mp4")}}))
    return d


def run(nproc: int, spec: Path, out: Path, *args: str, env: dict | None = None):
    return launch(nproc, "--controlnet_specs", str(spec), "--video_save_folder", str(out), "--save_raw", "--seed", "5",
                  *FAST, *args, env=env)


def assert_same(ref: Path, got: Path) -> None:
    a, b = np.load(ref / "output.npz"), np.load(got / "output.npz")
    assert a["latents"].shape[0] == 2
    assert np.array_equal(a["frames"], b["frames"]) and np.array_equal(a["latents"], b["latents"]), (
        np.abs(a["latents"] - b["latents"]).max())


@pytest.fixture(scope="module")
def four_head(cache_dir):
    from transfer.embedded_checkpoint import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint("tiny-4head")


@pytest.mark.parametrize("mode", ["roundtrip", "latent"])
def test_sp4_uneven_tokens_equals_one_process(four_head, inputs, tmp_path, mode):
    """--context-parallel-size 4 (upstream's spelling) on 4 ranks: one cfg 1 x sp 4 group, every forward of the DiT and
    both ControlNets split 32/32/31/31 tokens; both chunk-conditioning modes."""
    args = ["--checkpoint_preset", "tiny-4head", "--chunk_conditioning", mode]
    ref = run(1, inputs / "spec.json", tmp_path / "one", *args)
    assert ref.returncode == 0, ref.stderr[-3000:]
    proc = run(4, inputs / "spec.json", tmp_path / "four", *args, "--context-parallel-size", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DiT groups [0, 1, 2, 3] (cfg 1 x sp 4)" in proc.stderr
    assert_same(tmp_path / "one", tmp_path / "four")


def test_stock_attention_processor_fails_at_start(tiny_ckpt, inputs, tmp_path):
    """A self-attention module left with diffusers' stock processor (it attends within its own shard: a plausible,
    wrong video) stops the run before any step, with one line naming the module; nothing is written."""
    env = {"TRANSFER_TEST_FAULT": "2:stock_processor",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "faults"), str(ROOT)])}
    proc = run(4, inputs / "spec.json", tmp_path / "out", "--context_parallel_size", "2", env=env)
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.splitlines() if x.startswith("transfer.py: error: sequence parallel (sp 2)")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "uses CosmosAttnProcessor2_0, which does not attend across the sequence shards" in lines[0]
    assert "step 0" not in proc.stderr and not (tmp_path / "out" / "output.mp4").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_of_three_equal_one_process(tiny_ckpt, inputs, tmp_path):
    """torchrun --nnodes 2 --nproc_per_node 3 on 127.0.0.1, ``--context_parallel_size 2``: the preset keeps each sequence-parallel branch inside a
    node (ranks 1-2 and 3-4) and puts the CFG branches across the nodes; coordinator + text on rank 0, the VAE on 5."""
    ref = run(1, inputs / "spec.json", tmp_path / "one")
    assert ref.returncode == 0, ref.stderr[-3000:]
    port = str(_free_port())
    env = {**os.environ, **ENV}
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "3", "--master_addr", "127.0.0.1", "--master_port", port,
               str(ROOT / "transfer.py"), "--num_gpus", "6", "--controlnet_specs", str(inputs / "spec.json"),
               "--video_save_folder", str(tmp_path / "two"), "--save_raw", "--seed", "5", "--context_parallel_size", "2",
               *FAST]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    assert "DiT groups [1, 2, 3, 4] (cfg 2 x sp 2)" in outs[0]
    assert_same(tmp_path / "one", tmp_path / "two")


def test_a_plan_missing_a_per_token_input_fails_loudly():
    """The plan splits every input a block receives per token; without one of them (the timestep embeddings, the
    ControlNet's base latents, the RoPE tables) the forward raises instead of giving a plausible wrong velocity."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           str(ROOT / "tests" / "helpers" / "sp_plan_probe.py")]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **ENV, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = dict(line.split(" ", 1) for line in proc.stdout.splitlines()
                   if line.split(" ", 1)[0] in ("none", "temb", "latents", "rope"))
    assert results.pop("none") == "OK 0.0"
    assert sorted(results) == ["latents", "rope", "temb"] and all(r.startswith("ERROR") for r in results.values()), results
    assert "RoPE covers 12 tokens but this shard holds 6" in results["rope"]
