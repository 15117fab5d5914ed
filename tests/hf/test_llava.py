"""Parity of LLaVA loaded by ``load_llava`` with transformers' ``LlavaForConditionalGeneration``; peft on a VLM.

Tiny random LLaVAs (CLIP tower 16x16 images with 8x8 patches, 2 layers; a LLaMA or a Qwen2 LM) are built with
transformers inside the test, saved with ``save_pretrained`` and loaded with ``load_llava``. Compared in
fp32: logits on a left-padded batch of several images (``<image>`` expanded to the visual-token count as the
processor does), greedy tokens and beam ``sequences_scores`` against ``generate``, a LoRA on the LM's and the
vision tower's q/v exported in peft format and loaded with ``PeftModel.from_pretrained``. Run with ``-s`` to
see the measured max abs differences.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tests.max_diffs import MaxDiffs
from vlpeft_jax.errors import CheckpointError, ConfigError, InputError
from vlpeft_jax.eval import decode
from vlpeft_jax.hf import io
from vlpeft_jax.hf.llava import LlavaConfig, llava_to_hf_state_dict, load_llava

jax.config.update("jax_default_matmul_precision", "highest")

TOL = 1e-4
VOCAB = 64
IMG = VOCAB - 1  # the <image> placeholder id
BOS, EOS, PAD = 1, 2, 0
BATCH = 3
IMAGE, PATCH = 16, 8

MAX_DIFFS = MaxDiffs("LLaVA max abs diff vs transformers / peft (fp32)")
report_max_diffs = MAX_DIFFS.fixture()
record = MAX_DIFFS.record


VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE,
              patch_size=PATCH, projection_dim=16, hidden_act="quick_gelu")
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
SPECS = {
    # LLaVA-1.5's choices: layer -2, drop CLS, a LLaMA LM
    "llama_default": dict(text=transformers.LlamaConfig, strategy="default", layer=-2),
    # Qwen2 LM (q/k/v biases), keep CLS, two feature layers concatenated, tied head
    "qwen2_full": dict(text=transformers.Qwen2Config, strategy="full", layer=[-2, -1], tie=True),
    # Mistral LM without a sliding window (LLaVA-NeXT's Mistral-7B-Instruct-v0.2 has none): runs as LLaMA
    "mistral_default": dict(text=transformers.MistralConfig, strategy="default", layer=-1,
                            text_kwargs=dict(sliding_window=None, head_dim=8)),
}


class Family:
    """A saved tiny HF LLaVA, our module and params, and a jitted forward."""

    def __init__(self, name: str, tmp_dir):
        spec = SPECS[name]
        torch.manual_seed(0)
        text = spec["text"](**TEXT, **spec.get("text_kwargs", {}), tie_word_embeddings=spec.get("tie", False))
        config = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**VISION), text_config=text,
                                          image_token_index=IMG, vision_feature_layer=spec["layer"],
                                          vision_feature_select_strategy=spec["strategy"],
                                          projector_hidden_act="gelu", tie_word_embeddings=spec.get("tie", False))
        self.config = config
        self.hf = transformers.LlavaForConditionalGeneration._from_config(config, attn_implementation="eager").eval()
        with torch.no_grad():  # weights large enough for logits of order 1; non-trivial norms and biases
            for n, p in self.hf.named_parameters():
                if p.dim() >= 2 and "embed_tokens" not in n:
                    p.normal_(0.0, 0.15)
                else:
                    p.add_(0.1 * torch.randn_like(p))
        self.dir = tmp_dir / name
        self.hf.save_pretrained(self.dir)
        self.model, self.params = load_llava(self.dir)
        self.params = jax.tree.map(jnp.asarray, self.params)
        self.n_img = self.model.num_image_tokens
        self.forward = jax.jit(lambda p, ids, mask, pix: self.model.apply({"params": p}, ids, mask, pix))

    def hf_logits(self, ids, mask, pix_nchw, model=None) -> np.ndarray:
        with torch.no_grad():
            return (model or self.hf)(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(),
                                      pixel_values=torch.tensor(pix_nchw)).logits.numpy()


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llava")
    cache: dict[str, Family] = {}

    def get(name: str) -> Family:
        if name not in cache:
            cache[name] = Family(name, tmp)
        return cache[name]

    return get


def batch(n_img: int, seed: int = 0, text_lengths=(5, 3, 1), images_per_row=(1, 1, 1)):
    """Left-padded ``[BOS, <image> * n_img per image, text...]`` rows, their mask, and NCHW/NHWC pixels."""
    rng = np.random.default_rng(seed)
    rows = [[BOS] + [IMG] * (n_img * k) + rng.integers(3, IMG, size=n).tolist()
            for n, k in zip(text_lengths, images_per_row, strict=True)]
    length = max(map(len, rows))
    ids = np.full((len(rows), length), PAD, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for r, row in enumerate(rows):
        ids[r, length - len(row):] = row
        mask[r, length - len(row):] = 1
    pix = rng.standard_normal((sum(images_per_row), 3, IMAGE, IMAGE)).astype(np.float32)
    return ids, mask, pix, np.ascontiguousarray(pix.transpose(0, 2, 3, 1))


def masked_max_diff(ours, ref, mask) -> float:
    diff = np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64))
    return float(diff[np.asarray(mask).astype(bool)].max())


# --------------------------------------------------------------------------------------------------
# Loading and logits


@pytest.mark.parametrize("name", list(SPECS))
def test_logits_match_transformers(families, name):
    fam = families(name)
    strategy = SPECS[name]["strategy"]
    assert fam.n_img == (IMAGE // PATCH) ** 2 + (strategy == "full")
    assert fam.model.image_token_id == IMG
    ids, mask, pix, pix_nhwc = batch(fam.n_img)
    ref = fam.hf_logits(ids, mask, pix)
    out = np.asarray(fam.forward(fam.params, ids, mask, pix_nhwc).logits)
    assert out.shape == ref.shape == (*ids.shape, VOCAB)
    assert np.abs(ref).max() > 0.5  # logits of order 1: a missed tensor would show
    assert record(f"{name} logits (left padding, 3 images)", masked_max_diff(out, ref, mask)) <= TOL


def test_several_images_in_one_row(families):
    """Row 0 holds two images, row 1 one: placeholders are filled in reading order, as transformers does."""
    fam = families("llama_default")
    ids, mask, pix, pix_nhwc = batch(fam.n_img, seed=1, text_lengths=(2, 4), images_per_row=(2, 1))
    ref = fam.hf_logits(ids, mask, pix)
    out = np.asarray(fam.model.apply({"params": fam.params}, ids, mask, pix_nhwc).logits)
    assert record("llama_default logits, 2 images in one row", masked_max_diff(out, ref, mask)) <= TOL


def test_exports_back_and_legacy_layout_loads(families, tmp_path):
    """``llava_to_hf_state_dict`` gives transformers' in-memory state dict back; a checkpoint in those names
    (``model.language_model.*``...) and one in LLaVA-1.5's (``vision_tower.vision_model.*``) load alike."""
    from safetensors.numpy import save_file

    fam = families("llama_default")
    config = LlavaConfig.from_hf(io.load_config(fam.dir))
    exported = llava_to_hf_state_dict(fam.params, config)
    theirs = {k: v.numpy() for k, v in fam.hf.state_dict().items()}
    assert set(exported) == set(theirs)
    for k, v in exported.items():
        np.testing.assert_array_equal(v, theirs[k], err_msg=k)
    for layout in ("in_memory", "llava_1_5"):
        state = exported if layout == "in_memory" else {
            k.replace("model.vision_tower.", "vision_tower.vision_model.").replace("model.language_model.",
                                                                                  "language_model.model.")
            .replace("lm_head.", "language_model.lm_head.").replace("model.multi_modal_projector.",
                                                                    "multi_modal_projector."): v
            for k, v in exported.items()}
        (tmp_path / layout).mkdir()
        save_file(state, str(tmp_path / layout / "model.safetensors"))
        (tmp_path / layout / "config.json").write_text((fam.dir / "config.json").read_text())
        _, params = load_llava(tmp_path / layout)
        jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.asarray, fam.params))


# --------------------------------------------------------------------------------------------------
# Decoding

STEPS: dict = {}


def generate(fam: Family, ids, mask, pix_nhwc, **kwargs):
    step = STEPS.setdefault(fam.model, decode.ModuleApply(fam.model))
    return decode.generate(step, fam.params, {"input_ids": jnp.asarray(ids), "pixel_values": jnp.asarray(pix_nhwc)},
                           jnp.asarray(mask), eos_token_id=EOS, pad_token_id=PAD, **kwargs)


def hf_generate(fam: Family, ids, mask, pix, **kwargs):
    with torch.no_grad():
        return fam.hf.generate(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(),
                               pixel_values=torch.tensor(pix), do_sample=False, eos_token_id=EOS,
                               pad_token_id=PAD, **kwargs)


@pytest.mark.parametrize("name", list(SPECS))
def test_greedy_generation_equals_transformers(families, name):
    fam = families(name)
    ids, mask, pix, pix_nhwc = batch(fam.n_img, seed=2)
    n = 6
    ours = np.asarray(generate(fam, ids, mask, pix_nhwc, max_new_tokens=n).sequences)
    theirs = hf_generate(fam, ids, mask, pix, max_new_tokens=n, num_beams=1).numpy()[:, ids.shape[1]:]
    assert theirs.shape[1] > 1 and (theirs != EOS).any()  # a real continuation, not an immediate stop
    np.testing.assert_array_equal(ours[:, :theirs.shape[1]], theirs)
    assert (ours[:, theirs.shape[1]:] == PAD).all()


def test_beam_search_equals_transformers(families):
    fam = families("qwen2_full")
    ids, mask, pix, pix_nhwc = batch(fam.n_img, seed=3)
    n, beams = 5, 3
    ours = generate(fam, ids, mask, pix_nhwc, max_new_tokens=n, method="beam", num_beams=beams)
    theirs = hf_generate(fam, ids, mask, pix, max_new_tokens=n, num_beams=beams, output_scores=True,
                         return_dict_in_generate=True)
    seqs = theirs.sequences.numpy()[:, ids.shape[1]:]
    np.testing.assert_array_equal(np.asarray(ours.sequences)[:, :seqs.shape[1]], seqs)
    diff = record("qwen2_full beam sequences_scores", np.abs(np.asarray(ours.scores)
                                                              - theirs.sequences_scores.numpy()).max())
    assert diff <= TOL


# --------------------------------------------------------------------------------------------------
# Bad input


def _write_config(tmp_path, **changes):
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(cfg))


def test_lazy_load_in_bfloat16_equals_the_float32_load_cast(families):
    """``param_dtype=bfloat16``: every floating parameter is read, cast and kept in bfloat16 (no float32 copy), and
    equals the float32 load rounded to bfloat16 (the transposed and reshaped kernels included)."""
    fam = families("llama_default")
    _, params = load_llava(fam.dir, param_dtype=jnp.bfloat16)
    ref = jax.tree_util.tree_leaves_with_path(fam.params)
    got = dict(jax.tree_util.tree_leaves_with_path(params))
    assert len(got) == len(ref)
    for path, want in ref:
        assert got[path].dtype == jnp.bfloat16, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(got[path], np.float32),
                                      np.asarray(jnp.asarray(want).astype(jnp.bfloat16), np.float32))


def test_missing_projector_is_named(families, tmp_path):
    from safetensors.numpy import save_file

    fam = families("llama_default")
    state = {k: v for k, v in io.load_state_dict(fam.dir).items() if "linear_2" not in k}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((fam.dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"model\.multi_modal_projector\.linear_2\.weight, "
                                              r"model\.multi_modal_projector\.linear_2\.bias"):
        load_llava(tmp_path)


@pytest.mark.parametrize("changes,match", [
    (dict(vision_feature_select_strategy="cls_only"), "vision_feature_select_strategy='cls_only'.*default, full"),
    (dict(model_type="llava_next"), "anyres"),
    (dict(image_grid_pinpoints=[[16, 32], [32, 16]]), "anyres"),
    (dict(vision_feature_layer=5), "vision_feature_layer 5 is out of range"),
    (dict(vision_config={"model_type": "siglip_vision_model"}), "siglip_vision_model.*clip_vision_model"),
    (dict(text_config={"model_type": "mistral", "sliding_window": 8, "max_position_embeddings": 64}),
     "sliding_window=8"),
    (dict(text_config={"model_type": "gemma"}), "'gemma'.*llama, qwen2, mistral"),
])
def test_unsupported_configs_are_refused(families, tmp_path, changes, match):
    fam = families("llama_default")
    (tmp_path / "config.json").write_text((fam.dir / "config.json").read_text())
    _write_config(tmp_path, **changes)
    with pytest.raises(ConfigError, match=match):
        load_llava(tmp_path)  # the config is read before any weights


def test_mistral_without_window_runs_as_llama(families):
    cfg = json.loads((families("llama_default").dir / "config.json").read_text())
    cfg["text_config"] = {**cfg["text_config"], "model_type": "mistral", "sliding_window": None}
    ours = LlavaConfig.from_hf(cfg)
    assert ours.text_model_type == "mistral" and ours.text.model_type == "llama" and not ours.text.attention_bias


def test_image_token_count_mismatch(families):
    fam = families("llama_default")
    ids, mask, _, pix_nhwc = batch(fam.n_img, seed=4)
    bad = ids.copy()
    bad[np.arange(BATCH), (ids == IMG).argmax(1)] = 5  # one placeholder fewer per row
    with pytest.raises(InputError, match=rf"rows \[0, 1, 2\] hold \[{fam.n_img - 1}, .*exactly {fam.n_img}"):
        fam.model.apply({"params": fam.params}, bad, mask, pix_nhwc)
    with pytest.raises(InputError, match=r"2 image\(s\) of 4 visual tokens need 8"):  # 3 rows of 4, 2 images
        fam.model.apply({"params": fam.params}, ids, mask, pix_nhwc[:2])


# --------------------------------------------------------------------------------------------------
# peft adapters on the VLM


def test_lora_export_loads_in_peft_onto_llava_and_imports_back(families, tmp_path):
    """A LoRA on q/v of the LM and of the vision tower, B non-zero: ``export_peft`` writes transformers 5's module
    names; ``PeftModel.from_pretrained`` on the torch LLaVA gives our logits; ``import_peft`` reads it (and peft's
    own re-save) back."""
    import peft

    from tests.peft.test_peft_parity import key, perturb_ours
    from vlpeft_jax.hf import peft_io
    from vlpeft_jax.peft import base as pb
    from vlpeft_jax.peft.lora import LoRA

    fam = families("llama_default")
    ids, mask, pix, pix_nhwc = batch(fam.n_img, seed=5)
    method = LoRA(targets=("q_proj", "v_proj"), rank=4, alpha=6.0)
    p = perturb_ours(method.init(key(0), fam.params))
    assert {"vision_tower", "language_model"} <= set(p)

    compiled = {}

    def ours_with(m, q):
        if m not in compiled:
            compiled[m] = jax.jit(lambda q: pb.apply_with(fam.model.apply, [(m, q)], {"params": fam.params}, ids,
                                                          mask, pix_nhwc).logits)
        return np.asarray(compiled[m](q))

    ours = ours_with(method, p)
    assert np.abs(ours - np.asarray(fam.forward(fam.params, ids, mask, pix_nhwc).logits)).max() > 1e-2
    out_dir = peft_io.export_peft(method, p, fam.dir, tmp_path / "ours")
    cfg = json.loads((out_dir / "adapter_config.json").read_text())
    assert (cfg["task_type"], cfg["target_modules"]) == ("CAUSAL_LM", ["q_proj", "v_proj"])
    keys = set(io._read_safetensors(out_dir / "adapter_model.safetensors"))
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.vision_tower.encoder.layers.1.self_attn.v_proj.lora_B.weight" in keys

    fresh = transformers.LlavaForConditionalGeneration.from_pretrained(fam.dir, attn_implementation="eager").eval()
    loaded = peft.PeftModel.from_pretrained(fresh, out_dir).eval()
    theirs = fam.hf_logits(ids, mask, pix, model=loaded)
    assert record("llama_default LoRA (LM + vision q/v) export -> peft", masked_max_diff(ours, theirs, mask)) <= TOL
    # the vision tower's LoRA matters (so the comparison covers its names and values too)
    no_vision = {**p, "vision_tower": jax.tree.map(jnp.zeros_like, p["vision_tower"])}
    assert masked_max_diff(ours_with(method, no_vision), ours, mask) > 1e-2

    imported, q = peft_io.import_peft(out_dir, fam.params, base=fam.dir)
    assert type(imported) is LoRA and jax.tree.structure(q) == jax.tree.structure(p)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), q, jax.tree.map(np.asarray, p))
    loaded.save_pretrained(tmp_path / "theirs")  # peft's own files, imported here
    imported, q = peft_io.import_peft(tmp_path / "theirs", fam.params, base=LlavaConfig.from_module(fam.model))
    assert record("llama_default LoRA peft save -> import_peft", masked_max_diff(ours_with(imported, q), theirs,
                                                                                  mask)) <= TOL


def test_cli_export_targets_the_whole_llava_and_writes_it_back(families, tmp_path):
    """``run.py export`` on a run of a LLaVA checkpoint: the adapters are for the whole VLM (prefix ``()``, the
    checkpoint folder as base), and ``--with-base`` writes a checkpoint transformers loads with our logits."""
    from types import SimpleNamespace

    from vlpeft_jax.cli.export import peft_base, write_vlm_checkpoint
    from vlpeft_jax.hf import peft_io

    fam = families("llama_default")
    info, prefix = peft_base(SimpleNamespace(task=SimpleNamespace(model_dir=fam.dir), module=fam.model))
    assert (info.model_type, prefix, info.base_model_name_or_path) == ("llava", (), str(fam.dir))
    with pytest.raises(peft_io.UnsupportedAdapterError, match="key map"):  # a bare model type cannot name modules
        peft_io.base_model_info("llava")
    assert info.module_name(("multi_modal_projector", "linear_1")) == "model.multi_modal_projector.linear_1"
    leaves, treedef = jax.tree.flatten(fam.params)
    params = jax.tree.unflatten(treedef, [x + 0.01 * np.random.default_rng(i).standard_normal(x.shape, np.float32)
                                          for i, x in enumerate(leaves)])
    write_vlm_checkpoint(params, fam.dir, tmp_path)
    hf_model = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids, mask, pix, pix_nhwc = batch(fam.n_img, seed=6)
    ours = np.asarray(fam.forward(params, ids, mask, pix_nhwc).logits)
    assert np.abs(ours - np.asarray(fam.forward(fam.params, ids, mask, pix_nhwc).logits)).max() > 1e-3
    diff = masked_max_diff(ours, fam.hf_logits(ids, mask, pix, model=hf_model), mask)
    assert record("llama_default write_vlm_checkpoint -> transformers", diff) <= TOL
