"""The demo world (issue 20's data) and its quality metrics: deterministic scenes, metrics that separate the true
video from noise."""

from __future__ import annotations

import numpy as np

from demo.metrics import (background_accuracy, background_holds, background_pixels, color_accuracy, edge_f1, edges,
                          seam_ratio, shape_colors)
from demo.world import (BACKGROUNDS, COLORS, HALF_WIDTH, HELD_OUT_SEEDS, MAX_SHAPES, README_SEED, TRAIN_SEEDS, WORDS,
                        Scene, render)


def edge_video(frames: np.ndarray) -> np.ndarray:
    return np.repeat((edges(frames) * 255).astype(np.uint8)[..., None], 3, -1)


def test_scenes_are_functions_of_their_seed_and_prompts_name_them():
    assert not set(TRAIN_SEEDS) & set(HELD_OUT_SEEDS)
    a, b = render(Scene.from_seed(1_000_007), 9), render(Scene.from_seed(1_000_007), 9)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    scene = Scene.from_seed(1_000_007)
    assert all(f"{s.color} {s.kind}" in scene.prompt for s in scene.shapes)
    assert scene.prompt.endswith(f"on a {scene.background} background")
    assert all(s.color in COLORS for s in scene.shapes) and scene.background not in [s.color for s in scene.shapes]


def test_no_scene_has_two_shapes_of_one_kind():
    """The prompt alone says which shape wears which colour only if no two shapes share a kind."""
    scenes = [Scene.from_seed(seed) for seed in list(HELD_OUT_SEEDS)[:200]]
    assert all(len({s.kind for s in scene.shapes}) == len(scene.shapes) for scene in scenes)
    assert {len(scene.shapes) for scene in scenes} == set(range(1, MAX_SHAPES + 1)) == {1, 2}


def test_the_narrowed_world_holds_the_readme_scene_and_keeps_the_tokenizers_words():
    """Issue 40's world: one or two shapes 17-26 px across in six colours; the README's scene is a held-out one of
    it; the tokenizer's words (and so the shipped T5's token ids) are the wider world's, every prompt's words among
    them."""
    assert README_SEED in HELD_OUT_SEEDS
    assert Scene.from_seed(README_SEED).prompt == "a black circle and a yellow square on a blue background"
    scenes = [Scene.from_seed(seed) for seed in range(300)]
    assert {c for scene in scenes for c in [s.color for s in scene.shapes]} == set(COLORS) and len(COLORS) == 6
    assert all(HALF_WIDTH[0] * 64 <= s.size <= HALF_WIDTH[1] * 64 for scene in scenes for s in scene.shapes)
    assert all(set(scene.prompt.replace(",", " ,").split()) <= set(WORDS) for scene in scenes)


def test_metrics_separate_the_true_video_from_noise():
    rng = np.random.default_rng(0)
    for seed in list(HELD_OUT_SEEDS)[:5]:
        scene = Scene.from_seed(seed)
        frames, masks = render(scene, 9)
        control = edge_video(frames)
        assert edge_f1(frames, control) == 1.0
        assert color_accuracy(frames, scene, masks) == 1.0 and background_accuracy(frames, scene, masks) == 1.0
        noise = rng.integers(0, 256, frames.shape).astype(np.uint8)
        assert edge_f1(noise, control) < 0.4 and color_accuracy(noise, scene, masks) < 0.5
        assert background_accuracy(np.full_like(frames, 128) if scene.background != "gray" else frames * 0, scene,
                                   masks) == 0.0
        assert background_pixels(frames, scene, masks).min() == 1.0
        assert shape_colors(frames, scene, masks) == [1.0] * len(scene.shapes)
        # noise's median is near gray, so one shape may match by chance; not every shape
        assert background_pixels(noise, scene, masks).max() < 0.3 and min(shape_colors(noise, scene, masks)) < 0.5
        half = frames.copy()  # the background's left half repainted in another named colour: 0.5 of its pixels
        other = next(c for c in BACKGROUNDS if c != scene.background)
        half[:, :, :32][~masks.any(1)[:, :, :32]] = BACKGROUNDS[other]
        assert 0.4 < background_pixels(half, scene, masks).mean() < 0.6


def test_seam_ratio_sees_a_jump_at_chunk_boundaries():
    frames, _ = render(Scene.from_seed(1_000_001), 21)
    smooth = seam_ratio(frames, [5, 9, 13, 17])
    jumpy = frames.copy()
    for t in (9, 17):  # every later chunk brightened: a visible jump where it starts
        jumpy[t:] = np.clip(jumpy[t:].astype(np.int16) + 12, 0, 255).astype(np.uint8)
    assert 0.5 < smooth < 2.0 and seam_ratio(jumpy, [9, 17]) > 3 * seam_ratio(frames, [9, 17])


def test_background_holds_sees_a_colour_change_at_a_boundary_only():
    scene = Scene.from_seed(1_000_002)
    frames, masks = render(scene, 21)
    other = next(c for c in BACKGROUNDS if c != scene.background)
    repainted = frames.copy()  # from frame 9 on, the background another named colour
    repainted[9:][~masks.any(1)[9:]] = BACKGROUNDS[other]
    assert background_holds(frames, masks, [5, 9, 13, 17])
    assert not background_holds(repainted, masks, [9, 17])  # changes where chunk 2 starts
    assert background_holds(repainted, masks, [5, 13, 17])  # a change inside a chunk is not a boundary's
