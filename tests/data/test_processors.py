"""Parity of vlpeft_jax.data.processors with transformers' image processors (PIL backend) and VLM processors.

Every reference object (image processor, tokenizer, LlavaProcessor, Blip2Processor, InstructBlipProcessor) is
built inside the test from tiny configs (:mod:`tests.data.vlm_dirs`); our side reads the directories they save.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlpeft_jax.data import processors
from vlpeft_jax.data.images import ImagePreprocessor
from vlpeft_jax.errors import InputError

transformers = pytest.importorskip("transformers")


# ------------------------------------------------------------------------------------------------ images
def _images() -> dict[str, Image.Image]:
    """Real PIL images of several sizes and modes (noise, so that every resampling detail shows)."""
    rng = np.random.default_rng(0)
    noise = lambda h, w, c: rng.integers(0, 256, (h, w, c), dtype=np.uint8)  # noqa: E731
    rgba = noise(33, 47, 4)
    rgba[..., 3] = np.linspace(0, 255, 47).astype(np.uint8)[None, :]  # every alpha from clear to opaque
    palette = Image.fromarray(noise(40, 28, 3)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette_t = palette.copy()
    palette_t.info["transparency"] = 3
    gray_t = Image.fromarray(noise(30, 30, 1)[..., 0], "L")
    gray_t.info["transparency"] = 128
    return {
        "rgb_wide": Image.fromarray(noise(37, 61, 3)),
        "rgb_tall": Image.fromarray(noise(90, 41, 3)),
        "rgb_square": Image.fromarray(noise(64, 64, 3)),
        "rgb_small": Image.fromarray(noise(9, 13, 3)),  # smaller than every crop below
        "rgba": Image.fromarray(rgba, "RGBA"),
        "la": Image.fromarray(noise(21, 17, 2), "LA"),
        "l": Image.fromarray(noise(50, 35, 1)[..., 0], "L"),
        "l_transparent": gray_t,
        "p": palette,
        "p_transparent": palette_t,
        "cmyk": Image.fromarray(noise(26, 44, 4), "CMYK"),
    }


IMAGES = _images()

# (reference class, constructor kwargs); sizes kept small so that the test is fast.
IMAGE_SETTINGS = {
    "clip": ("CLIPImageProcessorPil", {"size": {"shortest_edge": 30}, "crop_size": {"height": 28, "width": 28}}),
    "clip_int_sizes": ("CLIPImageProcessorPil", {"size": 26, "crop_size": 24, "resample": 2}),
    "clip_rect_crop": ("CLIPImageProcessorPil", {"size": {"shortest_edge": 20}, "crop_size": {"height": 24,
                                                                                            "width": 16}}),
    "blip": ("BlipImageProcessorPil", {"size": {"height": 24, "width": 24}}),
    "blip_rect_bilinear": ("BlipImageProcessorPil", {"size": {"height": 20, "width": 32}, "resample": 2,
                                                     "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.3, 0.4]}),
    "llava_pad": ("LlavaImageProcessorPil", {"size": {"shortest_edge": 28}, "crop_size": {"height": 28, "width": 28},
                                             "do_pad": True}),
    "llava": ("LlavaImageProcessorPil", {"size": {"shortest_edge": 28}, "crop_size": {"height": 28, "width": 28}}),
    "vit": ("ViTImageProcessorPil", {"size": {"height": 20, "width": 20}, "do_convert_rgb": True}),
    "siglip": ("SiglipImageProcessorPil", {"size": {"height": 24, "width": 24}}),
    "no_rescale_no_normalize": ("CLIPImageProcessorPil", {"size": {"shortest_edge": 24}, "crop_size": 24,
                                                          "do_rescale": False, "do_normalize": False}),
}


def _reference(name: str):
    cls_name, kwargs = IMAGE_SETTINGS[name]
    return getattr(transformers, cls_name)(**kwargs)


@pytest.mark.parametrize("setting", sorted(IMAGE_SETTINGS))
def test_pixel_values_equal_transformers_pil_processor(setting, tmp_path):
    ref = _reference(setting)
    ref.save_pretrained(tmp_path)  # preprocessor_config.json, as transformers writes it
    ours = ImagePreprocessor.from_pretrained(tmp_path)
    worst = 0.0
    for name, img in IMAGES.items():
        want = ref(img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)  # NCHW -> HWC
        got = ours(img)
        assert got.shape == want.shape and got.dtype == np.float32, (setting, name)
        diff = float(np.abs(got - want).max())
        worst = max(worst, diff)
        assert diff <= 1e-5, f"{setting} on {name}: max abs diff {diff}"
    # the batch path (what the data loaders use) is the same numbers
    want = ref(list(IMAGES.values()), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours.batch(list(IMAGES.values())), want, rtol=0, atol=1e-5)
    print(f"{setting}: max abs diff {worst:.3g}")


def test_reads_processor_config_json_and_files(tmp_path):
    """transformers 5 saves the image settings inside processor_config.json; files decode the same as PIL."""
    ref = _reference("llava_pad")
    ref_dir = tmp_path / "ckpt"
    tok = _tiny_tokenizer()
    transformers.LlavaProcessor(image_processor=ref, tokenizer=tok, patch_size=14).save_pretrained(ref_dir)
    assert not (ref_dir / "preprocessor_config.json").exists() and (ref_dir / "processor_config.json").exists()
    ours = processors.image_preprocessor_from_pretrained(ref_dir)
    assert ours.pad_to_square and ours.height_width == (28, 28)
    for name in ("rgba", "p_transparent", "cmyk"):
        ext = "jpg" if name == "cmyk" else "png"
        path = tmp_path / f"{name}.{ext}"
        IMAGES[name].save(path)
        with Image.open(path) as reread:
            want = ref(reread, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        np.testing.assert_allclose(ours(path), want, rtol=0, atol=1e-5)


def test_image_config_errors(tmp_path):
    base = {"image_processor_type": "CLIPImageProcessor"}
    with pytest.raises(InputError, match="LlavaNextImageProcessor.*anyres"):
        processors.image_preprocessor_from_config({"image_processor_type": "LlavaNextImageProcessor"})
    with pytest.raises(InputError, match=r"\['image_grid_pinpoints'\].*anyres"):
        processors.image_preprocessor_from_config({**base, "image_grid_pinpoints": [[336, 672]]})
    with pytest.raises(InputError, match=r"\['crop_pct'\]"):
        processors.image_preprocessor_from_config({**base, "crop_pct": 0.9})
    with pytest.raises(InputError, match="do_pad.*BlipImageProcessor"):
        processors.image_preprocessor_from_config({"image_processor_type": "BlipImageProcessor", "do_pad": True})
    with pytest.raises(InputError, match="vary"):
        processors.image_preprocessor_from_config({**base, "do_center_crop": False})
    with pytest.raises(InputError, match="longest_edge"):
        processors.image_preprocessor_from_config({**base, "size": {"longest_edge": 30}})
    # no type named: the model type's processor (BLIP: no crop), else CLIP's (shortest edge + centre crop)
    assert processors.image_preprocessor_from_config({"size": 30}, model_type="blip-2").crop == "none"
    assert processors.image_preprocessor_from_config({"size": 30}).crop == "center"
    with pytest.raises(InputError, match="no image processor settings"):
        processors.image_preprocessor_from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(InputError, match="preprocessor_config.json"):
        processors.image_preprocessor_from_pretrained(tmp_path)
    # an image the processor cannot read: InputError naming the file
    pre = processors.image_preprocessor_from_config({**base, "size": 8, "crop_size": 8})
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(InputError, match="broken.png"):
        pre(bad)
    with pytest.raises(InputError, match="missing.jpg"):
        pre.batch([np.zeros((4, 4, 3), np.uint8), tmp_path / "missing.jpg"])


def _tiny_tokenizer():
    from tests.data import vlm_dirs

    return vlm_dirs.word_tokenizer()
