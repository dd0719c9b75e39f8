"""Cosmos 3 through transfer.py (issue 33): one process equal to diffusers' modular pipeline, stage processes equal to
one process (a DiT group dealing passes, and splitting them over sp ranks), the parallel pieces, and the spec's
refusals."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, example_frames
from transfer.errors import TransferError
from transfer.video_io import write_mp4

ENV = {"OMP_NUM_THREADS": "1", "TRANSFER_LOG_LEVEL": "INFO"}


@pytest.fixture(scope="module")
def spec(tmp_path_factory, cache_dir):
    """Two hints (edge given, blur computed from the input), 17 frames in chunks of 9 (three chunks: 2 conditional
    frames), text guidance with an interval, control guidance: all three passes on most steps."""
    d = tmp_path_factory.mktemp("cosmos3")
    write_mp4(d / "input.mp4", example_frames("example_input.mp4", 17), 24)
    write_mp4(d / "edge.mp4", example_frames("example_edge.mp4", 17), 24)
    sample = {"name": "c3", "prompt": "A yellow ball rolls across a studio floor.", "video_path": "input.mp4",
              "resolution": "32", "num_video_frames_per_chunk": 9, "num_conditional_frames": 2, "num_steps": 3,
              "guidance": 3, "edge": {"control_path": "edge.mp4"}, "blur": {}, "control_guidance": 1.5,
              "guidance_interval": [0, 900], "seed": 7}
    (d / "spec.json").write_text(json.dumps(sample))
    return d


def run(nproc: int, spec_dir, out, *args):
    cmd = [sys.executable, str(ROOT / "transfer.py")] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), str(ROOT / "transfer.py")]
    cmd += ["--checkpoint_preset", "cosmos3-tiny", "-i", str(spec_dir / "spec.json"), "--output_dir", str(out),
            "--disable_guardrail", "--save_raw", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def test_single_process_equals_diffusers_modular_pipeline(spec, tmp_path):
    """transfer.py's one-process path (``Cosmos3Pipeline``: the request prepared as for Transfer2.5, diffusers' blocks
    run stage by stage) gives diffusers' ``Cosmos3OmniModularPipeline`` output bit for bit on the same inputs."""
    from transfer.cli import parse_config
    from transfer.families.cosmos3.pipeline import Cosmos3Pipeline, load_cosmos3, pipeline_inputs, to_frames
    from transfer.job import plan_job

    torch.set_num_threads(1)
    sample = {**json.loads((spec / "spec.json").read_text()), "keep_input_resolution": False}
    (tmp_path / "spec.json").write_text(json.dumps({**sample, "video_path": str(spec / "input.mp4"),
                                                    "edge": {"control_path": str(spec / "edge.mp4")}}))
    job = plan_job(parse_config(["--checkpoint_preset", "cosmos3-tiny", "-i", str(tmp_path / "spec.json"),
                                 "--output_dir", str(tmp_path / "out")]))
    prepared = job.prepare(job.requests[0])
    assert set(prepared.controls) == {"edge", "vis"}
    pipe = load_cosmos3(job.info)
    ours = Cosmos3Pipeline(pipe, job.settings, 24.0).generate(prepared, progress=False)
    calls = []
    forward = pipe.transformer.forward
    pipe.transformer.forward = lambda *a, **k: (calls.append(k["sequence_length"]), forward(*a, **k))[1]
    theirs = pipe(**pipeline_inputs(prepared, job.requests[0].settings, 24.0), output="videos")
    assert len(set(calls)) == 3  # cond, cond without hints, uncond: all three passes ran
    assert ours.frames.shape == (17, 32, 48, 3) and np.array_equal(ours.frames, to_frames(theirs))
    assert ours.latents.shape[:2] == (3, 48) and torch.isfinite(ours.latents).all()


def test_stage_processes_equal_one_process(spec, tmp_path):
    """4 processes, a DiT group of 2 pass branches x sp 2 over every rank (rank 0 also tokenizes), and a VAE group of
    ranks 0 and 1 (``--vae_parallel_degree 2``: each encode and decode split by rows, one latent row each): the latents
    within 1e-5 of one process, no NaN. 4 processes dealing 3 passes over ranks 1-3 (a
    ``--placement`` file; rank 0 encodes the next chunk's hints meanwhile): bit for bit (the same files)."""
    run(1, spec, tmp_path / "one")
    one = np.load(tmp_path / "one" / "c3.npz")
    log = run(4, spec, tmp_path / "sp", "--cp-size", "2", "--vae_parallel_degree", "2")
    assert "DiT group on ranks 0,1,2,3 (rank 0 shares its device): 2 pass branch(es) x sp 2; VAE group [0, 1]" in log
    sp = np.load(tmp_path / "sp" / "c3.npz")
    assert sp["latents"].shape == one["latents"].shape == (3, 48, 3, 2, 3)
    assert np.isfinite(sp["latents"]).all() and np.abs(sp["latents"] - one["latents"]).max() < 1e-5
    assert np.abs(sp["frames"].astype(int) - one["frames"].astype(int)).max() <= 1  # uint8, truncated
    placement = tmp_path / "placement.json"  # 3 pass branches on ranks 3, 1, 2 (rank 3 leads: its latents go back)
    placement.write_text(json.dumps({"coordinator": 0, "vae": 0, "dit_groups": [{"ranks": [3, 1, 2], "cfg": 3}]}))
    assert "DiT group on ranks 3,1,2: 3 pass branch(es) x sp 1" in run(4, spec, tmp_path / "passes", "--placement",
                                                                        str(placement))
    for name in ("c3.npz", "c3.mp4"):
        assert (tmp_path / "passes" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


def test_pass_deal_and_layouts(tmp_path):
    from transfer.families.cosmos3.parallel import deal_passes
    from transfer.families.cosmos3.ranks import cosmos3_layout, cosmos3_layout_file

    passes = [("cond", 300), ("cond_no_control", 100), ("uncond", 290)]
    assert deal_passes(passes, 2) == {"cond": 0, "uncond": 1, "cond_no_control": 1}
    assert deal_passes(passes, 3) == {"cond": 0, "uncond": 1, "cond_no_control": 2}
    assert deal_passes([("cond", 300)], 2) == {"cond": 0}  # an interval switched the others off: branch 1 idles
    def shape(world, sp=None, passes=None):
        layout = cosmos3_layout(world, sp, passes, 32)
        return layout.dit_ranks[0], layout.passes, layout.sp

    assert cosmos3_layout(1, None, None, 32).dit_ranks == (0,)
    layout = cosmos3_layout(4, None, None, 32)  # every rank, 2 pass branches x sp 2
    assert (layout.dit_ranks, layout.passes, layout.branches()) == ((0, 1, 2, 3), 2, [(0, 1), (2, 3)])
    assert shape(4, passes=3) == (1, 3, 1)  # 3 branches beside rank 0
    assert [shape(w) for w in (2, 3, 5, 6, 7, 8, 9)] == [(0, 2, 1), (0, 3, 1), (1, 2, 2), (0, 3, 2), (1, 3, 2),
                                                         (0, 2, 4), (1, 2, 4)]  # sp dividing the 32 heads first
    assert shape(9, 4, 2) == (1, 2, 4) and shape(11) == (0, 1, 11)  # 11 ranks: no even split, heads padded
    assert layout.with_vae(None, True, 45).vae_ranks == (0, 1, 2, 3)  # GPUs: every rank, between denoising
    assert layout.with_vae(None, True, 2).vae_ranks == (0, 1)  # one latent row each at most
    assert layout.with_vae(None, False, 45).vae_ranks == (0,) and layout.with_vae(3, False, 45).vae_ranks == (0, 1, 2)
    with pytest.raises(TransferError, match="--vae_parallel_degree 3: the smallest request has 2 latent rows"):
        layout.with_vae(3, False, 2)
    path = tmp_path / "placement.json"
    path.write_text(json.dumps({"vae": [0, 2], "dit_groups": [{"ranks": [1, 2, 3], "cfg": 3}]}))
    assert cosmos3_layout_file(path, 4).vae_ranks == (0, 2)
    for data, match in (({"vae": 1}, "vae must be rank 0 or a VAE group led by rank 0"),
                        ({"vae": [1, 0]}, "led by rank 0"), ({"dit_groups": [[1], [2]]}, "one DiT group"),
                        ({"dit_groups": [{"ranks": [1, 2], "cfg": 2}]}, "rank 3 has no stage"),
                        ({"dit_groups": [{"ranks": [1, 2, 3, 0], "cfg": 4}]}, "cfg \\(1 to 3 pass branches\\)"),
                        ({"preprocess": 1}, "\\(Cosmos 3\\): unknown key 'preprocess' \\(coordinator, text, vae")):
        path = tmp_path / "placement.json"
        path.write_text(json.dumps(data))
        with pytest.raises(TransferError, match=match):
            cosmos3_layout_file(path, 4)
    for world, sp, passes, match in ((4, 3, 2, "--cfgp-size 2 x --cp-size 3: with 4 processes"),
                                     (4, None, 4, "--cfgp-size must be 1 to 3"), (1, 2, None, "need as many")):
        with pytest.raises(TransferError, match=match):
            cosmos3_layout(world, sp, passes, 32)


def test_stock_processor_is_refused_under_sequence_parallel(cache_dir):
    from diffusers import Cosmos3OmniTransformer

    from transfer.families.cosmos3.parallel import check_processors
    from transfer.embedded_checkpoint import ensure_tiny_checkpoint

    transformer = Cosmos3OmniTransformer.from_pretrained(ensure_tiny_checkpoint("cosmos3-tiny") / "transformer")
    check_processors(transformer, 1)  # one rank: the stock processor is right
    with pytest.raises(TransferError, match=r"sp 2\): transformer\.layers\.0\..* uses Cosmos3AttnProcessor, which "
                                            "attends within one shard"):
        check_processors(transformer, 2)


@pytest.mark.parametrize("sample, flags, message", [
    ({"keypoint": {"control_path": "edge.mp4"}}, [], "control 'keypoint': Cosmos 3 has no such hint"),
    ({"edge": {"control_path": "edge.mp4", "control_weight": 0.5}}, [], "Cosmos 3 has no per-hint weight"),
    ({"wsm": {}}, [], "control 'wsm' has no control_path: no preprocessor"),
    ({"blur": {}, "vis": {}}, [], "'blur' and 'vis' are the same control"),
    ({"guidance_interval": [900, 100]}, [], "guidance_interval must be \\[low, high\\] timesteps"),
    ({"control_guidance": -1}, [], "control_guidance must be a number >= 0"),
    ({}, ["--chunk_conditioning", "latent"], "--chunk_conditioning roundtrip only"),
    ({"control_guidance": 2.0}, ["--checkpoint_preset", "tiny"], "'control_guidance' is Cosmos 3's: this checkpoint is "
                                                                 "Transfer2.5"),
    ({}, ["--checkpoint_preset", "tiny", "--cfgp-size", "2"], "--cfgp-size deals Cosmos 3's transformer passes"),
    # issue 41: Transfer2.5's runtime flags the Cosmos 3 path would ignore
    ({}, ["--compile", "torch"], "--compile torch is Transfer2.5's: the Cosmos 3 path does not apply it"),
    ({}, ["--offload_diffusion_transformer"], "--offload stages is Transfer2.5's"),
    ({}, ["--step_cache", "taylorseer"], "--step_cache taylorseer is Transfer2.5's"),
    ({}, ["--attention_backend", "native"], "--attention_backend native is Transfer2.5's"),
])
def test_spec_refusals(spec, tmp_path, sample, flags, message):
    """Each is one line and exit 2, nothing written."""
    base = json.loads((spec / "spec.json").read_text())
    base.pop("blur") if "vis" in sample else None
    (tmp_path / "spec.json").write_text(json.dumps({**base, **sample}))
    for name in ("input.mp4", "edge.mp4"):
        (tmp_path / name).symlink_to(spec / name)
    cmd = [sys.executable, str(ROOT / "transfer.py"), "--checkpoint_preset", "cosmos3-tiny", "-i",
           str(tmp_path / "spec.json"), "--output_dir", str(tmp_path / "out"), *flags]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("transfer.py: error:")]
    assert proc.returncode == 2 and len(lines) == 1 and re.search(message, lines[0]), proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_plan_for_cosmos3_nano(cache_dir):
    """``--plan`` for the 15.2B Cosmos3-Nano from its configs: the transformer's bf16 weights on every DiT rank, the
    VAE on every rank (the default VAE group on GPUs) with its activation peak falling with the group's degree, each
    pass's activations at the chunk's token counts (cond above cond_no_control), a DiT
    rank of sp 2 holding half of the largest pass, and the layouts for 1, 2, 4 and 8 GPUs against 80 and 141 GB."""
    cmd = [sys.executable, str(ROOT / "transfer.py"), "--plan", "--checkpoint_preset", "cosmos3-nano", "--num_gpus",
           "4", "--cp-size", "2", "--height", "480", "--width", "832", "--frames", "61", "--gpu_memory_gb", "80"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "2 pass branch(es) x sp 2" in out and "80 GB  141 GB" in out
    weights = float(re.search(r"transformer\s+([\d.]+) GB", out).group(1))
    assert 30.0 < weights < 31.0  # 15.2B parameters in bf16
    passes = {m[0]: float(m[1]) for m in re.findall(r"dit  pass (\w+)\s+([\d.]+) GB", out)}
    tokens = {m[0]: int(m[1].replace(",", "")) for m in re.findall(r"pass (\w+)\s+[\d.]+ GB  \(([\d,]+) tokens", out)}
    assert set(passes) == {"cond", "cond_no_control", "uncond"} and passes["cond"] > passes["cond_no_control"] > 0
    assert tokens["cond"] > tokens["cond_no_control"] * 2  # the two hints' tokens beside the target's
    vae = float(re.search(r"^\s+vae\s+([\d.]+) GB", out, re.M).group(1))
    degrees = {int(d): (float(e), float(d_)) for d, e, d_ in
               re.findall(r"^\s+(\d) ranks? +VAE encode ([\d.]+) GB, VAE decode ([\d.]+) GB", out, re.M)}
    assert sorted(degrees) == [1, 2, 4, 8] and re.search(r"^\s+4 ranks +VAE.*<- this placement$", out, re.M)
    assert all(degrees[a][i] > degrees[b][i] for a, b in ((1, 2), (2, 4), (4, 8)) for i in (0, 1)), degrees
    rank1 = re.search(r"^\s+1  vae\+dit\s+([\d.]+)\s+([\d.]+)", out, re.M)  # GPUs: every rank in the VAE group
    assert abs(float(rank1.group(1)) - weights - vae) < 0.015
    assert abs(float(rank1.group(2)) - max(passes["cond"] / 2, *degrees[4])) < 0.02
    assert re.search(r"^\s+8  8 rank\(s\): 2 x sp 4", out, re.M)


def test_expanded_kv_processor_equals_the_stock_one(cache_dir):
    """The processor a GPU uses (KV heads expanded, the causal mask explicit: flash kernels instead of GQA's math
    fallback) gives the stock processor's chunk latents within float rounding, two hints and all three passes."""
    from PIL import Image

    from transfer.families.cosmos3.attention import ExpandedCosmos3Processor, expand_kv_heads
    from transfer.families.cosmos3.pipeline import load_cosmos3_pipeline
    from transfer.families.cosmos3.blocks import run_staged
    from transfer.embedded_checkpoint import ensure_tiny_checkpoint

    torch.set_num_threads(1)
    rng = np.random.default_rng(2)
    video = [[Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)) for _ in range(9)] for _ in range(2)]
    results = []
    for expanded in (False, True):
        pipe = load_cosmos3_pipeline(ensure_tiny_checkpoint("cosmos3-tiny"))
        if expanded:
            expand_kv_heads(pipe.transformer)
            assert isinstance(pipe.transformer.layers[0].self_attn.processor, ExpandedCosmos3Processor)
        results.append(run_staged(pipe, prompt="a red ball", negative_prompt="dark", height=32, width=48,
                                  control_videos={"edge": video[0], "depth": video[1]}, num_frames=9,
                                  num_video_frames_per_chunk=5, num_inference_steps=2, guidance_scale=3.0,
                                  control_guidance=1.5, generator=torch.Generator().manual_seed(1), output_type="pt"))
    (_, stock), (_, ours) = results
    assert all(torch.isfinite(b).all() and (a - b).abs().max() < 1e-5 for a, b in zip(stock, ours))
