"""Training augmentations of chest films that move the lesion boxes with the pixels.

Plain numpy and scipy.ndimage, so it runs inside Ray Data's map_batches; every draw comes from the
numpy Generator the caller passes, so a seed fixes the output.

Geometry: one random affine (scale, small rotation, translation about the centre) and one random
crop resized back to the full side, composed into a single matrix and applied to the pixels with one
bilinear resample. A box is mapped through the same matrix: the box of its four transformed corners
(a rotated box's bounding box), clipped to the frame. When a box would keep less than
`min_box_visible` of its area inside the frame, the image keeps its original geometry (the draw is
dropped for that image, not the box): a lesion half out of the picture is a label we cannot trust.

No left-right flip, ever: on a chest film the side carries meaning (the heart lies on the image's
right, the patient's left; dextrocardia and situs inversus are findings). Intensity (brightness,
contrast, gamma) is jittered on the [0, 1] grey levels, then clipped and renormalized.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from medfusion.config import AugmentConfig
from medfusion.data.images import MEAN, STD


def random_geometry(rng: np.random.Generator, settings: AugmentConfig) -> np.ndarray | None:
    """A (3, 3) map from input to output normalized (x, y), or None when no geometric draw fires."""
    matrix = np.eye(3)
    if rng.random() < settings.affine_p:
        scale = rng.uniform(1.0 - settings.scale, 1.0 + settings.scale)
        angle = np.deg2rad(rng.uniform(-settings.rotate_deg, settings.rotate_deg))
        shift = rng.uniform(-settings.translate, settings.translate, size=2)
        cos, sin = scale * np.cos(angle), scale * np.sin(angle)
        linear = np.array([[cos, -sin], [sin, cos]])  # no negative determinant: never a mirror image
        centre = np.array([0.5, 0.5])
        matrix[:2, :2] = linear
        matrix[:2, 2] = centre - linear @ centre + shift
    if rng.random() < settings.crop_p:
        side = rng.uniform(settings.crop_min, 1.0)
        x0, y0 = rng.uniform(0.0, 1.0 - side, size=2)
        crop = np.array([[1 / side, 0, -x0 / side], [0, 1 / side, -y0 / side], [0, 0, 1]])
        matrix = crop @ matrix
    return None if np.array_equal(matrix, np.eye(3)) else matrix


def transform_boxes(boxes: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalized xyxy boxes (K, 4) through `matrix`: the clipped boxes (K, 4) and the fraction of each
    transformed box's area that stays inside [0, 1]^2 (K,)."""
    x0, y0, x1, y1 = boxes.T
    corners = np.stack([np.stack([x0, y0]), np.stack([x1, y0]), np.stack([x0, y1]), np.stack([x1, y1])])  # (4, 2, K)
    mapped = np.einsum("ij,cjk->cik", matrix[:2, :2], corners) + matrix[:2, 2, None]  # (4, 2, K)
    moved = np.concatenate([mapped.min(axis=0), mapped.max(axis=0)]).T  # (K, 4) xyxy
    clipped = np.clip(moved, 0.0, 1.0)
    area = (moved[:, 2] - moved[:, 0]) * (moved[:, 3] - moved[:, 1])
    kept = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    return clipped, np.where(area > 0, kept / np.maximum(area, 1e-12), 0.0)


def warp(grey: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Resample an (S, S) image so that the pixel at input (x, y) lands at `matrix` @ (x, y); black outside."""
    side = grey.shape[-1]
    inverse = np.linalg.inv(matrix)  # output -> input, normalized (x, y)
    linear, shift = inverse[:2, :2], inverse[:2, 2]
    # Pixel centres sit at (i + 0.5) / S; scipy indexes (row, col) = (y, x), hence the swaps.
    offset = linear @ np.full(2, 0.5) + side * shift - 0.5
    return ndimage.affine_transform(
        grey, linear[::-1, ::-1], offset=offset[::-1], order=1, mode="constant", cval=0.0, prefilter=False
    )


def jitter_intensity(grey: np.ndarray, rng: np.random.Generator, settings: AugmentConfig) -> np.ndarray:
    """Gamma, contrast about the mean and brightness on [0, 1] grey levels, clipped back to [0, 1]."""
    gamma = np.exp(rng.uniform(-np.log1p(settings.gamma), np.log1p(settings.gamma)))
    contrast = rng.uniform(1.0 - settings.contrast, 1.0 + settings.contrast)
    brightness = rng.uniform(-settings.brightness, settings.brightness)
    grey = np.power(grey, gamma)
    grey = (grey - grey.mean()) * contrast + grey.mean() + brightness
    return np.clip(grey, 0.0, 1.0)


def augment(
    image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator, settings: AugmentConfig
) -> tuple[np.ndarray, np.ndarray]:
    """One training image and its lesion boxes, transformed together.

    Args:
        image: (1, S, S), uint8 grey levels (a model batch's) or float32 normalized as
            medfusion.data.images.normalize returns it.
        boxes: (K, 4) normalized xyxy, the image's real boxes only ((0, 4) when it has none).
        rng: the source of every random draw.
        settings: what to draw; `enabled=False` returns the inputs unchanged.

    Returns:
        The image in the input's dtype and scale (grey levels clipped to [0, 1] before normalizing,
        rounded for uint8) and the boxes (K, 4) float32, moved with the pixels and clipped to [0, 1].
    """
    if not settings.enabled:
        return image, boxes
    quantized = image.dtype == np.uint8
    # (S, S) grey levels in [0, 1]
    grey = image[0] / 255.0 if quantized else image[0].astype(np.float64) * STD + MEAN
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    matrix = random_geometry(rng, settings)
    if matrix is not None:
        moved, visible = transform_boxes(boxes, matrix)
        if np.all(visible >= settings.min_box_visible):
            grey, boxes = warp(grey, matrix), moved
    if rng.random() < settings.intensity_p:
        grey = jitter_intensity(np.clip(grey, 0.0, 1.0), rng, settings)
    grey = np.clip(grey, 0.0, 1.0)
    out = np.rint(grey * 255.0).astype(np.uint8) if quantized else ((grey - MEAN) / STD).astype(np.float32)
    return out[None], boxes.astype(np.float32)
