"""Image decoding and preprocessing shared by every data source.

Images travel through the data pipeline as ``uint8`` RGB arrays ``[height, width, 3]`` (small, exact) and
become ``float32`` only in a batch: resized to the vision tower's input size, scaled to ``[0, 1]`` and
normalised with the tower's mean/std (``(x / 255 - mean) / std``, as Hugging Face image processors do).
Grayscale, palette, CMYK, 16-bit and RGBA/LA images are converted to RGB rather than rejected (alpha is
composited onto a white background, which is how viewers show it); a missing or undecodable file raises
:class:`~vlpeft_jax.errors.InputError` naming the file.

Example:
    >>> import numpy as np
    >>> from vlpeft_jax.data.images import ImagePreprocessor
    >>> pre = ImagePreprocessor(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    >>> x = pre(np.full((64, 48, 3), 255, np.uint8))
    >>> x.shape, x.dtype, float(x.max())
    ((32, 32, 3), dtype('float32'), 1.0)
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from vlpeft_jax.errors import InputError

# Normalisation constants of common vision towers (Hugging Face image-processor defaults).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF_MEAN = (0.5, 0.5, 0.5)  # ViT (google/vit-*), SigLIP
HALF_STD = (0.5, 0.5, 0.5)

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
# Hugging Face preprocessor_config.json stores PIL resample codes as ints.
_RESAMPLE_BY_CODE = {int(v): k for k, v in _RESAMPLE.items()}


def _as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise InputError(f"image size must be an int or (height, width), got {size!r}")
    return size  # type: ignore[return-value]


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Converts any PIL mode to RGB; transparency is composited onto ``background``.

    Example:
        >>> from PIL import Image
        >>> to_rgb(Image.new("LA", (2, 2), (128, 0))).getpixel((0, 0))
        (255, 255, 255)
    """
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit grayscale: scale the value range to 8 bits before converting (PIL would clip).
        arr = np.asarray(image, dtype=np.float64)
        hi = float(arr.max()) if arr.size else 0.0
        arr = arr / hi * 255.0 if hi > 255 else arr
        image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def array_to_rgb_uint8(array: np.ndarray, name: str = "image") -> np.ndarray:
    """Returns a ``uint8 [h, w, 3]`` RGB copy of an array image in HW, HW1, HW3 or HW4 layout.

    Float arrays are taken to be in ``[0, 1]``; RGBA is composited onto white.

    Example:
        >>> array_to_rgb_uint8(np.zeros((4, 5), np.uint8)).shape
        (4, 5, 3)
    """
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise InputError(f"{name}: expected an image array [h, w], [h, w, 1], [h, w, 3] or [h, w, 4]; "
                         f"got shape {a.shape}")
    if np.issubdtype(a.dtype, np.floating):
        a = np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        if a.size and (a.min() < 0 or a.max() > 255):
            raise InputError(f"{name}: integer image values must lie in [0, 255]; got range "
                             f"[{a.min()}, {a.max()}] with dtype {a.dtype}")
        a = a.astype(np.uint8)
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=-1)
    if a.shape[-1] == 4:
        alpha = a[..., 3:4].astype(np.float32) / 255.0
        rgb = a[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return np.clip(np.round(rgb), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def decode_image(data: bytes | str | os.PathLike | Image.Image | np.ndarray, name: str | None = None) -> np.ndarray:
    """Decodes a file path, encoded bytes, a PIL image or an array into ``uint8 [h, w, 3]`` RGB.

    Raises :class:`InputError` naming the file when it is missing, unreadable or not a valid image.

    Example:
        >>> decode_image(np.zeros((2, 3, 4), np.uint8)).shape
        (2, 3, 3)
    """
    label = name or (str(data) if isinstance(data, (str, os.PathLike)) else "image")
    if isinstance(data, np.ndarray):
        return array_to_rgb_uint8(data, label)
    if isinstance(data, Image.Image):
        return np.asarray(to_rgb(data), dtype=np.uint8).copy()
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise InputError(f"image file not found: {path}")
        source: Any = path
    elif isinstance(data, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(data))
    else:
        raise InputError(f"{label}: cannot read an image from a {type(data).__name__}")
    try:
        with Image.open(source) as img:
            img.load()
            rgb = to_rgb(img)
            return np.asarray(rgb, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot decode image {label}: {type(e).__name__}: {e}") from None


def check_image_file(path: str | os.PathLike) -> None:
    """Cheap validity check (exists, header parses, ``PIL.Image.verify`` passes) without decoding pixels.

    Example:
        >>> check_image_file("/nonexistent.png")
        Traceback (most recent call last):
        ...
        vlpeft_jax.errors.InputError: image file not found: /nonexistent.png
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"image file not found: {p}")
    try:
        with Image.open(p) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise InputError(f"cannot decode image {p}: {type(e).__name__}: {e}") from None


def resize_uint8(image: np.ndarray, size: int | Sequence[int], resample: str = "bicubic") -> np.ndarray:
    """Resizes a ``uint8 [h, w, 3]`` image to ``size`` (int or (height, width)); a no-op at that size.

    Example:
        >>> resize_uint8(np.zeros((8, 8, 3), np.uint8), (4, 6)).shape
        (4, 6, 3)
    """
    h, w = _as_hw(size)
    if image.shape[0] == h and image.shape[1] == w:
        return image
    if resample not in _RESAMPLE:
        raise InputError(f"unknown resample {resample!r}; valid: {', '.join(_RESAMPLE)}")
    return np.asarray(Image.fromarray(image).resize((w, h), _RESAMPLE[resample]), dtype=np.uint8)


IMAGE_MODES = ("eager", "lazy")


@dataclasses.dataclass(frozen=True)
class ImagePreprocessor:
    """A vision tower's input transform: RGB, resize to ``size``, rescale to [0, 1], normalise.

    Attributes:
        size: the tower's input size, an int (square) or (height, width).
        mean, std: per-channel normalisation applied after rescaling to [0, 1].
        resample: PIL resampling filter name ("bicubic" for CLIP/SigLIP/ViT, "bilinear" for some others).
        crop: "none" resizes straight to ``size``; "center" resizes the shortest edge and center-crops,
            as CLIP's processor does.

    Example:
        >>> pre = ImagePreprocessor(size=(16, 16), mean=CLIP_MEAN, std=CLIP_STD)
        >>> pre.batch([np.zeros((20, 30, 3), np.uint8)] * 2).shape
        (2, 16, 16, 3)
    """

    size: int | tuple[int, int] = 224
    mean: tuple[float, ...] = HALF_MEAN
    std: tuple[float, ...] = HALF_STD
    resample: str = "bicubic"
    crop: str = "none"

    def __post_init__(self) -> None:
        _as_hw(self.size)
        if len(self.mean) != 3 or len(self.std) != 3:
            raise InputError(f"mean and std need 3 channels; got mean={self.mean}, std={self.std}")
        if any(s <= 0 for s in self.std):
            raise InputError(f"std must be positive; got {self.std}")
        if self.resample not in _RESAMPLE:
            raise InputError(f"unknown resample {self.resample!r}; valid: {', '.join(_RESAMPLE)}")
        if self.crop not in ("none", "center"):
            raise InputError(f"crop must be 'none' or 'center'; got {self.crop!r}")

    @property
    def height_width(self) -> tuple[int, int]:
        return _as_hw(self.size)

    def to_uint8(self, image: Any, name: str | None = None) -> np.ndarray:
        """Decodes (if needed), converts to RGB and resizes: ``uint8 [height, width, 3]``."""
        rgb = decode_image(image, name)
        h, w = self.height_width
        if self.crop == "center" and rgb.shape[:2] != (h, w):
            scale = max(h / rgb.shape[0], w / rgb.shape[1])
            rh, rw = max(h, round(rgb.shape[0] * scale)), max(w, round(rgb.shape[1] * scale))
            rgb = resize_uint8(rgb, (rh, rw), self.resample)
            top, left = (rh - h) // 2, (rw - w) // 2
            return np.ascontiguousarray(rgb[top:top + h, left:left + w])
        return resize_uint8(rgb, (h, w), self.resample)

    def normalize(self, image_uint8: np.ndarray) -> np.ndarray:
        """``(x / 255 - mean) / std`` in float32 for any leading batch shape."""
        x = np.asarray(image_uint8, dtype=np.float32) * np.float32(1.0 / 255.0)
        return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)

    def __call__(self, image: Any, name: str | None = None) -> np.ndarray:
        return self.normalize(self.to_uint8(image, name))

    def batch(self, images: Sequence[Any]) -> np.ndarray:
        """Stacks preprocessed images: ``float32 [n, height, width, 3]`` (NHWC)."""
        h, w = self.height_width
        if not len(images):
            return np.zeros((0, h, w, 3), np.float32)
        return self.normalize(np.stack([self.to_uint8(im) for im in images]))

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> ImagePreprocessor:
        """Reads size, mean, std and resampling from a Hugging Face ``preprocessor_config.json``.

        Understands ``size`` as an int, ``{"height", "width"}`` or ``{"shortest_edge"}`` (then uses
        ``crop_size`` and a center crop, as CLIP does).
        """
        path = Path(model_dir) / "preprocessor_config.json"
        if not path.is_file():
            raise InputError(f"no preprocessor_config.json in {model_dir}")
        with open(path) as fh:
            cfg = json.load(fh)
        size_cfg = cfg.get("size", 224)
        crop = "none"
        if isinstance(size_cfg, dict):
            if "height" in size_cfg and "width" in size_cfg:
                size: int | tuple[int, int] = (int(size_cfg["height"]), int(size_cfg["width"]))
            elif "shortest_edge" in size_cfg:
                crop_cfg = cfg.get("crop_size", size_cfg["shortest_edge"])
                if isinstance(crop_cfg, dict):
                    size = (int(crop_cfg["height"]), int(crop_cfg["width"]))
                else:
                    size = int(crop_cfg)
                crop = "center" if cfg.get("do_center_crop", True) else "none"
            else:
                raise InputError(f"{path}: unsupported 'size' {size_cfg!r}")
        else:
            size = int(size_cfg)
        resample = cfg.get("resample", "bicubic")
        if isinstance(resample, int):
            resample = _RESAMPLE_BY_CODE.get(resample, "bicubic")
        mean = tuple(cfg.get("image_mean", HALF_MEAN))
        std = tuple(cfg.get("image_std", HALF_STD))
        if not cfg.get("do_normalize", True):
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return cls(size=size, mean=mean, std=std, resample=resample, crop=crop)


def resolve_image(path: str | os.PathLike, report: Any, what: str, images: str = "eager",
                  image_size: int | tuple[int, int] | ImagePreprocessor | None = None) -> tuple[bool, Any]:
    """Loads (eager) or checks (lazy) one image file; returns (ok, uint8 image or None).

    Problems go to ``report.problem(reason, detail)`` (a :class:`~vlpeft_jax.data.batching.SkipReport`) as
    "missing image file" / "unreadable image", which raises or counts them; ``what`` names the item.
    Shared by the file-based loaders (COCO, VQA, Hugging Face path columns).
    """
    if images not in IMAGE_MODES:
        raise InputError(f"images must be one of {IMAGE_MODES}; got {images!r}")
    path = Path(path)
    if not path.is_file():
        report.problem("missing image file", f"{what}: image file not found: {path}")
        return False, None
    try:
        if images == "lazy":
            check_image_file(path)
            return True, None
        return True, _resize(decode_image(path), image_size)
    except InputError as e:
        report.problem("unreadable image", f"{what}: {e}")
        return False, None


def _resize(image: Any, image_size: int | tuple[int, int] | ImagePreprocessor | None) -> Any:
    if image_size is None:
        return image
    if isinstance(image_size, ImagePreprocessor):
        return image_size.to_uint8(image)
    return resize_uint8(image, image_size)
