"""``benchmarks/real_size.py --small``: the real-size kit's code path (random weights, every stage timed, its
measured peak memory beside ``--plan``'s estimate, the projection, placement runs under torchrun) at reduced size on
CPU; every column printed, the estimate within 25% of the measurement."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT


def test_real_size_small_prints_every_column():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "real_size.py"), "--small"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    calls = ("text encode", "VAE encode (one control)", "DiT step, CFG (2 branches)", "DiT step, no CFG",
             "VAE decode (one chunk)", "VAE re-encode (roundtrip)")
    for call in (*calls, "weights of every stage (resident)", "one process: weights + largest call"):
        row = re.search(rf"^\| {re.escape(call)} \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", out, re.M)
        assert row, call
        seconds, measured, estimate, ratio = map(float, row.groups())
        if call in calls:
            assert seconds > 0, call  # a measured time
        assert measured > 0 and 0.75 < estimate / measured < 1.25 and abs(ratio - estimate / measured) < 0.01, call
    for name in ("1 GPU, all stages", "stage processes, 1 DiT GPU", "stage processes, CFG pair"):
        assert re.search(rf"^\| {name} \| [\d.]+ \|$", out, re.M), name
    assert "1 GPU 502.6 s" in out
    for world in (1, 4):
        assert re.search(rf"^{world} rank\(s\), transfer.py --random_weights, 2 chunks x 2 steps: wall [\d.]+ s$", out, re.M)
    assert re.search(r"^\s+[1-3]\s+dit\s+[\d.]+\s+\d+%\s+[\d.]+\s+[\d.]+$", out, re.M)  # the 4-rank run's stage table
    assert "rank 3: weights on cpu" in out and "FAILED" not in out


def test_real_size_small_for_cosmos3():
    """``--preset cosmos3-nano --small``: the same kit for Cosmos 3 (the embedded tiny model's configs, random
    weights): the VAE calls and every transformer pass timed, measured beside ``--plan``'s estimate (within 25%), the
    projection, a random-weight transfer.py run."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "real_size.py"), "--small", "--preset",
                           "cosmos3-nano", "--placements", "1"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for call in ("encode (one hint)", "decode (one chunk)", "pass cond", "pass cond_no_control", "pass uncond"):
        row = re.search(rf"^\| {re.escape(call)} \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", out, re.M)
        assert row, call
        seconds, measured, estimate, _ = map(float, row.groups())
        assert seconds > 0 and measured > 0 and 0.75 < estimate / measured < 1.25, call
    for name in ("1 GPU, all stages", "rank 0 \\+ DiT group, 3 pass branches"):
        assert re.search(rf"^\| {name} \| [\d.]+ \|$", out, re.M), name
    assert re.search(r"^1 rank\(s\), transfer.py --random_weights, 2 chunks x 2 steps: wall [\d.]+ s$", out, re.M)
    assert "FAILED" not in out


def test_cosmos3_step_small_times_both_transformers_on_the_same_weights():
    """``benchmarks/cosmos3_step.py --small`` (gpu_check.sh section 6's Nano step, on cosmos3-tiny): every pass of one
    step timed for diffusers' transformer and ours, and the outputs equal (the same attention, another kernel)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cosmos3_step.py"), "--small"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for name in ("cond", "cond_no_control", "uncond"):
        row = re.search(rf"^\| {name} \| ([\d.]+) \| ([\d.]+) \| [\d.]+x \| ([\d.e+-]+) \|$", proc.stdout, re.M)
        assert row and float(row.group(1)) > 0 and float(row.group(2)) > 0, name
        assert float(row.group(3)) < 1e-5, name
    assert re.search(r"^\| \*\*step\*\* \| \*\*[\d.]+\*\* \| \*\*[\d.]+\*\* \| \*\*[\d.]+x\*\* \| \|$",
                     proc.stdout, re.M)


def test_dit_step_small_prints_every_table():
    """``benchmarks/dit_step.py --small``: the per-backend table (native, and _native_math against it), the counted
    FLOPs, the CFG steps with their peak memory, the taylorseer projections."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dit_step.py"), "--small"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert re.search(r"^FLOPs of one step, counted on fake tensors in \d+ s: edge no CFG [\d.e+-]+ TFLOP", out, re.M)
    assert re.search(r"^\| native \| [\d.]+ \| \d+ \| [\d.]+ \| 0\.00e\+00 \| 0\.00e\+00 \|$", out, re.M)
    math_row = re.search(r"^\| _native_math \| [\d.]+ \| \d+ \| [\d.]+ \| ([\d.e+-]+) \| ([\d.e+-]+) \|$", out, re.M)
    assert math_row and float(math_row.group(2)) < 1e-4  # another kernel, the same attention
    for label in ("CFG, edge", "CFG, edge \\+ vis"):
        row = re.search(rf"^\| {label} \| ([\d.]+) \| \d+ \| [\d.]+ \| (\d+) \|$", out, re.M)
        assert row and float(row.group(1)) > 0 and int(row.group(2)) >= 0, label
    assert re.search(r"^\| interval 2, warmup 2 \| 19 \| [\d.]+ \|$", out, re.M)  # 19 of 35 steps computed
