"""Box-aware augmentations: the box follows the pixels, never a left-right flip, seeds fix the output."""

from __future__ import annotations

import time

import numpy as np
import pytest

from medfusion.config import ConfigError
from medfusion.data.augment import AugmentConfig, augment, transform_boxes
from medfusion.data.images import MEAN, STD

SIDE = 64
LOW, HIGH = (0.0 - MEAN) / STD, (1.0 - MEAN) / STD  # the normalized range of grey levels [0, 1]
GEOMETRY = AugmentConfig(enabled=True, affine_p=1.0, crop_p=1.0, intensity_p=0.0)
EVERYTHING = AugmentConfig(enabled=True, affine_p=1.0, crop_p=1.0, intensity_p=1.0)


def film_with_lesion(box: tuple[float, float, float, float], side: int = SIDE) -> np.ndarray:
    """A mid-grey normalized image (1, S, S) with a white rectangle exactly filling the xyxy `box`."""
    grey = np.full((side, side), 0.3, dtype=np.float32)
    x0, y0, x1, y1 = (round(v * side) for v in box)
    grey[y0:y1, x0:x1] = 1.0
    return ((grey - MEAN) / STD)[None]


def lesion_pixels(image: np.ndarray) -> np.ndarray:
    """(N, 2) normalized (x, y) centres of the pixels brighter than most of the white rectangle."""
    ys, xs = np.nonzero(image[0] * STD + MEAN > 0.9)
    return np.stack([(xs + 0.5) / image.shape[-1], (ys + 0.5) / image.shape[-1]], axis=1)


@pytest.mark.parametrize(
    "box",
    [
        (0.25, 0.25, 0.5, 0.5),
        (0.6, 0.1, 0.9, 0.3),
        (0.0, 0.7, 0.2, 1.0),  # at the frame's edge: often pushed half out
        (0.45, 0.45, 0.55, 0.55),
    ],
)
def test_the_box_follows_the_pixels(box):
    rng = np.random.default_rng(0)
    kept_original = 0
    half_pixel = 0.5 / SIDE + 1e-6
    for _ in range(50):
        image, boxes = augment(film_with_lesion(box), np.array([box], dtype=np.float32), rng, GEOMETRY)
        (x0, y0, x1, y1) = boxes[0]
        assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0
        pixels = lesion_pixels(image)
        assert len(pixels) > 0, "the lesion left the frame although its box stayed"
        inside = (
            (pixels[:, 0] >= x0 - half_pixel)
            & (pixels[:, 0] <= x1 + half_pixel)
            & (pixels[:, 1] >= y0 - half_pixel)
            & (pixels[:, 1] <= y1 + half_pixel)
        )
        assert inside.all(), f"{(~inside).sum()} lesion pixels outside the moved box {boxes[0]}"
        # The box is not just large: the lesion fills a good part of it (a rotation adds the corners).
        covered = (np.ptp(pixels[:, 0]) + 1 / SIDE) * (np.ptp(pixels[:, 1]) + 1 / SIDE)
        assert covered > 0.35 * (x1 - x0) * (y1 - y0)
        kept_original += np.array_equal(boxes[0], np.float32(box))
    assert kept_original < 50, "every draw was dropped"


def test_a_box_pushed_out_of_the_frame_keeps_the_original_geometry():
    box = np.array([[0.0, 0.0, 0.1, 0.1]], dtype=np.float32)
    matrix = np.array([[1.0, 0.0, -0.08], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # 80% of the box leaves
    moved, visible = transform_boxes(box.astype(np.float64), matrix)
    np.testing.assert_allclose(moved, [[0.0, 0.0, 0.02, 0.1]], atol=1e-9)
    np.testing.assert_allclose(visible, [0.2], atol=1e-9)
    settings = AugmentConfig(enabled=True, affine_p=1.0, crop_p=0.0, intensity_p=0.0, translate=0.25, scale=0.0)
    rng = np.random.default_rng(3)
    for _ in range(100):
        image = film_with_lesion(tuple(box[0]))
        out, boxes = augment(image, box, rng, settings)
        if np.array_equal(boxes, box):  # the draw was dropped: pixels untouched too
            np.testing.assert_allclose(out, image, atol=1e-5)
        else:
            width, height = boxes[0, 2] - boxes[0, 0], boxes[0, 3] - boxes[0, 1]
            assert width * height >= 0.5 * 0.01 * 0.999


def test_never_flips_left_and_right():
    # Grey falls from left to right; rotations up to 30 degrees, zooms and crops keep it falling
    # (an intensity jitter is monotone, so it cannot reverse it either): only a mirror would.
    ramp = np.linspace(0.9, 0.1, SIDE, dtype=np.float32)
    image = ((np.tile(ramp, (SIDE, 1)) - MEAN) / STD)[None]
    rng = np.random.default_rng(1)
    strong = AugmentConfig(enabled=True, affine_p=1.0, crop_p=1.0, intensity_p=0.0, rotate_deg=30.0, crop_min=0.5)
    centre = slice(SIDE // 2 - 4, SIDE // 2 + 4)  # inside the input frame whatever the draw
    for _ in range(200):
        out, _ = augment(image, np.zeros((0, 4), np.float32), rng, strong)
        assert np.diff(out[0, centre, centre], axis=1).mean() < 0
        left, right = out[0, :, : SIDE // 2], out[0, :, SIDE // 2 :]
        assert left[left > LOW].mean() > right[right > LOW].mean()  # the frame's black fill aside


def test_disabled_is_the_identity():
    image = film_with_lesion((0.2, 0.2, 0.4, 0.4))
    boxes = np.array([[0.2, 0.2, 0.4, 0.4]], dtype=np.float32)
    out, moved = augment(image, boxes, np.random.default_rng(0), AugmentConfig())
    assert out is image and moved is boxes


def test_same_seed_same_output():
    image = film_with_lesion((0.3, 0.3, 0.6, 0.5))
    boxes = np.array([[0.3, 0.3, 0.6, 0.5]], dtype=np.float32)
    first = augment(image, boxes, np.random.default_rng(7), EVERYTHING)
    again = augment(image, boxes, np.random.default_rng(7), EVERYTHING)
    other = augment(image, boxes, np.random.default_rng(8), EVERYTHING)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])


def test_intensity_jitter_stays_finite_and_in_range():
    rng = np.random.default_rng(2)
    image = rng.uniform(LOW, HIGH, size=(1, SIDE, SIDE)).astype(np.float32)
    strong = AugmentConfig(enabled=True, affine_p=0.0, crop_p=0.0, intensity_p=1.0, brightness=0.5, gamma=1.0)
    for _ in range(100):
        out, boxes = augment(image, np.zeros((0, 4), np.float32), rng, strong)
        assert out.dtype == np.float32 and out.shape == image.shape and boxes.shape == (0, 4)
        assert np.isfinite(out).all()
        assert out.min() >= LOW - 1e-5 and out.max() <= HIGH + 1e-5


def test_fast_enough_at_256_px():
    rng = np.random.default_rng(0)
    image = rng.uniform(LOW, HIGH, size=(1, 256, 256)).astype(np.float32)
    boxes = np.array([[0.3, 0.3, 0.5, 0.5]], dtype=np.float32)
    start = time.perf_counter()
    for _ in range(20):
        augment(image, boxes, rng, EVERYTHING)
    assert (time.perf_counter() - start) / 20 < 0.05  # a few ms on one core; generous for shared CI


@pytest.mark.parametrize(
    "field, value",
    [("affine_p", 1.5), ("scale", 0.5), ("rotate_deg", 45.0), ("crop_min", 0.2), ("min_box_visible", 0.0)],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"data.augment.{field}: must be in"):
        AugmentConfig(**{field: value})


def test_uint8_batches_get_the_same_transform_rounded():
    """A collated batch carries uint8 grey levels: the same draw moves them as it moves the normalized
    floats, and they come back uint8 within one grey level of the float path."""
    grey = (np.random.default_rng(3).uniform(0.0, 1.0, size=(SIDE, SIDE)) * 255).round().astype(np.uint8)
    boxes = np.array([[0.3, 0.3, 0.6, 0.5]], dtype=np.float32)
    as_float = ((grey.astype(np.float32) / 255.0 - MEAN) / STD)[None]
    for seed in range(5):
        quantized, moved = augment(grey[None], boxes, np.random.default_rng(seed), EVERYTHING)
        floating, moved_float = augment(as_float, boxes, np.random.default_rng(seed), EVERYTHING)
        assert quantized.dtype == np.uint8 and quantized.shape == (1, SIDE, SIDE)
        np.testing.assert_array_equal(moved, moved_float)
        expected = np.clip(floating[0] * STD + MEAN, 0.0, 1.0) * 255.0
        assert np.abs(quantized[0].astype(np.float32) - expected).max() <= 0.5 + 1e-3
