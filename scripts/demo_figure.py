"""One frame of the README's main command side by side: input, the edge control computed from it, the output (and
optionally outputs made with other prompts), each scaled up 4x (nearest) with a caption, into a PNG.

    python transfer.py --controlnet_specs assets/demo_spec.json
    python scripts/demo_figure.py outputs/output.mp4 --frames 0 20 40 --out docs/demo.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preprocessors import edge  # noqa: E402
from transfer.video_io import read_video  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCALE = 4


def tile(frame: np.ndarray, caption: str) -> np.ndarray:
    big = cv2.resize(frame, None, fx=SCALE, fy=SCALE, interpolation=cv2.INTER_NEAREST)
    bar = np.full((22, big.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, caption, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, big], 0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outputs", nargs="+", help="output mp4s (CAPTION=PATH to caption one)")
    p.add_argument("--input", default=str(ROOT / "assets" / "demo_input.mp4"))
    p.add_argument("--frames", type=int, nargs="+", default=[0])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    given, _ = read_video(args.input)
    control = edge.Preprocessor(edge.Config())(given)
    outputs = []
    for item in args.outputs:
        caption, _, path = item.rpartition("=")
        outputs.append((caption or "output", read_video(path)[0]))
    gap = np.full((22 + given.shape[1] * SCALE, 6, 3), 255, np.uint8)
    rows = []
    for t in args.frames:
        tiles = [tile(given[t], f"input, frame {t}"), tile(control[t], "edge control")]
        tiles += [tile(frames[t], caption) for caption, frames in outputs]
        rows.append(np.concatenate([x for pair in zip(tiles, [gap] * len(tiles)) for x in pair][:-1], 1))
    image = np.concatenate(rows, 0)
    cv2.imwrite(args.out, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    print(f"wrote {args.out} ({image.shape[1]} x {image.shape[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
