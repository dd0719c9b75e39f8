"""The demo checkpoint's small world: one or two shapes in named colours moving over a plain background.

A scene is a function of its seed (``Scene.from_seed``): one or two shapes (circle, square, triangle; never two of
one kind, so the prompt says which shape has which colour: two circles named red and blue could be either way round),
each 17 to 26 pixels across, in six named colours (red, green, blue, yellow, white, black), on a background of another
named colour or gray, each moving in a straight line and bouncing off the borders. (Issue 40 narrowed the world from
one to three shapes of 12 to 22 pixels in eight colours: a 64 x 64 model learns the narrower one in a CPU budget.) ``render`` draws its frames (uint8 ``[T, H, W, 3]``, OpenCV, no anti-aliasing: every pixel belongs to one
shape or the background) and each shape's mask; ``Scene.prompt`` names what is in it ("a red circle and a blue
square on a gray background"). The edge and vis controls are made with the project's own preprocessors (``preprocessors.edge``,
``preprocessors.vis``), as a user's computed controls are.

Training uses seeds from ``TRAIN_SEEDS``; held-out evaluation (``benchmarks/quality.py``, the tests) only seeds from
``HELD_OUT_SEEDS``, which training never draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

#: Named colours (RGB) the prompts use.
COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
    "white": (245, 245, 245), "black": (15, 15, 15),
}
BACKGROUNDS = {**COLORS, "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
#: Seeds training may draw from, and the disjoint range kept for evaluation.
TRAIN_SEEDS = range(0, 1_000_000)
HELD_OUT_SEEDS = range(1_000_000, 1_001_000)
#: The README's scene ("a black circle and a yellow square on a blue background", assets/demo_input.mp4), held out.
README_SEED = 1_000_264
#: Shapes per scene, and each shape's half-width as a share of the frame's side.
MAX_SHAPES, HALF_WIDTH = 2, (0.13, 0.2)
#: The demo checkpoint's word-level tokenizer (``embedded_checkpoint.build_tokenizer``): every word a prompt of this
#: world uses, and "cyan" and "magenta", colours of the wider world the shipped model's tokenizer was first built for
#: (kept so that its token ids stay; no prompt of this world uses them).
WORDS = ("a", "and", "on", "background", ",", *SHAPES, "red", "green", "blue", "yellow", "cyan", "magenta", "white",
         "black", "gray")
#: Least gray-level difference between a shape and the background: the edge control's Canny (medium, 100/200) sees a
#: step of about 50 levels and more.
MIN_CONTRAST = 60


def luma(name: str) -> float:
    """Gray level of a named colour (OpenCV's RGB -> gray weights)."""
    r, g, b = BACKGROUNDS[name]
    return 0.299 * r + 0.587 * g + 0.114 * b


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    size: float
    """Half-width in pixels (circle radius, half the square's side, the triangle's circumradius)."""
    position: tuple[float, float]
    """Centre (x, y) at frame 0."""
    velocity: tuple[float, float]
    """Pixels per frame."""


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: str
    size: int = 64

    @classmethod
    def from_seed(cls, seed: int, size: int = 64) -> "Scene":
        rng = np.random.default_rng(seed)
        count = int(rng.integers(1, MAX_SHAPES + 1))
        while True:  # every shape must stand out from the background in gray level, or its edges vanish
            colors = [str(c) for c in rng.choice(list(COLORS), size=count, replace=False)]
            backgrounds = [b for b in BACKGROUNDS if b not in colors
                           and all(abs(luma(b) - luma(c)) >= MIN_CONTRAST for c in colors)]
            if backgrounds:
                break
        background = str(rng.choice(backgrounds))
        kinds = [str(k) for k in rng.choice(SHAPES, size=count, replace=False)]
        shapes = []
        for color, kind in zip(colors, kinds):
            half = float(rng.uniform(*HALF_WIDTH) * size)
            position = tuple(float(v) for v in rng.uniform(half, size - half, 2))
            speed, angle = float(rng.uniform(0.01, 0.03) * size), float(rng.uniform(0, 2 * np.pi))
            shapes.append(Shape(kind, color, half, position,
                                (speed * np.cos(angle), speed * np.sin(angle))))
        return cls(tuple(shapes), background, size)

    @property
    def prompt(self) -> str:
        names = [f"a {s.color} {s.kind}" for s in self.shapes]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        return f"{listed} on a {self.background} background"

    def centre(self, shape: Shape, t: int) -> tuple[float, float]:
        """Where ``shape`` is at frame ``t``: straight lines, reflected at the borders (inset by its half-width)."""
        out = []
        for p, v in zip(shape.position, shape.velocity):
            lo, hi = shape.size, self.size - shape.size
            span = hi - lo
            x = (p - lo + v * t) % (2 * span)
            out.append(lo + (x if x <= span else 2 * span - x))
        return out[0], out[1]


def _draw(canvas: np.ndarray, kind: str, centre: tuple[float, float], half: float, value) -> None:
    x, y = centre
    if kind == "circle":
        cv2.circle(canvas, (round(x), round(y)), max(1, round(half)), value, -1, lineType=cv2.LINE_8)
    elif kind == "square":
        cv2.rectangle(canvas, (round(x - half), round(y - half)), (round(x + half), round(y + half)), value, -1,
                      lineType=cv2.LINE_8)
    else:
        angles = np.deg2rad([-90, 30, 150])
        points = np.stack([x + half * np.cos(angles), y + half * np.sin(angles)], 1).round().astype(np.int32)
        cv2.fillPoly(canvas, [points], value, lineType=cv2.LINE_8)


def render(scene: Scene, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames uint8 ``[T, H, W, 3]`` and shape masks bool ``[T, shapes, H, W]`` (what is visible of each shape; later
    shapes are drawn over earlier ones)."""
    n = scene.size
    frames = np.empty((num_frames, n, n, 3), np.uint8)
    masks = np.zeros((num_frames, len(scene.shapes), n, n), bool)
    for t in range(num_frames):
        frame = np.empty((n, n, 3), np.uint8)
        frame[:] = BACKGROUNDS[scene.background]
        owner = np.full((n, n), -1, np.int16)
        for i, shape in enumerate(scene.shapes):
            _draw(frame, shape.kind, scene.centre(shape, t), shape.size, BACKGROUNDS[shape.color])
            _draw(owner, shape.kind, scene.centre(shape, t), shape.size, i)
        frames[t] = frame
        for i in range(len(scene.shapes)):
            masks[t, i] = owner == i
    return frames, masks


def nearest_color(rgb, names=tuple(COLORS)) -> str:
    """The named colour closest (Euclidean, RGB) to ``rgb``."""
    rgb = np.asarray(rgb, np.float64)
    return min(names, key=lambda name: float(((np.asarray(BACKGROUNDS[name]) - rgb) ** 2).sum()))
