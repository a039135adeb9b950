"""The shapes dataset: deterministic, captions true to the pixels, held-out pairs."""

import dataclasses

import numpy as np
import pytest
import torch

from sdlearn import shapes
from sdlearn.shapes import (
    ALL_STYLES,
    COLORS,
    HELD_OUT,
    Scene,
    ShapesDataset,
    caption,
    render,
)


def test_colors_are_well_separated():
    values = np.array(list(COLORS.values()), dtype=float)
    distances = np.linalg.norm(values[:, None] - values[None], axis=-1)
    np.fill_diagonal(distances, np.inf)
    assert distances.min() > 95, distances.min()
    assert {"red", "green", "blue", "yellow", "purple", "orange"} <= set(COLORS)
    assert {"circle", "square", "triangle"} <= set(shapes.SHAPES)


def test_dataset_is_deterministic_by_seed_and_index():
    a = ShapesDataset(length=50, seed=3)
    b = ShapesDataset(length=50, seed=3)
    for i in [0, 7, 49, 7]:  # any order, repeated reads
        x, y = a[i], b[i]
        torch.testing.assert_close(x["pixel_values"], y["pixel_values"])
        assert x["caption"] == y["caption"]
    other = ShapesDataset(length=50, seed=4)
    scenes = [a.scene(i) for i in range(50)]
    assert scenes != [other.scene(i) for i in range(50)]
    assert len(set(scenes)) == 50


def test_items_have_the_documented_form():
    item = ShapesDataset(length=3, image_size=32)[1]
    assert item["pixel_values"].shape == (3, 32, 32)
    assert item["pixel_values"].dtype == torch.float32
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    assert isinstance(item["caption"], str)
    assert {"shape", "color", "size", "position"} <= set(item)


def _drawn(image: np.ndarray) -> np.ndarray:
    return (image != np.array(shapes.BACKGROUND, dtype=np.uint8)).any(-1)


def test_render_draws_exactly_the_scene_color_on_white():
    for i in range(60):
        scene = shapes.random_scene(np.random.default_rng(i))
        image = shapes.render(scene, size=64)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        mask = _drawn(image)
        assert mask.sum() > 20, scene
        assert (image[mask] == np.array(COLORS[scene.color])).all(), scene


def _centroid(image):
    ys, xs = np.nonzero(_drawn(image))
    return xs.mean() / image.shape[1], ys.mean() / image.shape[0]


@pytest.mark.parametrize("seed", range(40))
def test_caption_matches_what_is_drawn(seed):
    rng = np.random.default_rng(seed)
    scene = shapes.random_scene(rng)
    image = shapes.render(scene, size=64)
    text = shapes.caption(scene)
    assert scene.color in text and scene.shape in text and scene.size in text
    phrases = {
        "left": "on the left",
        "right": "on the right",
        "top": "at the top",
        "bottom": "at the bottom",
        "center": "in the center",
    }
    assert phrases[scene.position] in text
    # position: the centroid lies on the named side of the image
    x, y = _centroid(image)
    where = {
        "left": x < 0.4,
        "right": x > 0.6,
        "top": y < 0.4,
        "bottom": y > 0.6,
        "center": 0.4 < x < 0.6 and 0.4 < y < 0.6,
    }
    assert where[scene.position], (text, x, y)
    # size: the bounding box of a large shape is clearly wider or taller
    mask = _drawn(image)
    ys, xs = np.nonzero(mask)
    extent = max(np.ptp(xs), np.ptp(ys)) / 64
    assert (extent > 0.27) if scene.size == "large" else (extent < 0.27), (text, extent)
    # shape: how much of its bounding box the shape fills
    fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    expected = {"square": (0.95, 1.01), "circle": (0.7, 0.9), "triangle": (0.4, 0.65)}
    low, high = expected[scene.shape]
    assert low <= fill <= high, (text, fill)


def test_random_captions_never_say_anything_untrue():
    scene = Scene("square", "orange", "small", "top")
    rng = np.random.default_rng(0)
    texts = {shapes.caption(scene, rng) for _ in range(200)}
    assert len(texts) == len(shapes.TEMPLATES)
    other_words = (set(COLORS) | set(shapes.SHAPES) | set(shapes.SIZES)) - {
        "square",
        "orange",
        "small",
    }
    for text in texts:
        assert not any(word in text.split() for word in other_words), text
        assert "a orange" not in text, text  # the article agrees: "an orange"
    assert "an orange square" in texts


def test_held_out_combinations_never_appear_in_train():
    train = ShapesDataset(split="train", length=3000, seed=0)
    seen = {(train.scene(i).color, train.scene(i).shape) for i in range(len(train))}
    assert not seen & set(HELD_OUT)
    assert len(seen) == len(COLORS) * len(shapes.SHAPES) - len(HELD_OUT)
    held = ShapesDataset(split="held_out", length=300, seed=0)
    seen_held = {(held.scene(i).color, held.scene(i).shape) for i in range(300)}
    assert seen_held == set(HELD_OUT)


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="unknown color 'pink'"):
        Scene("circle", "pink", "small", "left")
    with pytest.raises(ValueError, match="unknown split 'test'"):
        ShapesDataset(split="test")
    with pytest.raises(ValueError, match="at least 8 pixels"):
        shapes.render(Scene("circle", "red", "small", "left"), size=4)
    with pytest.raises(IndexError):
        ShapesDataset(length=3)[3]
    with pytest.raises(ValueError, match=r"multiple of rows=4, got \(6, 2, 2, 3\)"):
        shapes.image_grid(np.zeros((6, 2, 2, 3)), rows=4)


def test_image_grid_and_to_image():
    images = np.arange(6 * 2 * 3 * 3).reshape(6, 2, 3, 3)
    grid = shapes.image_grid(images, rows=2)
    assert grid.shape == (4, 9, 3)
    np.testing.assert_array_equal(grid[:2, 3:6], images[1])
    np.testing.assert_array_equal(grid[2:, :3], images[3])
    pixels = torch.tensor([-1.0, 0.0, 1.0]).view(3, 1, 1)
    np.testing.assert_array_equal(shapes.to_image(pixels)[0, 0], [0, 128, 255])


def test_new_shapes_are_drawn_only_when_asked_for():
    from sdlearn.shapes import ALL_SHAPES, NEW_SHAPES

    base = ShapesDataset("train", length=300, seed=2)
    assert not {base.scene(i).shape for i in range(300)} & set(NEW_SHAPES)
    rings = ShapesDataset("train", length=20, seed=2, shapes=("ring",))
    items = [rings[i] for i in range(20)]
    assert all(" ring" in item["caption"] for item in items)
    assert {item["shape"] for item in items} == {ALL_SHAPES.index("ring")}
    with pytest.raises(ValueError, match="expected shapes among"):
        ShapesDataset("train", shapes=("star",))


def test_the_hollow_style_is_drawn_only_when_asked_for():
    base = ShapesDataset("train", length=200, seed=4)
    hollow = ShapesDataset("train", length=200, seed=4, styles=("hollow",))
    assert all(base.scene(i).style == "filled" for i in range(200))
    # one style draws nothing from the generator: the same scenes, hollow
    assert all(
        hollow.scene(i) == dataclasses.replace(base.scene(i), style="hollow")
        for i in range(200)
    )
    item = hollow[0]
    assert "hollow" in item["caption"] and ALL_STYLES[item["style"]] == "hollow"
    both = ShapesDataset("all", length=200, seed=4, styles=ALL_STYLES)
    assert {both.scene(i).style for i in range(200)} == set(ALL_STYLES)
    # a hollow shape is its filled self with a white hole
    scene = dataclasses.replace(base.scene(0), style="hollow")
    drawn = (render(scene) != 255).any(-1)
    solid = (render(dataclasses.replace(scene, style="filled")) != 255).any(-1)
    assert not (drawn & ~solid).any() and 0.5 < drawn.sum() / solid.sum() < 0.85
    assert caption(Scene("square", "orange", "small", "left", style="hollow")) == (
        "a small orange hollow square on the left"
    )
    with pytest.raises(ValueError, match="style"):
        ShapesDataset(styles=("striped",))
    with pytest.raises(ValueError, match="style"):
        Scene("circle", "red", "small", "left", style="striped")
