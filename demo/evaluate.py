"""Generate held-out scenes of the demo world with ``transfer.py`` (as a user runs it) and score the outputs.

Shared by ``benchmarks/quality.py`` (the table) and ``tests/test_demo_checkpoint.py`` (the floor test):

* ``write_batch``: for each seed, the rendered input video and a cosmos-transfer1 batch line asking for it back with
  the edge control computed from it (the edge preprocessor, as a user would leave it) and the scene's prompt;
* ``generate``: one ``transfer.py --batch_input_path`` run (a subprocess) with a checkpoint preset and flags;
* ``score``: edge F1 against the edges the tool computed from the decoded input, prompt color accuracy and
  background accuracy of each output mp4 (``demo.metrics``), and the seam ratio at the chunk boundaries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from demo.metrics import background_accuracy, color_accuracy, edge_f1, edges, seam_ratio
from demo.world import HELD_OUT_SEEDS, Scene, render

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    seed: int
    scene: Scene
    masks: np.ndarray
    input_path: Path

    @property
    def name(self) -> str:
        return f"scene{self.seed}"


def held_out(count: int, start: int = 0) -> list[int]:
    """``count`` seeds never used in training (``demo.world.HELD_OUT_SEEDS``)."""
    return list(HELD_OUT_SEEDS[start:start + count])


def write_batch(folder: Path, seeds: list[int], num_frames: int) -> tuple[Path, list[Case]]:
    """``folder/scene<seed>.mp4`` for each seed and ``folder/batch.jsonl`` requesting them (edge computed)."""
    from transfer.video_io import write_mp4

    folder.mkdir(parents=True, exist_ok=True)
    cases, lines = [], []
    for seed in seeds:
        scene = Scene.from_seed(seed)
        frames, masks = render(scene, num_frames)
        path = folder / f"scene{seed}.mp4"
        write_mp4(path, frames, 24)
        cases.append(Case(seed, scene, masks, path))
        lines.append({"name": f"scene{seed}", "prompt": scene.prompt, "input_video_path": str(path),
                      "edge": {"control_weight": 1.0}})
    batch = folder / "batch.jsonl"
    batch.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return batch, cases


def generate(batch: Path, out: Path, checkpoint: str | Path, *flags: str, threads: int | None = None) -> None:
    """``transfer.py --batch_input_path batch --video_save_folder out --checkpoint_preset checkpoint FLAGS``
    (``--checkpoint_dir`` when ``checkpoint`` is a Path); raises with the tool's error output if it fails."""
    env = {**os.environ, "TRANSFER_LOG_LEVEL": "WARNING"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    which = (["--checkpoint_dir", str(checkpoint)] if isinstance(checkpoint, Path)
             else ["--checkpoint_preset", checkpoint])
    cmd = [sys.executable, str(ROOT / "transfer.py"), "--batch_input_path", str(batch), "--video_save_folder", str(out),
           *which, *flags]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def score(out: Path, case: Case, boundaries: list[int] | None = None) -> dict:
    """The metrics of ``out/<name>.mp4`` for ``case``; ``boundaries``: first new frame of each later chunk (adds
    ``seam``)."""
    from transfer.video_io import read_video

    output, _ = read_video(out / f"{case.name}.mp4")
    given, _ = read_video(case.input_path)
    control = np.repeat(edges(given)[..., None], 3, -1).astype(np.uint8) * 255
    result = {"edge_f1": edge_f1(output, control), "color": color_accuracy(output, case.scene, case.masks),
              "background": background_accuracy(output, case.scene, case.masks)}
    if boundaries:
        result["seam"] = seam_ratio(output, boundaries)
        result["seam_input"] = seam_ratio(given, boundaries)
    return result


def mean(rows: list[dict]) -> dict:
    return {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
