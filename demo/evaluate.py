"""Generate held-out scenes of the demo world with ``transfer.py`` (as a user runs it) and score the outputs.

Shared by ``benchmarks/quality.py`` (the table) and ``tests/test_demo_checkpoint.py`` (the floor test):

* ``write_batch``: for each seed, the rendered input video and a cosmos-transfer1 batch line asking for it back with
  the edge control computed from it (the edge preprocessor, as a user would leave it) and the scene's prompt;
* ``generate``: one ``transfer.py --batch_input_path`` run (a subprocess) with a checkpoint preset and flags;
* ``score``: edge F1 against the edges the tool computed from the decoded input, prompt color accuracy and
  background accuracy of each output mp4 (``demo.metrics``), the per-frame goals (background pixels, shapes' colour
  in >= 90% of frames), and the seam ratio at the chunk boundaries and whether the background's colour holds
  across every one of them;
* ``round_trip``: the inputs through the checkpoint's VAE alone (the ceiling a perfect DiT could reach).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from demo.metrics import (background_accuracy, background_holds, background_pixels, color_accuracy, edge_f1, edges,
                          seam_ratio, shape_colors)
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


def generate(batch: Path, out: Path, checkpoint: str | Path, *flags: str, threads: int | None = None,
             log_level: str = "WARNING") -> str:
    """``transfer.py --batch_input_path batch --video_save_folder out --checkpoint_preset checkpoint FLAGS``
    (``--checkpoint_dir`` when ``checkpoint`` is a Path); raises with the tool's error output if it fails, else
    returns what it logged (at ``log_level``)."""
    env = {**os.environ, "TRANSFER_LOG_LEVEL": log_level}
    if threads:
        flags = ("--cpu_threads", str(threads), *flags)
    which = (["--checkpoint_dir", str(checkpoint)] if isinstance(checkpoint, Path)
             else ["--checkpoint_preset", checkpoint])
    cmd = [sys.executable, str(ROOT / "transfer.py"), "--batch_input_path", str(batch), "--video_save_folder", str(out),
           *which, *flags]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stderr


def score(out: Path, case: Case, boundaries: list[int] | None = None) -> dict:
    """The metrics of ``out/<name>.mp4`` for ``case``; ``boundaries``: first new frame of each later chunk (adds
    ``seam``)."""
    from transfer.video_io import read_video

    output, _ = read_video(out / f"{case.name}.mp4")
    given, _ = read_video(case.input_path)
    control = np.repeat(edges(given)[..., None], 3, -1).astype(np.uint8) * 255
    result = {"edge_f1": edge_f1(output, control), "color": color_accuracy(output, case.scene, case.masks),
              "background": background_accuracy(output, case.scene, case.masks), "shapes": len(case.scene.shapes),
              # issue 31's per-frame goals: frames whose background pixels are >= 90% the prompt's colour, shapes in
              # their prompt colour in >= 90% of their frames
              "background_frames_90": float((background_pixels(output, case.scene, case.masks) >= 0.9).mean()),
              "shapes_90": float(np.mean([c >= 0.9 for c in shape_colors(output, case.scene, case.masks)]))}
    if boundaries:
        result["seam"] = seam_ratio(output, boundaries)
        result["seam_input"] = seam_ratio(given, boundaries)
        result["background_holds"] = float(background_holds(output, case.masks, boundaries))
    return result


def round_trip(out: Path, cases: list[Case], checkpoint: Path) -> None:
    """``out/<name>.mp4``: each case's input through ``checkpoint``'s VAE and back (the same loader and arithmetic
    as the tool, mp4-encoded as its outputs are): what a perfect DiT could give at best."""
    import torch

    from transfer.families.transfer25.models import VideoVAE
    from transfer.video_io import read_video, write_mp4
    from diffusers import AutoencoderKLWan

    vae = VideoVAE(AutoencoderKLWan.from_pretrained(checkpoint / "vae").eval(), torch.device("cpu"))
    out.mkdir(parents=True, exist_ok=True)
    for case in cases:
        frames, fps = read_video(case.input_path)
        with torch.no_grad():
            x = torch.from_numpy(frames).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]
            y = vae.decode(vae.encode(x, torch.float32))[0].clamp(-1, 1)
        write_mp4(out / f"{case.name}.mp4", ((y.permute(1, 2, 3, 0) + 1) * 127.5).round().to(torch.uint8).numpy(), fps)


def mean(rows: list[dict]) -> dict:
    """Every metric averaged over ``rows`` (scenes), and ``color_<n>``: the color accuracy over the scenes with n
    shapes (binding a color to its shape is harder with more of them)."""
    result = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
    for n in sorted({r["shapes"] for r in rows}):
        result[f"color_{n}"] = float(np.mean([r["color"] for r in rows if r["shapes"] == n]))
    return result


#: The README's two commands for its scene (``demo.world.README_SEED``): the cosmos-transfer1 form (seed 1) and the
#: Transfer2.5 form (seed 2025), each writing 41 frames in 5 chunks.
README_FORMS = {"transfer1": ("--controlnet_specs", "assets/demo_spec.json"),
                "transfer2.5": ("-i", "assets/demo_spec25.json")}


def readme_scene(out: Path, checkpoint: str | Path, form: str) -> dict:
    """The README's scene through ``checkpoint`` in one of its forms (``README_FORMS``; its output in ``out``), scored
    by ``score_readme``."""
    which = (["--checkpoint_dir", str(checkpoint)] if isinstance(checkpoint, Path)
             else ["--checkpoint_preset", checkpoint])
    folder = "--video_save_folder" if form == "transfer1" else "-o"
    cmd = [sys.executable, str(ROOT / "transfer.py"), *README_FORMS[form], *which, folder, str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "TRANSFER_LOG_LEVEL": "WARNING"}, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return score_readme(out / ("output.mp4" if form == "transfer1" else "demo.mp4"))


def score_readme(video: Path) -> dict:
    """An output of the README's scene (``demo.world.README_SEED``, 41 frames in 5 chunks) scored as the README states
    it: ``score``'s measures, and the share of the prompt's background colour per frame (mean, frame 0, the worst
    frame: ``background_mean`` ...), each shape's share of frames in its colour (``shape_frames``)."""
    import shutil
    import tempfile

    from demo.world import README_SEED
    from transfer.video_io import read_video

    scene = Scene.from_seed(README_SEED)
    masks = render(scene, 41)[1]
    case = Case(README_SEED, scene, masks, ROOT / "assets" / "demo_input.mp4")
    with tempfile.TemporaryDirectory() as work:  # score reads <folder>/<case name>.mp4
        shutil.copy(video, Path(work) / f"{case.name}.mp4")
        result = score(Path(work), case, [9, 17, 25, 33])
    output, _ = read_video(video)
    pixels = background_pixels(output, scene, masks)
    result.update(frames=output.shape, background_mean=float(pixels.mean()), background_frame0=float(pixels[0]),
                  background_worst=float(pixels.min()),
                  shape_frames={f"{s.color} {s.kind}": c for s, c in zip(scene.shapes,
                                                                          shape_colors(output, scene, masks))})
    return result
