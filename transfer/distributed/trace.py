"""Busy intervals per stage: a Chrome/Perfetto trace file and the end-of-run stage table."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path


class Tracer:
    """Records ``(stage, name, start, end, args)`` spans on one rank; times are seconds since ``t0``."""

    def __init__(self, rank: int, t0: float | None = None):
        self.rank, self.t0 = rank, time.time() if t0 is None else t0
        self.spans: list[dict] = []

    def add(self, stage: str, name: str, start: float, end: float, nested: bool = False, **args) -> None:
        """Record a span from wall-clock ``start``/``end``; ``nested`` spans lie inside another span of the
        same stage (e.g. the steps of a chunk) and do not add to its busy time."""
        if nested:
            args = {**args, "nested": True}
        self.spans.append({"stage": stage, "name": name, "start": start - self.t0, "end": end - self.t0, "rank": self.rank,
                           "args": args})

    @contextmanager
    def span(self, stage: str, name: str, **args):
        start = time.time()
        try:
            yield
        finally:
            self.add(stage, name, start, time.time(), **args)


def write_chrome_trace(path: str | Path, spans: list[dict], other: dict | None = None) -> None:
    """Complete events (``ph: X``), one process row per rank, one thread row per stage."""
    stages = sorted({s["stage"] for s in spans})
    events = [
        {"name": s["name"], "cat": s["stage"], "ph": "X", "ts": s["start"] * 1e6, "dur": (s["end"] - s["start"]) * 1e6,
         "pid": s["rank"], "tid": stages.index(s["stage"]), "args": s["args"]}
        for s in spans
    ]
    events += [{"name": "thread_name", "ph": "M", "pid": r, "tid": stages.index(st), "args": {"name": st}}
               for r, st in sorted({(s["rank"], s["stage"]) for s in spans})]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms", "otherData": other or {}}))


def busy_by_stage(spans: list[dict]) -> dict[tuple[int, str], float]:
    """Busy seconds per (rank, stage), from top-level spans (nested ones lie inside them)."""
    rows: dict[tuple[int, str], float] = {}
    for s in spans:
        if not s["args"].get("nested"):
            key = (s["rank"], s["stage"])
            rows[key] = rows.get(key, 0.0) + s["end"] - s["start"]
    return rows


def spans_from_chrome_trace(path: str | Path) -> tuple[list[dict], dict]:
    """The spans and ``otherData`` of a trace written by ``write_chrome_trace``."""
    data = json.loads(Path(path).read_text())
    spans = [{"stage": e["cat"], "name": e["name"], "start": e["ts"] / 1e6, "end": (e["ts"] + e["dur"]) / 1e6,
              "rank": e["pid"], "args": e["args"]}
             for e in data["traceEvents"] if e["ph"] == "X"]
    return spans, data.get("otherData", {})


def stage_table(spans: list[dict], wall: float, bytes_sent: dict[int, int],
                send_seconds: dict[int, float] | None = None) -> str:
    """Per (rank, stage): busy seconds, idle fraction of the wall time; per rank: the bytes it sent and the seconds
    its sender thread spent sending them (beside compute, not part of busy)."""
    send_seconds = send_seconds or {}
    lines = [f"{'rank':>4}  {'stage':<12}{'busy s':>9}{'idle':>8}{'MB sent':>10}{'send s':>9}", "-" * 54]
    for (rank, stage), busy in sorted(busy_by_stage(spans).items()):
        idle = 1 - busy / wall if wall > 0 else 0.0
        lines.append(f"{rank:>4}  {stage:<12}{busy:>9.2f}{idle:>8.0%}{bytes_sent.get(rank, 0) / 1e6:>10.2f}"
                     f"{send_seconds.get(rank, 0.0):>9.3f}")
    lines.append(f"wall {wall:.2f} s")
    return "\n".join(lines)
