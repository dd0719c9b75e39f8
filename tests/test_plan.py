"""``--plan``: per-rank weight memory from configs on the meta device."""

from __future__ import annotations

import re

import torch

from configs.models import preset as checkpoint_preset
from tests.conftest import run_cli
from transfer.checkpoint import info_from_preset, inspect_checkpoint, load_dit, load_text_encoder, load_vae
from transfer.distributed.placement import preset
from transfer.plan import component_bytes, plan_ranks


def rank_rows(report: str) -> dict[int, tuple[str, float, str]]:
    """``{rank: (stages, weights, fits)}`` from the printed table."""
    rows = {}
    for m in re.finditer(r"^\s+(\d+)\s+(\S+)\s+([\d.]+)\s+(-?[\d.]+)\s+(yes|NO)$", report, re.M):
        rows[int(m[1])] = (m[2], float(m[3]), m[5])
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
    ranks = plan_ranks(preset(6), by_stage)
    assert [r.stages for r in ranks] == [["coordinator"], ["text"], ["vae"], ["dit"], ["dit"], ["dit"]]
    assert ranks[0].total == 0 and ranks[1].total == sum(by_stage["text"].values())
    assert ranks[3].total == ranks[4].total == sum(by_stage["dit"].values())  # both halves of the CFG pair hold a DiT


def test_cli_plan_t5_11b_reports_fit():
    proc = run_cli("--plan", "--checkpoint_preset", "transfer2.5-2b-t5-11b", "--num_gpus", "4", "--gpu_memory_gb", "9")
    assert proc.returncode == 0, proc.stderr
    rows = rank_rows(proc.stdout)
    assert rows[1][0] == "text" and 9.6 < rows[1][1] < 9.9 and rows[1][2] == "NO"  # T5-11B encoder: ~4.9B params
    assert rows[2][0] == "vae" and rows[2][2] == "yes"
    assert rows[3][0] == "dit" and 8 < rows[3][1] < 8.6 and rows[3][2] == "yes"
    assert re.search(r"replicated \(upstream\)\s+18\.\d+\s+-9\.\d+\s+NO", proc.stdout)
    one = run_cli("--plan", "--checkpoint_preset", "transfer2.5-2b-t5-11b", "--plan_dtype", "fp32")
    assert one.returncode == 0, one.stderr
    assert rank_rows(one.stdout)[0][0] == "coordinator+text+vae+dit"
    assert abs(rank_rows(one.stdout)[0][1] - 2 * 18.29) < 0.05  # fp32 doubles the bf16 total


def test_configs_only_preset_refuses_to_generate(tmp_path):
    proc = run_cli("--checkpoint_preset", "transfer2.5-2b", "--controlnet_specs", "assets/example_spec.json",
                   "--video_save_folder", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("transfer.py: error: checkpoint preset 'transfer2.5-2b' is configs only")
    assert list(tmp_path.iterdir()) == []

