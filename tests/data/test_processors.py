"""Parity of vlpeft_jax.data.processors with transformers' image processors (PIL backend) and VLM processors.

Every reference object (image processor, tokenizer, LlavaProcessor, Blip2Processor, InstructBlipProcessor) is
built inside the test from tiny configs (:mod:`tests.data.vlm_dirs`); our side reads the directories they save.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.data import vlm_dirs
from vlpeft_jax.data import processors
from vlpeft_jax.data.images import ImagePreprocessor
from vlpeft_jax.data.processors import IGNORE_INDEX, VLMProcessor
from vlpeft_jax.errors import CheckpointError, ConfigError, InputError

transformers = pytest.importorskip("transformers")


# ------------------------------------------------------------------------------------------------ images
def _images() -> dict[str, Image.Image | np.ndarray]:
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
        "array_rgba": rgba[:, :30].copy(),  # numpy arrays (HWC uint8) go through the array path
        "array_rgb": noise(31, 23, 3),
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
    return vlm_dirs.word_tokenizer()


# ---------------------------------------------------------------------------------------- VLM processors
BATCH_IMAGES = [IMAGES["rgb_wide"], IMAGES["rgba"], IMAGES["l"]]
QUESTIONS = ["What is this ?", "Describe the image .", "Is it a red cat ?"]


def _compare(ours: dict, ref, keys=("input_ids", "attention_mask")) -> float:
    for key in keys:
        np.testing.assert_array_equal(ours[key], np.asarray(ref[key]), err_msg=key)
    want = np.asarray(ref["pixel_values"]).transpose(0, 2, 3, 1)
    diff = float(np.abs(ours["pixel_values"] - want).max())
    assert ours["pixel_values"].shape == want.shape and diff <= 1e-5, diff
    return diff


@pytest.mark.parametrize("chat", [False, True])
def test_llava_inputs_equal_llava_processor(tmp_path, chat):
    d, ref = vlm_dirs.llava_dir(tmp_path, chat_template=chat)
    ours = VLMProcessor.from_pretrained(d, prompt_format="llava-chat" if chat else "llava-1.5")
    assert ours.num_image_tokens == 2 * 2 + 1 - 1 and ours.image_token_id == ref.image_token_id  # 2x2 patches
    texts = [ours.render(q) for q in QUESTIONS]
    if chat:  # the chat template renders what transformers' apply_chat_template renders
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]}]
        assert texts[0] == ref.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    else:
        assert texts[0] == "USER: <image>\nWhat is this ? ASSISTANT:"
    want = ref(images=BATCH_IMAGES, text=texts, padding="max_length", max_length=20, return_tensors="np")
    got = ours.generation_inputs(BATCH_IMAGES, QUESTIONS, max_length=20)
    diff = _compare(got, want)
    assert (got["input_ids"] == ours.image_token_id).sum() == 3 * ours.num_image_tokens
    print(f"llava chat={chat}: ids equal, pixel max abs diff {diff:.3g}")


def test_llava_several_images_per_prompt_and_full_strategy(tmp_path):
    d, ref = vlm_dirs.llava_dir(tmp_path, strategy="full", image_token_attr=False)
    ours = VLMProcessor.from_pretrained(d, prompt_format="llava-1.5")
    assert ours.num_image_tokens == 4 + 1  # 'full' keeps CLS
    images = [[IMAGES["rgb_wide"], IMAGES["p"]], [IMAGES["cmyk"], IMAGES["la"]]]
    texts = [ours.render(q, num_images=2) for q in QUESTIONS[:2]]
    want = ref(images=[im for row in images for im in row], text=texts, padding="longest", return_tensors="np")
    got = ours.generation_inputs(images, QUESTIONS[:2], max_length=want["input_ids"].shape[1])
    _compare(got, want)


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_blip2_inputs_equal_blip2_processor(tmp_path, lm):
    d, ref = vlm_dirs.blip2_dir(tmp_path, lm=lm, num_query_tokens=3)
    ours = VLMProcessor.from_pretrained(d)  # default: BLIP-2's VQA prompt
    assert ours.encoder_decoder == (lm == "t5") and ours.padding_side == ("right" if lm == "t5" else "left")
    texts = [ours.render(q) for q in QUESTIONS]
    assert texts[0] == "Question: What is this ? Answer:"
    want = ref(images=BATCH_IMAGES, text=texts, padding="max_length", max_length=18, return_tensors="np")
    got = ours.generation_inputs(BATCH_IMAGES, QUESTIONS, max_length=18)
    diff = _compare(got, want)
    # captioning: an empty prompt
    caption = VLMProcessor.from_pretrained(d, prompt_format="blip2-caption")
    want = ref(images=BATCH_IMAGES[:2], text=["", ""], padding="max_length", max_length=6, return_tensors="np")
    _compare(caption.generation_inputs(BATCH_IMAGES[:2], [None, ""], max_length=6), want)
    print(f"blip-2 {lm}: ids equal, pixel max abs diff {diff:.3g}")


@pytest.mark.parametrize("lm", ["llama", "t5"])
def test_instructblip_inputs_equal_instructblip_processor(tmp_path, lm):
    d, ref = vlm_dirs.instructblip_dir(tmp_path, lm=lm, num_query_tokens=2)
    ours = VLMProcessor.from_pretrained(d)
    want = ref(images=BATCH_IMAGES, text=QUESTIONS, padding="max_length", max_length=14, return_tensors="np")
    got = ours.generation_inputs(BATCH_IMAGES, QUESTIONS, max_length=14, qformer_max_length=14)
    diff = _compare(got, want, keys=("input_ids", "attention_mask", "qformer_input_ids", "qformer_attention_mask"))
    print(f"instructblip {lm}: ids equal, pixel max abs diff {diff:.3g}")


def test_legacy_blip2_config_without_image_token_index(tmp_path):
    d, _ = vlm_dirs.blip2_dir(tmp_path, image_token_index=False)
    ours = VLMProcessor.from_pretrained(d)
    assert ours.num_image_tokens == 0 and ours.image_token_id is None
    got = ours.generation_inputs(BATCH_IMAGES[:1], QUESTIONS[:1], max_length=12)
    assert ours.tokenizer.convert_tokens_to_ids("<image>") not in got["input_ids"]


def test_training_batch_decoder_only(tmp_path):
    d, _ = vlm_dirs.llava_dir(tmp_path)
    ours = VLMProcessor.from_pretrained(d)
    tok = ours.tokenizer
    targets = ["a red cat", "two dogs on the picture", "no"]
    b, truncated = ours.training_batch(BATCH_IMAGES, QUESTIONS, targets, max_length=24, return_truncated=True)
    assert truncated == 0 and b["pixel_values"].shape == (3, 28, 28, 3)
    for i, (q, t) in enumerate(zip(QUESTIONS, targets, strict=True)):
        ids, mask, labels = b["input_ids"][i], b["attention_mask"][i], b["labels"][i]
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # right padding
        full = tok(f"USER: {'<image>' * ours.num_image_tokens}\n{q} ASSISTANT: {t}")["input_ids"]
        np.testing.assert_array_equal(ids[:n], full + [tok.eos_token_id])  # the whole text, then eos
        prompt_len = len(full) - len(t.split())
        assert (labels[:prompt_len] == IGNORE_INDEX).all() and (labels[n:] == IGNORE_INDEX).all()
        np.testing.assert_array_equal(labels[prompt_len:n], ids[prompt_len:n])
        assert tok.decode(labels[prompt_len:n - 1]) == t
    short = ours.training_batch(BATCH_IMAGES[:1], QUESTIONS[:1], ["two dogs on the picture"], max_length=15,
                                return_truncated=True)
    assert short[1] == 1 and short[0]["attention_mask"].all()
    with pytest.raises(InputError, match="leaving none"):
        ours.training_batch(BATCH_IMAGES[:1], QUESTIONS[:1], ["x"], max_length=8)


def test_training_batch_encoder_decoder(tmp_path):
    d, ref = vlm_dirs.instructblip_dir(tmp_path, lm="t5", num_query_tokens=2)
    ours = VLMProcessor.from_pretrained(d)
    tok = ours.tokenizer
    targets = ["a red cat", "two dogs", "no"]
    b = ours.training_batch(BATCH_IMAGES, QUESTIONS, targets, max_length=14, max_target_length=5,
                            qformer_max_length=14)
    # encoder side: what the processor gives with right padding
    want = ref(images=BATCH_IMAGES, text=QUESTIONS, padding="max_length", max_length=14, return_tensors="np")
    _compare(b, want, keys=("input_ids", "attention_mask", "qformer_input_ids", "qformer_attention_mask"))
    # labels: the target with eos (what T5 tokenizers give for text_target), -100 padding; decoder inputs shifted
    want_labels = tok(text_target=targets, padding="max_length", max_length=5)["input_ids"]
    want_labels = np.where(np.asarray(want_labels) == tok.pad_token_id, IGNORE_INDEX, want_labels)
    np.testing.assert_array_equal(b["labels"], want_labels)
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    shift = T5ForConditionalGeneration(T5Config(d_model=8, d_ff=8, num_layers=1, num_heads=1, vocab_size=len(tok),
                                                decoder_start_token_id=0, pad_token_id=0))._shift_right
    np.testing.assert_array_equal(b["decoder_input_ids"], shift(torch.tensor(b["labels"], dtype=torch.long)).numpy())
    np.testing.assert_array_equal(b["decoder_attention_mask"], (want_labels != IGNORE_INDEX).astype(np.int32))


def test_vlm_bad_input(tmp_path):
    d, _ = vlm_dirs.llava_dir(tmp_path / "llava")
    ours = VLMProcessor.from_pretrained(d, prompt_format={"template": "{prompt}"})
    one = [np.zeros((8, 8, 3), np.uint8)]
    with pytest.raises(InputError, match="0 image token"):  # no marker for one image
        ours.generation_inputs(one, ["what is this ?"], max_length=16)
    with pytest.raises(InputError, match="2 image token"):  # two markers for one image
        ours.generation_inputs(one, ["<image> <image> what"], max_length=16)
    with pytest.raises(InputError, match="max_length=4"):
        ours.generation_inputs(one, ["<image> what is this ?"], max_length=4)
    with pytest.raises(InputError, match="2 image entries for 1 prompts"):
        ours.generation_inputs(one * 2, ["<image>"], max_length=8)
    with pytest.raises(InputError, match="missing.png"):
        ours.generation_inputs([tmp_path / "missing.png"], ["<image>"], max_length=8)
    b2, _ = vlm_dirs.blip2_dir(tmp_path / "blip2")
    blip = VLMProcessor.from_pretrained(b2, prompt_format={"template": "{image} {prompt}"})
    with pytest.raises(InputError, match="before the text"):
        blip.generation_inputs(one, ["what"], max_length=16)
    with pytest.raises(ConfigError, match="unknown field"):
        VLMProcessor.from_pretrained(b2, prompt_format={"template": "{prompt} {answer}"})
    # the vision tower disagrees with the processor's image-token count
    cfg = vlm_dirs.read_json(d / "config.json")
    cfg["vision_config"]["image_size"] = 56
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="image-token count must match"):
        VLMProcessor.from_pretrained(d)
    cfg["vision_config"]["image_size"] = 28
    cfg["vision_feature_select_strategy"] = "cls_only"
    (d / "config.json").write_text(json.dumps(cfg))
    proc_cfg = vlm_dirs.read_json(d / "processor_config.json")
    proc_cfg.pop("vision_feature_select_strategy")
    (d / "processor_config.json").write_text(json.dumps(proc_cfg))
    with pytest.raises(ConfigError, match="cls_only"):
        VLMProcessor.from_pretrained(d)
    cfg["model_type"] = "llava_next"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="anyres"):
        VLMProcessor.from_pretrained(d)
    cfg = vlm_dirs.read_json(b2 / "config.json")
    cfg["image_token_index"] = 3
    (b2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="image_token_index=3"):
        VLMProcessor.from_pretrained(b2)
    ib, _ = vlm_dirs.instructblip_dir(tmp_path / "iblip")
    import shutil

    shutil.rmtree(ib / "qformer_tokenizer")
    with pytest.raises(CheckpointError, match="qformer_tokenizer"):
        VLMProcessor.from_pretrained(ib)


def test_training_batch_blip2_decoder_only(tmp_path):
    """BLIP-2 with OPT: the image block, then ``<s> prompt target </s>``, right-padded; labels on target and eos."""
    d, ref = vlm_dirs.blip2_dir(tmp_path, lm="opt", num_query_tokens=3)
    ours = VLMProcessor.from_pretrained(d)
    b = ours.training_batch(BATCH_IMAGES[:2], QUESTIONS[:2], ["a cat", "two dogs"], max_length=16)
    ref.tokenizer.padding_side = "right"
    texts = [f"{ours.render(q)} {t}" for q, t in zip(QUESTIONS[:2], ["a cat", "two dogs"], strict=True)]
    want = ref(images=BATCH_IMAGES[:2], text=texts, padding="max_length", max_length=15, return_tensors="np")
    for i, n_target in enumerate((2, 2)):
        n = int(want["attention_mask"][i].sum())
        np.testing.assert_array_equal(b["input_ids"][i, :n + 1], list(want["input_ids"][i, :n]) + [2])  # + </s>
        assert b["attention_mask"][i, :n + 1].all() and not b["attention_mask"][i, n + 1:].any()
        np.testing.assert_array_equal(b["labels"][i, n - n_target:n + 1], b["input_ids"][i, n - n_target:n + 1])
        assert (b["labels"][i, :n - n_target] == IGNORE_INDEX).all() and (b["labels"][i, n + 1:] == IGNORE_INDEX).all()
