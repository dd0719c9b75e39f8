"""``--chunk_conditioning latent``: no VAE between chunks, deterministic, equal across placements; a VAE group of
several ranks (each call split by rows) equals one process in both conditioning modes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, example_frames, run_cli
from tests.test_distributed import launch
from transfer.checkpoint import inspect_checkpoint, load_dit, load_text_encoder, load_vae
from transfer.chunks import latent_condition
from transfer.config import GenerationSettings
from transfer.families.transfer25.pipeline import TransferPipeline
from transfer.prepare import ModelLimits, prepare_request
from transfer.specs import load_spec
from transfer.video_io import write_mp4

FAST = ["--num_steps", "2", "--num_frames_per_chunk", "5"]


@pytest.fixture(scope="module")
def long_spec(tmp_path_factory):
    """17 frames at 5 frames/chunk, 1 conditioning frame: 4 chunks, edge + vis."""
    d = tmp_path_factory.mktemp("long")
    for name in ("example_input.mp4", "example_edge.mp4", "example_vis.mp4"):
        write_mp4(d / name, example_frames(name, 17), 24)
    spec = {"prompt": "a long video", "input_video_path": "example_input.mp4",
            "edge": {"control_weight": 0.7, "input_control": "example_edge.mp4"},
            "vis": {"control_weight": 0.5, "input_control": "example_vis.mp4"}}
    (d / "spec.json").write_text(json.dumps(spec))
    return d / "spec.json"


def _pipeline(ckpt, mode: str, calls: list[str]) -> TransferPipeline:
    info = inspect_checkpoint(ckpt)
    cpu = torch.device("cpu")
    vae, dit = load_vae(info, cpu, torch.float32), load_dit(info, ["edge", "vis"], cpu, torch.float32)
    for obj, name in ((vae, "encode"), (vae, "decode"), (dit, "denoise")):  # record the order of stage calls
        real = getattr(obj, name)

        def recorded(*a, _real=real, _name=name, **kw):
            calls.append(_name if _name != "denoise" else ("denoise", a[1]))  # denoise(noise, cond_latents, ...)
            return _real(*a, **kw)

        setattr(obj, name, recorded)
    settings = GenerationSettings(num_steps=2, num_frames_per_chunk=5, num_conditional_frames=1, chunk_conditioning=mode)
    return TransferPipeline(load_text_encoder(info, cpu, torch.float32), vae, dit, ModelLimits.from_info(info), settings)


def test_latent_mode_has_no_vae_call_between_chunks(tiny_ckpt, long_spec):
    request = load_spec(long_spec, name="long", defaults={"seed": 7})
    results = {}
    for mode in ("latent", "roundtrip"):
        calls: list[str] = []
        pipe = _pipeline(tiny_ckpt, mode, calls)
        results[mode] = pipe.generate(prepare_request(request, pipe.limits), progress=False)
        conds = [c[1] for c in calls if isinstance(c, tuple)]
        calls = [c[0] if isinstance(c, tuple) else c for c in calls]
        first, last = calls.index("denoise"), len(calls) - 1 - calls[::-1].index("denoise")
        between = [c for c in calls[first:last] if c != "denoise"]
        if mode == "latent":
            assert calls.count("denoise") == 4 and between == []
            assert calls == ["encode"] * 8 + ["denoise"] * 4 + ["decode"] * 4  # 4 chunks x (edge, vis) encodes
            latent_conds = conds
        else:  # upstream: each chunk's controls, then decode + re-encode of its condition
            assert between.count("decode") == 3 and between.count("encode") == 3 * 2 + 3
    latent, roundtrip = results["latent"], results["roundtrip"]
    assert latent.frames.shape == roundtrip.frames.shape == (17, 96, 160, 3)
    assert torch.equal(latent.latents[0], roundtrip.latents[0])  # chunk 0 has no condition: same in both modes
    assert not torch.equal(latent.latents[1], roundtrip.latents[1])
    # chunk k + 1 is conditioned on chunk k's last final latent frame, exactly (C = 1 -> one latent frame)
    assert latent_conds[0] is None
    for k in (1, 2, 3):
        assert torch.equal(latent_conds[k][:, :, :1], latent.latents[k - 1][None, :, -1:])


def test_latent_condition_takes_the_last_frames():
    previous = torch.arange(2 * 5 * 2 * 3, dtype=torch.float32).reshape(1, 2, 5, 2, 3)
    cond = latent_condition(previous, 2)
    assert torch.equal(cond[:, :, :2], previous[:, :, 3:]) and not cond[:, :, 2:].any()


@pytest.fixture(scope="module")
def one_process(tiny_ckpt, long_spec, tmp_path_factory):
    """The single-process run of ``long_spec`` in a conditioning mode (run once per mode, on first use)."""
    runs = {}

    def get(mode: str):
        if mode not in runs:
            out = tmp_path_factory.mktemp(f"one-{mode}")
            proc = launch(1, "--controlnet_specs", str(long_spec), "--video_save_folder", str(out), "--save_raw",
                          "--chunk_conditioning", mode, *FAST)
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[mode] = out
        return runs[mode]
    return get


def test_latent_mode_is_deterministic_and_placement_independent(tiny_ckpt, long_spec, tmp_path, one_process):
    outs = {"a": one_process("latent")}
    placement = tmp_path / "placement.json"  # the VAE on a rank of its own, so that its decodes can overlap the DiT
    placement.write_text(json.dumps({"coordinator": 0, "text": 1, "vae": 2, "dit_groups": [[3]]}))
    for run, nproc in (("b", 1), ("four", 4)):
        outs[run] = tmp_path / run
        extra = ["--placement", str(placement)] if nproc > 1 else []
        proc = launch(nproc, "--controlnet_specs", str(long_spec), "--video_save_folder", str(outs[run]), "--save_raw",
                      "--chunk_conditioning", "latent", "--trace", str(tmp_path / f"{run}.json"), *extra, *FAST)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b, four = (np.load(outs[r] / "output.npz") for r in ("a", "b", "four"))
    assert a["latents"].shape[0] == 4
    for k in ("frames", "latents"):
        assert np.array_equal(a[k], b[k]) and np.array_equal(a[k], four[k]), k
    # the 4-process trace: decodes run on the VAE's rank, denoising on the DiT's, so they can overlap. Whether they
    # do is timing (a loaded machine may run them one after the other): benchmarks/pipeline_parallel.py measures
    # overlap; here only what causality fixes is asserted
    events = [e for e in json.loads((tmp_path / "four.json").read_text())["traceEvents"] if e["ph"] == "X"]
    span = {(e["name"], e["args"].get("chunk")): (e["ts"], e["ts"] + e["dur"]) for e in events
            if e["name"] in ("decode", "denoise")}
    assert {e["pid"] for e in events if e["name"] == "decode"} == {2}, "decodes on the VAE's rank"
    assert {e["pid"] for e in events if e["name"] == "denoise"} == {3}, "denoising on the DiT's rank"
    for k in range(4):  # chunk k is decoded after it is denoised (its latents are the decode's input)
        assert span[("denoise", k)][1] <= span[("decode", k)][0], span
    assert not any(e["name"] == "reencode" for e in events)


@pytest.mark.parametrize("mode", ["roundtrip", "latent"])
def test_vae_group_equals_one_process(tiny_ckpt, long_spec, tmp_path, one_process, mode):
    """4 processes whose VAE splits every call by rows: roundtrip with ``--vae_parallel_degree 2`` (the preset's DiT
    group [1, 2] of cfg 2 also forms the VAE group, between denoising), latent with a placement file's group of 3 off
    the DiT (led by the coordinator; 12 latent rows in bands of 4). Equal to one process within the split's bound
    (kernels round differently on fewer rows): latents 1e-5, frames 1 level."""
    if mode == "roundtrip":
        extra, group = ["--vae_parallel_degree", "2"], {1, 2}
    else:
        placement = tmp_path / "placement.json"
        placement.write_text(json.dumps({"coordinator": 0, "text": 0, "vae": [0, 1, 2], "dit_groups": [[3]]}))
        extra, group = ["--placement", str(placement)], {0, 1, 2}
    proc = launch(4, "--controlnet_specs", str(long_spec), "--video_save_folder", str(tmp_path / "four"),
                  "--save_raw", "--chunk_conditioning", mode, "--trace", str(tmp_path / "trace.json"), *extra, *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"VAE group {sorted(group)}" in proc.stderr
    one, four = np.load(one_process(mode) / "output.npz"), np.load(tmp_path / "four" / "output.npz")
    assert one["latents"].shape == four["latents"].shape and one["latents"].shape[0] == 4
    assert np.abs(one["latents"] - four["latents"]).max() <= 1e-5
    assert np.abs(one["frames"].astype(int) - four["frames"].astype(int)).max() <= 1
    events = [e for e in json.loads((tmp_path / "trace.json").read_text())["traceEvents"] if e["ph"] == "X"]
    for name in ("decode", "encode_controls"):  # every call on every rank of the group
        assert {e["pid"] for e in events if e["name"].startswith(name)} == group, name
    assert any(e["name"] == "reencode" for e in events) == (mode == "roundtrip")


@pytest.mark.parametrize("frames", ["2", "4", "6"])
def test_latent_mode_rejects_overlaps_off_latent_boundaries(tiny_ckpt, tmp_path, frames):
    proc = run_cli("--controlnet_specs", str(ROOT / "assets/example_spec.json"), "--chunk_conditioning", "latent",
                   "--num_conditional_frames", frames, "--num_frames_per_chunk", "13", "--video_save_folder", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "transfer.py: error: --chunk_conditioning latent needs --num_conditional_frames 0 or 1 + 4k")
    assert list(tmp_path.iterdir()) == []
