"""A batch full of malformed and hostile lines: each refused with a message in failures.jsonl, nothing written
outside the output folder, the valid lines produced."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import example_frames, run_cli
from transfer.video_io import write_mp4

FAST = ["--num_steps", "1", "--num_frames_per_chunk", "5", "--max_frames", "12", "--max_resolution", "200"]


def hostile_lines(d: Path) -> list[str]:
    good = {"prompt": "a ball", "input_video_path": "in.mp4", "edge": {"control_weight": 1.0, "input_control": "edge.mp4"}}

    def spec(**changes) -> str:
        return json.dumps({k: v for k, v in {**good, **changes}.items() if v is not None})

    def control(**fields) -> str:
        return spec(edge={"control_weight": 1.0, "input_control": "edge.mp4", **fields})

    return [
        # not JSON, or not an object
        "{", '{"prompt": }', "not json at all", "[1, 2", '{"prompt": "x",}', "{'prompt': 'x'}", "\x00\x01",
        '{"prompt": "a"} trailing', "[]", '"a string"', "42", "null", "true",
        # JSON bombs
        '{"a": ' * 50_000, "[" * 100_000, json.dumps({"prompt": "x" * (1 << 20)}),
        # output names that would escape the folder or are not plain names
        spec(name="../escape"), spec(name="/abs/path"), spec(name="a/b"), spec(name=".."), spec(name=".hidden"),
        spec(name="x\u0000y"), spec(name="n" * 200), spec(name=""), spec(name="with space"), spec(name="C:\\win"),
        spec(name=5),
        # input paths: NUL, missing, a folder, not a video, truncated, empty, not a string, outside
        spec(input_video_path="in\u0000.mp4"), spec(input_video_path="/nonexistent/video.mp4"),
        spec(input_video_path="."), spec(input_video_path="notes.mp4"), spec(input_video_path="truncated.mp4"),
        spec(input_video_path=""), spec(input_video_path=123), spec(input_video_path="../../etc/passwd"),
        # beyond the configured limits (checked before decoding)
        spec(input_video_path="long.mp4", edge={"control_weight": 1.0, "input_control": "long.mp4"}),
        spec(input_video_path="wide.mp4", edge={"control_weight": 1.0, "input_control": "wide.mp4"}),
        # controls
        spec(depthh={"control_weight": 1}), spec(upscale={"control_weight": 1}), spec(edge=5),
        control(control_weight=-1), control(control_weight="NaN"), control(control_weight=float("inf")),
        control(control_weight="x"), control(color="red"), control(input_control="missing_edge.mp4"),
        control(input_control_prompt=""), spec(edge={"control_weight": 1.0}, input_video_path=None),
        # request fields
        spec(prompt=None), spec(prompt=""), spec(prompt=5), spec(negative_prompt=5), spec(seed=-1), spec(seed="x"),
        spec(seed=2**64), spec(seed=True), spec(unknown_field=1),
        # a name already used by an earlier line
        spec(name="good1"),
    ]


def test_hostile_batch_lines_are_refused_one_by_one(tiny_ckpt, tmp_path):
    d = tmp_path / "inputs"
    d.mkdir()
    write_mp4(d / "in.mp4", example_frames("example_input.mp4", 9), 24)
    write_mp4(d / "edge.mp4", example_frames("example_edge.mp4", 9), 24)
    write_mp4(d / "long.mp4", example_frames("example_input.mp4", 13), 24)
    frames = example_frames("example_input.mp4", 9)
    write_mp4(d / "wide.mp4", frames.repeat(2, axis=2)[:, :, :272], 24)  # 272 px wide > --max_resolution 200
    (d / "notes.mp4").write_text("this is not a video")
    (d / "truncated.mp4").write_bytes((d / "in.mp4").read_bytes()[:500])
    bad = hostile_lines(d)
    assert len(bad) >= 50
    good = {"prompt": "a ball", "input_video_path": "in.mp4", "edge": {"control_weight": 1.0, "input_control": "edge.mp4"}}
    lines = [json.dumps({**good, "name": "good1"}), *bad[:25], json.dumps({**good, "name": "good2", "seed": 2}), *bad[25:]]
    (d / "batch.jsonl").write_text("\n".join(line.replace("\n", " ") for line in lines) + "\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out = tmp_path / "out"
    proc = run_cli("--batch_input_path", str(d / "batch.jsonl"), "--video_save_folder", str(out), *FAST, cwd=d)
    assert proc.returncode == 3, proc.stderr[-3000:]
    records = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    good_lines = {1, 27}
    assert sorted(r["line"] for r in records) == [n for n in range(1, len(lines) + 1) if n not in good_lines]
    assert all(r["error"] and r["source"].endswith(f":{r['line']}") for r in records)
    assert sorted(p.name for p in out.iterdir()) == ["failures.jsonl", "good1.mp4", "good1.txt", "good2.mp4", "good2.txt", "manifest.json"]
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if not p.is_relative_to(out))
    assert after == [p for p in before if not (tmp_path / p).is_relative_to(out)]  # nothing written elsewhere
    assert not Path("/abs").exists() and not (d.parent / "escape.mp4").exists()
    by_line = {r["line"]: r["error"] for r in records}
    assert "is not a plain file name" in by_line[lines.index(json.dumps({**good, "name": "../escape"})) + 1]
    assert "more than --max_frames 12" in " ".join(by_line.values())
    assert "larger than --max_resolution 200" in " ".join(by_line.values())
    assert "nested too deeply" in " ".join(by_line.values())
