"""Drawing shapes scenes: vectorised rendering to uint8 images and int8 segmentations, patch masks.

:func:`render_batch` draws the objects of many images at once (the generator's path, with luminance noise);
:func:`render_scene` draws one scene without noise; :func:`patch_masks` says which vision patches hold each
object of a segmentation (``0`` background, ``k + 1`` object ``k``).

Example:
    >>> img, seg = render_scene([{"shape": "circle", "center": (8, 8), "radius": 6, "color": "blue"},
    ...                          {"shape": "cross", "center": (24, 24), "radius": 6, "color": "white"}], 32)
    >>> img.shape, sorted(np.unique(seg).tolist())
    ((32, 32, 3), [0, 1, 2])
    >>> patch_masks(seg, 2, 16).astype(int).tolist()
    [[[1, 0], [0, 0]], [[0, 0], [0, 1]]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vlpeft_jax.data.shapes.objects import COLOR_RGB, SHAPES, ShapeObject
from vlpeft_jax.errors import InputError

BACKGROUND_RGB = (28, 28, 34)


def patch_masks(segmentation: np.ndarray, num_objects: int, patch_size: int, min_fraction: float = 0.0) -> np.ndarray:
    """Which ``patch_size`` x ``patch_size`` patches hold each object: ``bool [num_objects, H/p, W/p]``.

    A patch counts when more than ``min_fraction`` of its pixels belong to the object (0.0: any pixel).
    Patches are in row-major order, as a ViT flattens them (``mask.reshape(n, -1)`` gives patch indices).

    Example:
        >>> seg = np.zeros((16, 16), np.int8); seg[0:3, 9:12] = 1
        >>> patch_masks(seg, 1, 8)[0].astype(int).tolist()
        [[0, 1], [0, 0]]
    """
    h, w = segmentation.shape
    if patch_size < 1 or h % patch_size or w % patch_size:
        raise InputError(f"patch_size={patch_size} must divide the image size {h}x{w}")
    gh, gw = h // patch_size, w // patch_size
    seg = segmentation.reshape(gh, patch_size, gw, patch_size)
    ids = np.arange(1, num_objects + 1, dtype=segmentation.dtype)[:, None, None, None, None]
    fraction = (seg[None] == ids).mean(axis=(2, 4))
    return fraction > min_fraction


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Pixel mask of ``shape`` from offsets (dx, dy) to the centre, for radius r (all broadcastable)."""
    adx, ady = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(adx, ady) <= 0.82 * r
    if shape == "triangle":  # pointing up: apex at -r, base at +0.8r, base half-width 0.95r
        return (dy >= -r) & (dy <= 0.8 * r) & (adx <= 0.95 * r * (dy + r) / (1.8 * r))
    if shape == "diamond":
        return adx + ady <= 1.05 * r
    if shape == "cross":
        return ((adx <= 0.33 * r) & (ady <= r)) | ((ady <= 0.33 * r) & (adx <= r))
    raise InputError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


def render_batch(num_images: int, image_size: int,
                 objects: Sequence[tuple[int, int, float, float, float, int, tuple[int, int, int]]],
                 noise: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Draws objects ``(image, slot, cx, cy, radius, shape_id, rgb)``; returns (uint8 images, int8 segmentation).

    Vectorised over objects: for every (slot, shape) the masks of all such objects are computed at once in
    a window around each object (a window per object, not the whole image), then scattered into the
    segmentation; colours come from a per-image palette indexed by the segmentation. Within one slot every
    image appears at most once, so the scatter has no conflicts.
    """
    size = image_size
    seg = np.zeros((num_images, size, size), np.int8)
    if not objects:
        images = np.broadcast_to(np.array(BACKGROUND_RGB, np.uint8), (num_images, size, size, 3))
        if noise is not None:
            images = np.clip(images.astype(np.int16) + noise, 0, 255)
        return images.astype(np.uint8), seg
    table = np.array([o[:6] for o in objects], np.float64)  # image, slot, cx, cy, radius, shape id
    rgb = np.array([o[6] for o in objects], np.uint8)
    img, slot, sid = table[:, 0].astype(np.int64), table[:, 1].astype(np.int64), table[:, 5].astype(np.int64)
    cx, cy, r = table[:, 2], table[:, 3], table[:, 4]
    win = min(size, int(np.ceil(2 * r.max())) + 4)
    x0 = np.clip(np.floor(cx - win / 2).astype(np.int64), 0, size - win)
    y0 = np.clip(np.floor(cy - win / 2).astype(np.int64), 0, size - win)
    offs = np.arange(win)
    for k in range(int(slot.max()) + 1):
        for s_id, shape in enumerate(SHAPES):
            sel = np.flatnonzero((slot == k) & (sid == s_id))
            if not len(sel):
                continue
            xs = x0[sel, None] + offs[None]  # [m, win] pixel columns
            ys = y0[sel, None] + offs[None]
            dx = (xs + 0.5 - cx[sel, None])[:, None, :]  # pixel centres minus object centre
            dy = (ys + 0.5 - cy[sel, None])[:, :, None]
            mask = _shape_mask(shape, dx, dy, r[sel, None, None])
            ii, yy, xx = img[sel, None, None], ys[:, :, None], xs[:, None, :]
            seg[ii, yy, xx] = np.where(mask, np.int8(k + 1), seg[ii, yy, xx])
    palette = np.zeros((num_images, int(slot.max()) + 2, 3), np.uint8)
    palette[:, 0] = BACKGROUND_RGB
    palette[img, slot + 1] = rgb
    flat = (np.arange(num_images, dtype=np.int64)[:, None, None] * palette.shape[1] + seg).ravel()
    images = np.take(palette.reshape(-1, 3), flat, axis=0).reshape(num_images, size, size, 3)
    if noise is not None:
        images = np.clip(images.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return images, seg


def render_scene(objects: Sequence[dict[str, Any] | ShapeObject], image_size: int = 64) -> tuple[np.ndarray,
                                                                                                   np.ndarray]:
    """Renders one scene without noise: ``(uint8 [H, W, 3] image, int8 [H, W] segmentation)``.

    Each object gives ``shape``, ``center`` (x, y in pixels), ``radius`` and ``color`` (a name) or ``rgb``.

    Example:
        >>> img, seg = render_scene([{"shape": "square", "center": (16, 16), "radius": 10, "color": "red"}], 32)
        >>> int(seg.max()), tuple(int(v) for v in img[16, 16])
        (1, (220, 50, 47))
    """
    rows = []
    for k, o in enumerate(objects):
        get = (lambda key, o=o: getattr(o, key)) if isinstance(o, ShapeObject) else o.get
        shape = get("shape")
        if shape not in SHAPES:
            raise InputError(f"object {k}: unknown shape {shape!r}; valid: {', '.join(SHAPES)}")
        rgb = get("rgb") or COLOR_RGB[get("color")]
        cx, cy = get("center")
        rows.append((0, k, float(cx), float(cy), float(get("radius")), SHAPES.index(shape), tuple(rgb)))
    images, seg = render_batch(1, image_size, rows, None)
    return images[0], seg[0]
