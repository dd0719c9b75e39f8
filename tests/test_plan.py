"""``--plan``: per-rank weights (meta device) + activations (stage calls on fake tensors) from configs alone."""

from __future__ import annotations

import re

import torch

from configs.models import preset as checkpoint_preset
from tests.conftest import run_cli
from transfer.checkpoint import info_from_preset, inspect_checkpoint, load_dit, load_stage, load_text_encoder, load_vae
from transfer.distributed.placement import Placement
from transfer.planning.chooser import preset
from transfer.memory import CALLS, ChunkSize, call_inputs, estimate_calls, measured_peak
from transfer.plan import component_bytes, plan_ranks


ROW = r"^\s+(\d*)\s+(\S+(?: \(upstream\))?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(-?[\d.]+)\s+(yes|NO)" + r"\s+(yes|NO)" * 3 + "$"


def rank_rows(report: str) -> dict:
    """``{rank or 'upstream': (stages, weights, activations, peak, fits, (fits 24, 48, 80 GB))}`` from the table."""
    rows = {}
    for m in re.finditer(ROW, report, re.M):
        key = int(m[1]) if m[1] else "upstream"
        rows[key] = (m[2], float(m[3]), float(m[4]), float(m[5]), m[7], (m[8], m[9], m[10]))
    return rows


def test_meta_count_equals_loaded_weights(tiny_ckpt):
    """The plan of a real checkpoint directory counts exactly the bytes its loaded models hold."""
    info = inspect_checkpoint(tiny_ckpt)
    planned = component_bytes(info, ["edge", "vis"], torch.float32)
    cpu = torch.device("cpu")

    def held(*modules):  # parameters() and buffers() count a tied tensor once, as memory does
        return sum(t.numel() * 4 for m in modules for t in [*m.parameters(), *m.buffers()])

    dit = load_dit(info, ["edge", "vis"], cpu, torch.float32)
    loaded = {"text": held(load_text_encoder(info, cpu, torch.float32).model),
              "vae": held(load_vae(info, cpu, torch.float32).vae),
              "dit": held(dit.transformer, *dit.controlnets.values())}
    assert {s: sum(c.values()) for s, c in planned.items()} == loaded
    assert loaded["dit"] > 0 and loaded["text"] > 0


def test_real_transfer25_sizes_and_placement():
    info = info_from_preset(checkpoint_preset("transfer2.5-2b"))
    by_stage = component_bytes(info, ["edge"], torch.bfloat16)
    # Cosmos-Reason1-7B (Qwen2.5-VL-7B) ~8.3B params, the 2B DiT ~2.4B, one ControlNet ~0.47B, Wan2.1 VAE ~0.13B
    assert 8.2e9 < by_stage["text"]["text_encoder (qwen2_5_vl)"] / 2 < 8.4e9
    assert 2.3e9 < by_stage["dit"]["transformer"] / 2 < 2.5e9
    assert 0.4e9 < by_stage["dit"]["controlnet/edge"] / 2 < 0.5e9
    assert 0.1e9 < by_stage["vae"]["vae"] / 2 < 0.15e9
    ranks = plan_ranks(Placement(6, 0, 1, 2, ((3, 4), (5,))), by_stage)
    assert [r.stages for r in ranks] == [["coordinator"], ["text"], ["vae"], ["dit"], ["dit"], ["dit"]]
    assert ranks[0].total == 0 and ranks[1].total == sum(by_stage["text"].values())
    assert ranks[3].total == ranks[4].total == sum(by_stage["dit"].values())  # both halves of the CFG pair hold a DiT
    # the one-video preset on 8 GPUs of 80 GB: a cfg 2 x sp 4 group; every shard holds the whole DiT and the VAE (the
    # group is also the VAE group)
    ranks = plan_ranks(preset(8), by_stage)
    assert ranks[0].stages == ["coordinator", "text", "vae", "dit"] and ranks[1].stages == ["vae", "dit"]
    assert ranks[0].total == sum(by_stage["text"].values()) + sum(by_stage["vae"].values()) + sum(by_stage["dit"].values())
    assert all(r.total == sum(by_stage["vae"].values()) + sum(by_stage["dit"].values()) for r in ranks[1:])


def test_cli_plan_720p_weights_activations_and_fit():
    """The issue's command: weights + activations per rank at 704x1280, 93 frames, and the 24/48/80 GB verdicts."""
    proc = run_cli("--plan", "--checkpoint_preset", "transfer2.5-2b-t5-11b", "--num_gpus", "4", "--gpu_memory_gb", "18",
                   "--height", "704", "--width", "1280", "--frames", "93")
    assert proc.returncode == 0, proc.stderr
    rows = rank_rows(proc.stdout)
    # 18 GB GPUs (< 64): text encoder and VAE on ranks of their own, a CFG pair on ranks 1 and 2
    assert rows[0][0] == "coordinator+text" and 9.6 < rows[0][1] < 9.9 and rows[0][2] < 1  # T5-11B: ~4.9B params
    assert rows[3][0] == "vae" and rows[3][1] < 0.3 and 5 < rows[3][2] < 15  # VAE: tiny weights, GBs of activations
    stages, weights, act, peak, fits, sizes = rows[1]
    assert rows[2][:3] == rows[1][:3]  # the pair's two ranks hold and compute the same
    assert stages == "dit" and 8 < weights < 8.6 and 5 < act < 20 and abs(peak - weights - act) < 0.015
    assert fits == ("yes" if peak < 18 else "NO") and sizes == ("yes" if peak < 24 else "NO", "yes", "yes")
    up = rows["upstream"]
    assert abs(up[1] - 18.29) < 0.05 and up[2] >= act and up[4] == "NO" and up[5] == ("NO", "yes", "yes")
    assert "DiT groups: [1, 2] (cfg 2 x sp 1)" in proc.stdout
    presets = {w: (shape, v) for w, shape, v in
               re.findall(r"^\s+(\d)\s+cfg x sp (\dx\d)\s+[\d.]+\s+(yes|NO)\s+(?:yes|NO)\s+(?:yes|NO)$", proc.stdout, re.M)}
    assert len(presets) == 8 and presets["1"] == ("1x1", "NO")  # every preset placement judged
    assert presets["4"] == ("2x1", sizes[0]) and presets["8"][0] == "2x3"
    # the VAE's activation peak per rank falls with the VAE group's degree (the band's calls + the gathered result)
    vae = {int(d): (float(e), float(d_)) for d, e, d_ in
           re.findall(r"^\s+(\d) ranks? +VAE encode ([\d.]+) GB, VAE decode ([\d.]+) GB", proc.stdout, re.M)}
    assert sorted(vae) == [1, 2, 4, 8] and re.search(r"^\s+1 rank +VAE.*<- this placement$", proc.stdout, re.M)
    assert max(vae[1]) == rows[3][2]  # the VAE rank's activations: the larger of its calls, whole
    assert all(vae[a][i] > vae[b][i] for a, b in ((1, 2), (2, 4), (4, 8)) for i in (0, 1)), vae
    assert vae[8][1] < vae[1][1] / 3


def test_cli_plan_fp32_doubles_weights():
    one = run_cli("--plan", "--checkpoint_preset", "transfer2.5-2b-t5-11b", "--plan_dtype", "fp32",
                  "--height", "64", "--width", "96", "--frames", "9")
    assert one.returncode == 0, one.stderr
    rows = rank_rows(one.stdout)
    assert rows[0][0] == "coordinator+text+vae+dit"
    assert abs(rows[0][1] - 2 * 18.29) < 0.05  # fp32 doubles the bf16 total
    bad = run_cli("--plan", "--frames", "10")
    assert bad.returncode == 2 and bad.stderr.strip().endswith("--frames must be 1 + 4k and at least 5, got 10")


def test_activation_estimate_matches_measured_peaks():
    """``--plan``'s activations (stage calls on fake tensors) against the same calls on real tensors, measured by
    the CPU allocator's events: within 25% for every call, in fp32 and bf16."""
    info = info_from_preset(checkpoint_preset("transfer2.5-2b-small"))
    request = ChunkSize(64, 96, 9, ("edge", "vis"))
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.bfloat16):
        estimates = estimate_calls(info, request, dtype, "cpu")
        inputs = call_inputs(info, request, dtype)
        for stage in ("text", "vae", "dit"):
            obj = load_stage(info, stage, request.modalities, cpu, dtype)
            for call in (c for c in CALLS if c.stage == stage):
                measured = measured_peak(cpu, lambda: call.run(obj, inputs))[0]
                estimate = estimates[stage][call.name]
                assert measured > 0 and abs(estimate / measured - 1) < 0.25, (dtype, call.name, estimate, measured)
                if dtype == torch.float32:  # the same ops and the same kernels: the allocator sees what we count
                    assert estimate == measured, (call.name, estimate, measured)


def test_configs_only_preset_refuses_to_generate(tmp_path):
    proc = run_cli("--checkpoint_preset", "transfer2.5-2b", "--controlnet_specs", "assets/example_spec.json",
                   "--video_save_folder", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("transfer.py: error: checkpoint preset 'transfer2.5-2b' is configs only")
    assert list(tmp_path.iterdir()) == []

