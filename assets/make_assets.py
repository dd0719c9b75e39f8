"""Regenerate the small example inputs in assets/ (deterministic; run from the repo root).

example_input.mp4   121 frames, 160x96: shapes moving over a gradient (2 chunks at 93 frames/chunk)
example_edge.mp4    Canny edges of it (upstream 'medium' thresholds 100/200)
example_vis.mp4     bilateral blur + down/up resize of it (upstream 'medium': d 30, 150/100, x2)
demo_input.mp4      41 frames, 64x64: held-out scene demo.world.README_SEED of the demo world (demo.world), the README's main command
demo_spec.json      its cosmos-transfer1 spec (edge computed from the input); demo_spec25.json the same as a
                    cosmos-transfer2.5 sample
"""

import json
from pathlib import Path

import cv2
import numpy as np

from demo.world import README_SEED, Scene, render
from transfer.video_io import write_mp4

HERE = Path(__file__).parent
T, H, W = 121, 96, 160
DEMO_SEED, DEMO_FRAMES = README_SEED, 41  # held out from training; 5 chunks of the demo model's 9 frames


def input_frames() -> np.ndarray:
    y, x = np.mgrid[0:H, 0:W]
    frames = []
    for t in range(T):
        img = np.stack([x * 255 // W, y * 255 // H, np.full_like(x, 96)], -1).astype(np.uint8)
        cx = int(20 + (W - 40) * (0.5 + 0.5 * np.sin(2 * np.pi * t / T)))
        cv2.circle(img, (cx, 48), 14, (240, 200, 40), -1)
        sx = int(10 + (W - 50) * t / (T - 1))
        cv2.rectangle(img, (sx, 62), (sx + 28, 88), (30, 60, 200), -1)
        frames.append(img)
    return np.stack(frames)


def main() -> None:
    frames = input_frames()
    write_mp4(HERE / "example_input.mp4", frames, 24)
    edges = [cv2.Canny(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), 100, 200) for f in frames]
    write_mp4(HERE / "example_edge.mp4", np.stack([np.repeat(e[..., None], 3, -1) for e in edges]), 24)
    vis = []
    for f in frames:
        blurred = cv2.bilateralFilter(f, 30, 150, 100)
        small = cv2.resize(blurred, (W // 2, H // 2), interpolation=cv2.INTER_AREA)
        vis.append(cv2.resize(small, (W, H), interpolation=cv2.INTER_LINEAR))
    write_mp4(HERE / "example_vis.mp4", np.stack(vis), 24)
    write_demo()


def write_demo() -> None:
    scene = Scene.from_seed(DEMO_SEED)
    write_mp4(HERE / "demo_input.mp4", render(scene, DEMO_FRAMES)[0], 24)
    (HERE / "demo_spec.json").write_text(json.dumps(
        {"prompt": scene.prompt, "input_video_path": "demo_input.mp4", "edge": {"control_weight": 1.0}}, indent=2) + "\n")
    (HERE / "demo_spec25.json").write_text(json.dumps(
        {"name": "demo", "prompt": scene.prompt, "video_path": "demo_input.mp4", "edge": {"control_weight": 1.0}},
        indent=2) + "\n")


if __name__ == "__main__":
    main()
