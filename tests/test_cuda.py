"""CUDA-only checks (skipped without a GPU; ``benchmarks/gpu_check.sh`` runs them): bf16 numerics against fp32 on
the same GPU, the product's CUDA paths with the embedded tiny checkpoint, and -- with two GPUs or more -- NCCL
between stage processes giving the single-process result."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import failure, short_edge_spec
from tests.test_distributed import launch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FAST = ["--num_steps", "4", "--num_frames_per_chunk", "9", "--save_raw", "--guardrail", "off"]


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return short_edge_spec(tmp_path_factory.mktemp("cuda"), 17, "a robot arm")


def run(tmp_path, name: str, nproc: int, spec, *args: str) -> dict:
    out = tmp_path / name
    proc = launch(nproc, "--controlnet_specs", str(spec), "--video_save_folder", str(out), *FAST, *args)
    assert proc.returncode == 0, failure(proc)
    with np.load(out / "output.npz") as z:
        return {"frames": z["frames"], "latents": z["latents"], "stderr": proc.stderr}


def test_bf16_is_close_to_fp32_on_cuda(tiny_ckpt, spec, tmp_path):
    """The default CUDA dtype (bf16) against fp32 on the same GPU and weights: finite, and the latents within a
    relative error that bf16's 8-bit mantissa over a few steps explains (printed for the report)."""
    bf16, fp32 = run(tmp_path, "bf16", 1, spec), run(tmp_path, "fp32", 1, spec, "--dtype", "fp32")
    assert "(torch.bfloat16)" in bf16["stderr"] and "(torch.float32)" in fp32["stderr"]
    assert np.isfinite(bf16["latents"]).all() and np.isfinite(fp32["latents"]).all()
    rel = np.abs(bf16["latents"] - fp32["latents"]).mean() / np.abs(fp32["latents"]).mean()
    diff = np.abs(bf16["frames"].astype(int) - fp32["frames"].astype(int))
    print(f"\nbf16 vs fp32 on CUDA: mean relative latent error {rel:.4f}, frames mean |d| {diff.mean():.2f}, max {diff.max()}")
    assert rel < 0.05


def test_cuda_fp32_is_close_to_cpu_fp32(tiny_ckpt, spec, tmp_path):
    """The same fp32 run on the GPU and on the CPU (other kernels, so not bit for bit): close."""
    gpu = run(tmp_path, "gpu", 1, spec, "--dtype", "fp32")
    out = tmp_path / "cpu"
    proc = launch(1, "--controlnet_specs", str(spec), "--video_save_folder", str(out), *FAST, "--dtype", "fp32",
                  env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out / "output.npz") as z:
        cpu = z["latents"]
    rel = np.abs(gpu["latents"] - cpu).mean() / np.abs(cpu).mean()
    print(f"\nCUDA fp32 vs CPU fp32: mean relative latent error {rel:.2e}")
    assert rel < 1e-3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs: NCCL does not run two ranks on one GPU")
def test_nccl_stage_processes_equal_single_process(tiny_ckpt, spec, tmp_path):
    """Stage processes on separate GPUs (text+VAE+coordinator on GPU 0, the DiT on GPU 1), activations over NCCL:
    the single-process result on the same GPU model, bit for bit (the same kernels run on the same inputs)."""
    placement = tmp_path / "placement.json"
    placement.write_text(json.dumps({"coordinator": 0, "text": 0, "vae": 0, "dit_groups": [[1]]}))
    one = run(tmp_path, "one", 1, spec)
    two = run(tmp_path, "two", 2, spec, "--placement", str(placement))
    assert np.array_equal(one["latents"], two["latents"]) and np.array_equal(one["frames"], two["frames"])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs: NCCL does not run two ranks on one GPU")
def test_nccl_vae_group_is_close_to_single_process(tiny_ckpt, spec, tmp_path):
    """The default 2-GPU layout (a CFG pair whose ranks also form the VAE group: every VAE call split by rows, the
    halos over NCCL) against one GPU, fp32: close (bands run the convolutions on other shapes, whose cuDNN kernels --
    TF32 included -- may round differently; the bound is loose until a GPU run measures it: printed for the report)."""
    one = run(tmp_path, "one", 1, spec, "--dtype", "fp32")
    two = run(tmp_path, "two", 2, spec, "--dtype", "fp32")
    assert "VAE group [0, 1]" in two["stderr"]
    rel = np.abs(one["latents"] - two["latents"]).mean() / np.abs(one["latents"]).mean()
    levels = np.abs(one["frames"].astype(int) - two["frames"].astype(int)).max()
    print(f"\nVAE group of 2 (NCCL) vs one GPU, fp32: mean relative latent error {rel:.2e}, frames max {levels} levels")
    assert np.isfinite(two["latents"]).all() and rel < 1e-2
