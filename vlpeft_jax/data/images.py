"""Image decoding and preprocessing shared by every data source.

Images travel through the data pipeline as ``uint8`` RGB arrays ``[height, width, 3]`` (small, exact) and
become ``float32`` only in a batch. :class:`ImagePreprocessor` follows the steps and the arithmetic of the
Hugging Face image processors' PIL backend (``CLIPImageProcessorPil``, ``BlipImageProcessorPil``,
``LlavaImageProcessorPil`` in transformers 5), so pixel values equal theirs:

1. RGB: images with an alpha band or a ``transparency`` entry are composited onto white, everything else
   goes through ``PIL.Image.convert("RGB")`` (CMYK, palette, grayscale). One deliberate difference: 16/32-bit
   grayscale is scaled to 8 bits instead of clipped (PIL clips 16-bit values at 255, which turns almost
   every 16-bit photo white).
2. optional pad to a square with the mean colour (LLaVA's ``do_pad``), before resizing;
3. resize with PIL's filter, either straight to ``size`` or the shortest edge to ``resize_shortest_edge``
   (the long edge ``int(edge * long / short)``, truncated, as torchvision's ``Resize`` and transformers do);
4. centre crop to ``size``, ``top = (h - crop_h) // 2``; an image smaller than the crop is zero-padded
   around it first (transformers' ``center_crop``);
5. ``float32(uint8 * rescale_factor)`` computed in float64, then ``(x - mean) / std`` in float32.

Steps 1-4 stay in ``uint8`` (:meth:`ImagePreprocessor.to_uint8`, cached by the batch builders), step 5 is
:meth:`ImagePreprocessor.normalize`. Reading a checkpoint's ``preprocessor_config.json`` lives in
:mod:`vlpeft_jax.data.processors`. A missing or undecodable file raises
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
    "hamming": Image.Resampling.HAMMING,
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

    An image has transparency when it has an ``A`` band (RGBA, LA, PA) or a ``transparency`` entry (palette,
    grayscale or RGB PNGs with a tRNS chunk), the rule of transformers' ``convert_to_rgb``. 16/32-bit
    grayscale is scaled to 8 bits (PIL would clip it at 255).

    Example:
        >>> from PIL import Image
        >>> to_rgb(Image.new("LA", (2, 2), (128, 0))).getpixel((0, 0))
        (255, 255, 255)
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit grayscale: scale the value range to 8 bits before converting (PIL would clip).
        arr = np.asarray(image, dtype=np.float64)
        hi = float(arr.max()) if arr.size else 0.0
        arr = arr / hi * 255.0 if hi > 255 else arr
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


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
        alpha = a[..., 3:4] / 255.0  # float64, as transformers' convert_to_rgb
        rgb = alpha * a[..., :3] + (1.0 - alpha) * 255.0
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
    """A vision tower's input transform, step for step as transformers' PIL image processors (module docstring).

    Attributes:
        size: the output size, an int (square) or (height, width).
        mean, std: per-channel normalisation applied after rescaling (``(0, 0, 0)``/``(1, 1, 1)``: none).
        resample: PIL resampling filter name ("bicubic" for CLIP/SigLIP/BLIP, "bilinear" for ViT).
        crop: "none" resizes straight to ``size``; "center" resizes the shortest edge to
            ``resize_shortest_edge`` and centre-crops ``size``, as CLIP's processor does.
        resize_shortest_edge: the shortest edge before a centre crop; None: ``max(size)`` (unless ``resize_hw``).
        resize_hw: resize to this (height, width) before a centre crop instead.
        do_resize: False skips resizing (a centre crop then pads or crops the image as it is).
        rescale_factor: multiplies the uint8 values before normalising; None: no rescaling.
        pad_to_square: pad to a square with the mean colour (``int(mean * 255)``) before resizing, as
            LLaVA's image processor does with ``do_pad``.
        pad_color: the padding colour, ``uint8`` RGB; None: ``int(mean * 255)``.

    Example:
        >>> pre = ImagePreprocessor(size=(16, 16), mean=CLIP_MEAN, std=CLIP_STD)
        >>> pre.batch([np.zeros((20, 30, 3), np.uint8)] * 2).shape
        (2, 16, 16, 3)
        >>> clip = ImagePreprocessor(size=4, crop="center", resize_shortest_edge=5)
        >>> clip.to_uint8(np.zeros((10, 20, 3), np.uint8)).shape  # 10x20 -> 5x10 -> crop 4x4
        (4, 4, 3)
    """

    size: int | tuple[int, int] = 224
    mean: tuple[float, ...] = HALF_MEAN
    std: tuple[float, ...] = HALF_STD
    resample: str = "bicubic"
    crop: str = "none"
    resize_shortest_edge: int | None = None
    resize_hw: tuple[int, int] | None = None
    do_resize: bool = True
    rescale_factor: float | None = 1 / 255
    pad_to_square: bool = False
    pad_color: tuple[int, int, int] | None = None

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
        if self.resize_shortest_edge is not None and self.resize_shortest_edge < 1:
            raise InputError(f"resize_shortest_edge must be a positive int; got {self.resize_shortest_edge!r}")
        if self.resize_shortest_edge is not None and self.resize_hw is not None:
            raise InputError("give resize_shortest_edge or resize_hw, not both")

    @property
    def height_width(self) -> tuple[int, int]:
        return _as_hw(self.size)

    def to_uint8(self, image: Any, name: str | None = None) -> np.ndarray:
        """Decodes (if needed), converts to RGB, pads, resizes and crops: ``uint8 [height, width, 3]``."""
        rgb = decode_image(image, name)
        h, w = self.height_width
        if self.pad_to_square:
            color = self.pad_color if self.pad_color is not None else tuple(int(m * 255) for m in self.mean)
            rgb = _pad_to_square(rgb, color)
        if self.crop == "none":
            if not self.do_resize and rgb.shape[:2] != (h, w):
                raise InputError(f"{name or 'image'}: size {rgb.shape[:2]} is not the expected {(h, w)} and "
                                 "resizing is off (do_resize=False without a centre crop)")
            return resize_uint8(rgb, (h, w), self.resample)
        if self.do_resize and self.resize_hw is not None:
            rgb = resize_uint8(rgb, self.resize_hw, self.resample)
        elif self.do_resize:
            edge = self.resize_shortest_edge or max(h, w)
            rgb = resize_uint8(rgb, shortest_edge_size(rgb.shape[:2], edge), self.resample)
        return center_crop_uint8(rgb, (h, w))

    def normalize(self, image_uint8: np.ndarray) -> np.ndarray:
        """``(x * rescale_factor - mean) / std`` in float32 for any leading batch shape.

        The product is taken in float64 and rounded to float32 before normalising, as transformers' ``rescale``.
        """
        x = np.asarray(image_uint8)
        if self.rescale_factor is not None:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        x = x.astype(np.float32, copy=False)
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
        """The preprocessing of a Hugging Face checkpoint directory (``preprocessor_config.json`` or the
        ``image_processor`` entry of ``processor_config.json``); see
        :func:`vlpeft_jax.data.processors.image_preprocessor_from_pretrained`."""
        from vlpeft_jax.data.processors import image_preprocessor_from_pretrained

        return image_preprocessor_from_pretrained(model_dir)


def shortest_edge_size(hw: tuple[int, int], edge: int) -> tuple[int, int]:
    """(height, width) with the shorter side ``edge`` and the longer ``int(edge * long / short)`` (truncated).

    Example:
        >>> shortest_edge_size((480, 640), 224)
        (224, 298)
    """
    height, width = int(hw[0]), int(hw[1])
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(edge * long / short)
    return (new_long, edge) if width <= height else (edge, new_long)


def center_crop_uint8(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The centre ``size`` window (``top = (h - crop_h) // 2``); a smaller image is zero-padded around it first
    (``ceil`` of half the missing rows/columns above/left), as transformers' ``center_crop``.

    Example:
        >>> center_crop_uint8(np.ones((2, 3, 3), np.uint8), (3, 3))[..., 0].tolist()
        [[0, 0, 0], [1, 1, 1], [1, 1, 1]]
    """
    ch, cw = size
    h, w = image.shape[:2]
    ph, pw = max(ch, h), max(cw, w)
    if (ph, pw) != (h, w):
        top_pad, left_pad = -(-(ph - h) // 2), -(-(pw - w) // 2)
        canvas = np.zeros((ph, pw, *image.shape[2:]), image.dtype)
        canvas[top_pad:top_pad + h, left_pad:left_pad + w] = image
        top, left = (h - ch) // 2 + top_pad, (w - cw) // 2 + left_pad
        image = canvas
    else:
        top, left = (h - ch) // 2, (w - cw) // 2
    top, left = max(0, top), max(0, left)
    return np.ascontiguousarray(image[top:top + ch, left:left + cw])


def _pad_to_square(image: np.ndarray, fill: tuple[int, ...]) -> np.ndarray:
    """Centres the image on a square canvas of its longer side filled with ``fill`` (LLaVA's ``pad_to_square``)."""
    h, w = image.shape[:2]
    if h == w:
        return image
    side = max(h, w)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[...] = np.asarray(fill, np.uint8)
    if w > h:
        start = (side - h) // 2
        canvas[start:start + h] = image
    else:
        start = (side - w) // 2
        canvas[:, start:start + w] = image
    return canvas


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
