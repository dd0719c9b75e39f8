"""--step_cache: the schedules, the predictions, the flags, and a cached 4-process run (cfg 2 x sp 2) equal to the cached
single process with the same skipped steps."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, example_frames, failure, run_cli
from tests.test_distributed import launch
from transfer.flags import build_parser
from transfer.config import STEP_CACHE_METHODS, StepCacheConfig
from transfer.families.transfer25.step_cache import new_cache
from transfer.video_io import write_mp4


def run_schedule(config: StepCacheConfig, velocities) -> tuple[list[int], list[tuple]]:
    """Drive a chunk's cache as ``DiT.predict`` does: (skipped steps, the velocities it returned per step)."""
    cache = new_cache(config, len(velocities))
    out = []
    for step, v in enumerate(velocities):
        if cache.skip(step):
            out.append(cache.predict(step))
        else:
            cache.record(step, v)
            out.append(v)
    return cache.skipped, out


def test_cli_choices_are_the_methods_and_help_imports_no_torch():
    choices = next(a.choices for a in build_parser()._actions if "--step_cache" in a.option_strings)
    assert tuple(choices) == STEP_CACHE_METHODS
    assert new_cache(StepCacheConfig(), 10) is None  # off
    # the parser and the config it builds come without torch (``--help`` answers at once)
    code = "import sys, transfer.cli, transfer.flags, transfer.config; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_taylorseer_schedule_and_first_order_prediction():
    # velocities linear in the step index: the first-order prediction is exact at every skipped step
    velocities = [(torch.full((2, 3), 1.0 + 0.5 * i), torch.full((2, 3), -2.0 * i)) for i in range(10)]
    skipped, out = run_schedule(StepCacheConfig("taylorseer", interval=2, warmup=2), velocities)
    assert skipped == [3, 5, 7]  # 0, 1 warm-up; then every 2nd step computed; the last step (9) always computed
    for got, want in zip(out, velocities):
        assert all(torch.allclose(g, w) for g, w in zip(got, want))
    assert run_schedule(StepCacheConfig("taylorseer", interval=3, warmup=3), velocities)[0] == [4, 5, 7, 8]


def test_adaptive_skips_while_the_change_is_small():
    steady = [(torch.ones(4) * (1 + 0.01 * i),) for i in range(12)]  # ~1% change a step
    skipped, out = run_schedule(StepCacheConfig("adaptive", threshold=0.05, warmup=2, max_skips=3), steady)
    assert skipped == [2, 3, 4, 6, 7, 8, 10]  # three in a row at most (error 3 x 1% < 5%), never the last step
    assert torch.equal(out[2][0], steady[1][0])  # a skipped step reuses the last computed velocity
    fast = [(torch.ones(4) * 2.0 ** i,) for i in range(12)]  # doubling every step: never under the threshold
    assert run_schedule(StepCacheConfig("adaptive", threshold=0.05), fast)[0] == []
    # the accumulated error bounds the run: 2% a step under a 5% threshold skips two in a row
    assert run_schedule(StepCacheConfig("adaptive", threshold=0.05, max_skips=9),
                        [(torch.ones(4) * (1 + 0.02 * i),) for i in range(8)])[0] == [2, 3, 5, 6]


@pytest.mark.parametrize("flag, value, message", [
    ("--step_cache_threshold", "0", "--step_cache_threshold must be above 0, got 0.0"),
    ("--step_cache_interval", "1", "--step_cache_interval must be at least 2 (1 computes every step), got 1"),
    ("--step_cache_warmup", "0", "--step_cache_warmup must be at least 2 (a prediction needs computed steps), got 0"),
])
def test_bad_step_cache_settings_are_one_line(tmp_path, flag, value, message):
    proc = run_cli("--controlnet_specs", "assets/demo_spec.json", "--video_save_folder", str(tmp_path / "out"),
                   "--step_cache", "adaptive", flag, value)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"transfer.py: error: {message}"
    assert not (tmp_path / "out").exists()


SKIPS = re.compile(r"dit: step cache adaptive \(threshold 0\.3, warmup 2, max skips 3\): computed \d+ of 8 steps, "
                   r"skipped \[[0-9, ]*\]")


def test_cached_stage_processes_equal_cached_single_process(tiny_ckpt, tmp_path):
    """One three-chunk video, 8 steps, adaptive cache: 4 gloo ranks with ``--context_parallel_size 2`` (one DiT group of cfg 2 x sp 2) give the cached
    single process's latents within 1e-5 and skip the same steps in every chunk (rank 0's log; every rank of the group
    decides from the same whole velocities, and a rank deciding otherwise would stop the run in the next exchange)."""
    for name in ("example_input.mp4", "example_edge.mp4"):
        write_mp4(tmp_path / name, example_frames(name, 13), 24)
    spec = {"prompt": "three chunks", "input_video_path": str(tmp_path / "example_input.mp4"), "seed": 12,
            "edge": {"control_weight": 1.0, "input_control": str(tmp_path / "example_edge.mp4")}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    flags = ["--checkpoint_preset", "tiny", "--controlnet_specs", str(tmp_path / "spec.json"), "--save_raw",
             "--num_steps", "8", "--num_frames_per_chunk", "5", "--step_cache", "adaptive", "--step_cache_threshold", "0.3"]
    one = launch(1, *flags, "--video_save_folder", str(tmp_path / "one"))
    assert one.returncode == 0, failure(one)
    four = launch(4, *flags, "--video_save_folder", str(tmp_path / "four"), "--context_parallel_size", "2")
    assert four.returncode == 0, failure(four)
    assert "DiT groups [0, 1, 2, 3] (cfg 2 x sp 2)" in four.stderr
    skips_one, skips_four = SKIPS.findall(one.stderr), SKIPS.findall(four.stderr)
    assert len(skips_one) == 3 and skips_four == skips_one  # one line per chunk
    assert all("skipped []" not in line for line in skips_one)  # the cache did skip
    a, b = np.load(tmp_path / "one" / "output.npz"), np.load(tmp_path / "four" / "output.npz")
    assert np.abs(a["latents"] - b["latents"]).max() <= 1e-5
    uncached = launch(1, *flags[:-4], "--video_save_folder", str(tmp_path / "exact"))
    assert uncached.returncode == 0, failure(uncached)
    assert np.abs(np.load(tmp_path / "exact" / "output.npz")["latents"] - a["latents"]).max() > 1e-3  # lossy indeed
    # the A/B report of the cached run against the exact one (python -m transfer.ab)
    ab = subprocess.run([sys.executable, "-m", "transfer.ab", str(tmp_path / "exact"), str(tmp_path / "one"), "--out",
                         str(tmp_path / "ab")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ab.returncode == 0, ab.stderr[-2000:]
    report = json.loads((tmp_path / "ab" / "report.json").read_text())["videos"]["output"]
    assert 10 < report["psnr"] < 100 and report["settings_differ"] == []
