"""``benchmarks/sequence_parallel.py --small``: sp 1/2/4 measured side by side (every rank's velocity equal to sp 1's,
the bytes each rank sent equal to the formula the projection uses), and the 1/2/4/8-GPU projection printed beside
upstream's published times."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT


def test_sequence_parallel_small_prints_every_column():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sequence_parallel.py"), "--small"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, out[-2000:] + proc.stderr[-3000:]
    for sp in (1, 2, 4):
        row = re.search(rf"^\s+{sp}\s+([\d.]+)\s+([\d.]+)x\s+([\d,]+)\s+([\d,]+)\s+(yes|NO)$", out, re.M)
        assert row, sp
        seconds, _, counted, formula, same = row.groups()
        assert float(seconds) > 0 and same == "yes", sp
        assert counted == formula and (counted == "0") == (sp == 1), sp  # the projection's byte count is the real one
    rows = {}
    for gpus, upstream in ((1, "502.6"), (2, "-"), (4, "154.5"), (8, "92.5")):
        row = re.search(rf"^\s+{gpus}\s+\dx\d\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x\s+(\S+)",
                        out, re.M)
        assert row and row.group(4) == upstream, gpus
        rows[gpus] = float(row.group(1)), float(row.group(2))
    assert rows[1][0] == rows[1][1] == 502.6  # one GPU: the whole VAE either way
    # the VAE group takes 8.59 s (measured) x (1 - 1/N) off the critical path
    assert all(abs(one - group - 8.59 * (1 - 1 / g)) < 0.06 for g, (one, group) in rows.items()), rows
    eight = re.search(r"^\s+8\s+2x4\s+.*\s([\d.]+)x\s+92\.5\s+5\.43x$", out, re.M)
    assert eight and float(eight.group(1)) > 6.5  # the projection beats upstream's measured scaling (assumptions printed)
    assert "(assumed)" in out and "(measured, one H200)" in out
