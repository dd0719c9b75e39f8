"""--compile torch matches eager; --compile tensorrt fails clearly where it cannot run; --offload stages gives the
same output with fewer weight bytes resident on the device, in one process and in a stage process holding two stages."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli, short_edge_spec
from tests.test_distributed import launch
from transfer.acceleration import check_acceleration
from transfer.config import RuntimeConfig
from transfer.cli import parse_config
from transfer.errors import TransferError
from transfer.runner import run

FAST = ["--num_steps", "2", "--num_frames_per_chunk", "9", "--save_raw"]


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> Path:
    return short_edge_spec(tmp_path_factory.mktemp("accel"), 9, "a ball")


@pytest.fixture(scope="module")
def eager(tiny_ckpt, spec, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eager")
    proc = launch(1, "--controlnet_specs", str(spec), "--video_save_folder", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_compile_torch_matches_eager(tiny_ckpt, spec, eager, tmp_path):
    proc = launch(1, "--controlnet_specs", str(spec), "--video_save_folder", str(tmp_path), "--compile", "torch", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dit: compiled transformer, controlnet.edge (torch)" in proc.stderr
    assert "vae: compiled" not in proc.stderr  # the VAE stays eager (its compile cost minutes on an H200)
    ref, got = np.load(eager / "output.npz"), np.load(tmp_path / "output.npz")
    assert np.abs(ref["latents"] - got["latents"]).max() <= 1e-4  # fp32; inductor reorders float sums
    assert np.abs(ref["frames"].astype(int) - got["frames"].astype(int)).max() <= 1  # uint8 truncation may tip
    # compiled modules taking turns on the device (spilled and restored) give the compiled result bit for bit
    both = launch(1, "--controlnet_specs", str(spec), "--video_save_folder", str(tmp_path / "offload"), "--compile", "torch",
                  "--offload", "stages", *FAST)
    assert both.returncode == 0, both.stderr[-3000:]
    assert (tmp_path / "offload" / "output.npz").read_bytes() == (tmp_path / "output.npz").read_bytes()


def test_attention_backend_native_is_the_cpu_default(tiny_ckpt, spec, eager, tmp_path):
    """--attention_backend native gives the default run's bytes on CPU; _native_math (another kernel) is close; a
    CUDA-only backend on a CPU machine is one error line before anything is written."""
    native = launch(1, "--controlnet_specs", str(spec), "--video_save_folder", str(tmp_path / "native"),
                    "--attention_backend", "native", *FAST)
    assert native.returncode == 0, native.stderr[-3000:]
    assert "dit: attention backend native\n" in native.stderr
    for name in ("output.npz", "output.mp4"):
        assert (tmp_path / "native" / name).read_bytes() == (eager / name).read_bytes()
    math = launch(1, "--controlnet_specs", str(spec), "--video_save_folder", str(tmp_path / "math"),
                  "--attention_backend", "_native_math", *FAST)
    assert math.returncode == 0, math.stderr[-3000:]
    ref, got = np.load(eager / "output.npz"), np.load(tmp_path / "math" / "output.npz")
    assert np.abs(ref["latents"] - got["latents"]).max() <= 1e-4
    cudnn = launch(1, "--controlnet_specs", str(spec), "--video_save_folder", str(tmp_path / "cudnn"),
                   "--attention_backend", "_native_cudnn", *FAST)
    assert cudnn.returncode == 2
    assert cudnn.stderr.strip().splitlines()[-1] == (
        "transfer.py: error: --attention_backend _native_cudnn needs a CUDA GPU and none is visible: use native (or "
        "_native_math, flex) on the CPU")
    assert not (tmp_path / "cudnn").exists()


def test_tensorrt_where_it_cannot_run_is_one_clear_error(tiny_ckpt, spec, tmp_path, monkeypatch):
    import importlib.util

    installed = importlib.util.find_spec("torch_tensorrt") is not None
    if not installed:  # this machine: the package is not there
        proc = run_cli("--controlnet_specs", str(spec), "--video_save_folder", str(tmp_path / "out"), "--compile", "tensorrt")
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines()[-1] == (
            "transfer.py: error: --compile tensorrt needs the torch-tensorrt package, which is not installed: "
            "pip install '.[tensorrt]' (CUDA only), or use --compile torch")
        assert not (tmp_path / "out").exists()
    # installed but no GPU; and offload beside engines that hold their own weights
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "torch_tensorrt" else real(name, *a))
    with pytest.raises(TransferError, match="--compile tensorrt needs a CUDA GPU and none is visible"):
        check_acceleration(RuntimeConfig(compile="tensorrt"), cuda=False)
    with pytest.raises(TransferError, match="--offload stages cannot move weights built into TensorRT engines"):
        check_acceleration(RuntimeConfig(compile="tensorrt", offload="stages"), cuda=True)
    check_acceleration(RuntimeConfig(compile="tensorrt"), cuda=True)


def test_upstream_offload_flags_map_onto_offload_stages():
    for flag in ("diffusion_transformer", "text_encoder_model", "tokenizer", "guardrail_models", "prompt_upsampler"):
        assert parse_config([f"--offload_{flag}"]).runtime.offload == "stages"
    assert parse_config([]).runtime.offload == "none"


def test_offload_stages_same_output_and_fewer_resident_bytes(tiny_ckpt, spec, tmp_path):
    spill_dirs = set(Path(tempfile.gettempdir()).glob("transfer-offload-*"))
    outcomes = {}
    for mode in ("none", "stages"):
        config = parse_config(["--controlnet_specs", str(spec), "--video_save_folder", str(tmp_path / mode),
                                "--offload", mode, *FAST])
        outcomes[mode] = run(config)
    assert (tmp_path / "none" / "output.npz").read_bytes() == (tmp_path / "stages" / "output.npz").read_bytes()
    assert (tmp_path / "none" / "output.mp4").read_bytes() == (tmp_path / "stages" / "output.mp4").read_bytes()
    plain, offloaded = outcomes["none"].memory, outcomes["stages"].memory
    assert plain["stage_bytes"] == offloaded["stage_bytes"] and set(plain["stage_bytes"]) == {"text", "vae", "dit"}
    assert plain["peak_resident_bytes"] == plain["all_stages_bytes"] and plain["moves"] == 0
    # with offload only the stage at work is resident: the peak is the biggest stage, not the sum
    assert offloaded["peak_resident_bytes"] == max(offloaded["stage_bytes"].values()) < plain["peak_resident_bytes"]
    assert offloaded["moves"] >= 3  # text, then vae and dit in turn
    assert set(Path(tempfile.gettempdir()).glob("transfer-offload-*")) == spill_dirs  # spill files removed


def test_offload_in_a_stage_process_holding_two_stages(tiny_ckpt, spec, eager, tmp_path):
    """Two ranks: rank 0 holds the coordinator, the text encoder and the VAE; with --offload stages they take turns."""
    trace = tmp_path / "trace.json"
    placement = tmp_path / "placement.json"  # (the 2-rank preset splits the CFG branches over both ranks instead)
    placement.write_text(json.dumps({"coordinator": 0, "text": 0, "vae": 0, "dit_groups": [[1]]}))
    proc = launch(2, "--controlnet_specs", str(spec), "--video_save_folder", str(tmp_path / "out"), "--offload", "stages",
                  "--trace", str(trace), "--placement", str(placement), *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "output.npz").read_bytes() == (eager / "output.npz").read_bytes()
    memory = json.loads(trace.read_text())["otherData"]["memory_by_rank"]
    rank0, rank1 = memory["0"], memory["1"]
    assert set(rank0["stage_bytes"]) == {"text", "vae"} and rank0["offload"]
    assert rank0["peak_resident_bytes"] == max(rank0["stage_bytes"].values()) < rank0["all_stages_bytes"]
    assert set(rank1["stage_bytes"]) == {"dit"} and not rank1["offload"]  # one stage: nothing to take turns with
    assert "rank 0: weights on cpu (--offload stages)" in proc.stderr
