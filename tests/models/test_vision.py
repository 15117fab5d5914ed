"""Parity of the ViT / CLIP vision / CLIP text towers with transformers (PyTorch, fp32), and their errors.

Tiny random Hugging Face models are built and saved inside the tests, loaded with our loaders, and every
output (last hidden state, all hidden states, pooled/projected output) is compared to transformers.
"""

import copy
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from vlpeft_jax.errors import CheckpointError, ConfigError, InputError, OfflineError
from vlpeft_jax.hf import vision
from vlpeft_jax.models import hooks
from vlpeft_jax.models.clip import CLIPTextConfig, CLIPVisionConfig, eos_positions
from vlpeft_jax.models.vit import ViTConfig

jax.config.update("jax_default_matmul_precision", "highest")

TOL = 1e-4
IMAGE, PATCH = 32, 8
VISION = dict(image_size=IMAGE, patch_size=PATCH, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=128)
TEXT = dict(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=16, pad_token_id=1, bos_token_id=97)


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Adds noise to every parameter so that LayerNorm scales/biases and all biases are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _save(model: torch.nn.Module, tmp_path_factory, name: str) -> str:
    d = tmp_path_factory.mktemp(name)
    model.save_pretrained(d)
    return str(d)


def _max_diff(ours, ref) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref.detach().numpy().astype(np.float64))))


def _compare(label: str, out, ref_hidden, ref_last, ref_pooled, rows=None) -> None:
    """Compares our EncoderOutput with HF tensors; ``rows`` [b, t] bool restricts to real positions."""
    sel = (lambda a: np.asarray(a)[rows]) if rows is not None else np.asarray
    sel_ref = (lambda a: a.detach().numpy()[rows]) if rows is not None else (lambda a: a.detach().numpy())
    assert len(out.hidden_states) == len(ref_hidden)
    diffs = {"last_hidden_state": float(np.max(np.abs(sel(out.last_hidden_state) - sel_ref(ref_last))))}
    diffs["hidden_states"] = max(float(np.max(np.abs(sel(o) - sel_ref(r)))) for o, r in zip(out.hidden_states,
                                                                                          ref_hidden, strict=True))
    if ref_pooled is not None:
        diffs["pooled"] = _max_diff(out.pooled, ref_pooled)
    print(f"\n[parity] {label}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    for k, v in diffs.items():
        assert v <= TOL, f"{label} {k} differs by {v}"


@pytest.fixture(scope="module")
def images():
    x = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    return x, jnp.asarray(x.permute(0, 2, 3, 1).numpy())


# --------------------------------------------------------------------------------------------------
# ViT


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = _perturb(transformers.ViTModel(transformers.ViTConfig(**VISION)), 10)
    return _save(model, tmp_path_factory, "vit"), model


def test_vit_parity(vit_dir, images):
    d, ref = vit_dir
    x_pt, x = images
    module, params = vision.load_vit(d)
    assert "query" in params["encoder"]["layer_0"]["attention"]["attention"]
    assert params["embeddings"]["patch_embeddings"]["projection"]["kernel"].shape == (PATCH * PATCH * 3, 64)
    out = jax.jit(module.apply)({"params": params}, x)
    with torch.no_grad():
        r = ref(x_pt, output_hidden_states=True)
    _compare("ViTModel", out, r.hidden_states, r.last_hidden_state, r.pooler_output)


def test_vit_in_memory_names_without_pooler(vit_dir, tmp_path):
    """A state dict saved with transformers-5 in-memory names (``layers.N.attention.q_proj``), no pooler,
    loads to the same parameters as the saved checkpoint (whose forward is checked above)."""
    d, ref = vit_dir
    state = {k: v.numpy() for k, v in ref.state_dict().items() if not k.startswith("pooler.")}
    assert "layers.0.attention.q_proj.weight" in state
    save_file(state, str(tmp_path / "model.safetensors"))
    shutil.copy(f"{d}/config.json", tmp_path / "config.json")
    module, params = vision.load_vit(tmp_path)
    assert "pooler" not in params and not module.config.add_pooling_layer
    _, expected = vision.load_vit(d)
    del expected["pooler"]
    jax.tree.map(np.testing.assert_array_equal, params, expected)


# --------------------------------------------------------------------------------------------------
# CLIP vision


@pytest.fixture(scope="module")
def clip_vision_dirs(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(**VISION, projection_dim=48)
    plain = _perturb(transformers.CLIPVisionModel(cfg), 11)
    proj = _perturb(transformers.CLIPVisionModelWithProjection(cfg), 12)
    return {"plain": (_save(plain, tmp_path_factory, "clipv"), plain),
            "proj": (_save(proj, tmp_path_factory, "clipvp"), proj)}


@pytest.fixture(scope="module")
def clip_full(tmp_path_factory):
    """A full CLIPModel whose text tower uses a mid-vocabulary eos id (first-EOS pooling rule)."""
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(text_config=dict(TEXT, eos_token_id=50, projection_dim=24),
                                  vision_config=dict(VISION, projection_dim=24), projection_dim=40)
    model = _perturb(transformers.CLIPModel(cfg), 13)
    return _save(model, tmp_path_factory, "clipfull"), model


def test_clip_vision_model_parity(clip_vision_dirs, images):
    d, ref = clip_vision_dirs["plain"]
    x_pt, x = images
    module, params = vision.load_clip_vision(d)
    assert "q_proj" in params["vision_model"]["encoder"]["layers_0"]["self_attn"]
    out = jax.jit(module.apply)({"params": params}, x)
    with torch.no_grad():
        r = ref(x_pt, output_hidden_states=True)
    _compare("CLIPVisionModel", out, r.hidden_states, r.last_hidden_state, r.pooler_output)


def test_clip_vision_with_projection_parity(clip_vision_dirs, images):
    d, ref = clip_vision_dirs["proj"]
    x_pt, x = images
    module, params = vision.load_clip_vision(d, with_projection=True)
    out = jax.jit(module.apply)({"params": params}, x)
    with torch.no_grad():
        r = ref(x_pt, output_hidden_states=True)
    assert out.pooled.shape == (3, 48)
    _compare("CLIPVisionModelWithProjection", out, r.hidden_states, r.last_hidden_state, r.image_embeds)


def test_clip_full_vision_half_parity(clip_full, images):
    d, ref = clip_full
    x_pt, x = images
    module, params = vision.load_clip_vision(d, with_projection=True)
    assert module.config.projection_dim == 40  # the top-level projection_dim of a full CLIP wins
    out = jax.jit(module.apply)({"params": params}, x)
    with torch.no_grad():
        r = ref.vision_model(x_pt, output_hidden_states=True)
        embeds = ref.visual_projection(r.pooler_output)
    _compare("CLIPModel vision half + visual_projection", out, r.hidden_states, r.last_hidden_state, embeds)
    # without the projection: the same tower (its forward is the CLIPVisionModel path checked above)
    plain_module, plain_params = vision.load_clip_vision(d)
    assert type(plain_module).__name__ == "CLIPVisionModel" and set(plain_params) == {"vision_model"}
    jax.tree.map(np.testing.assert_array_equal, plain_params["vision_model"], params["vision_model"])


def test_load_vision_tower_dispatch(vit_dir, clip_full):
    assert type(vision.load_vision_tower(vit_dir[0])[0]).__name__ == "ViTModel"
    assert type(vision.load_vision_tower(clip_full[0], with_projection=True)[0]).__name__ == \
        "CLIPVisionModelWithProjection"
    assert set(vision.VISION_LOADERS) == {"vit", "clip_vision_model", "clip"}


# --------------------------------------------------------------------------------------------------
# CLIP text


@pytest.fixture(scope="module")
def clip_text_legacy(tmp_path_factory):
    """A CLIPTextModelWithProjection with the legacy eos_token_id == 2 (pooling at argmax(input_ids))."""
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(**TEXT, eos_token_id=2, projection_dim=24)
    model = _perturb(transformers.CLIPTextModelWithProjection(cfg), 14)
    return _save(model, tmp_path_factory, "cliptl"), model


@pytest.fixture(scope="module")
def clip_text_plain(tmp_path_factory):
    torch.manual_seed(0)
    model = _perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT, eos_token_id=50)), 15)
    return _save(model, tmp_path_factory, "clipt"), model


def _text_batch(eos: int, left: bool = False):
    """Padded batch [bos, tokens (some larger than eos), eos, pad...]; lengths 16, 9, 4."""
    rng = np.random.default_rng(3)
    t, lengths = 16, (16, 9, 4)
    ids = np.full((len(lengths), t), 1, np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        row = np.concatenate([[97], rng.integers(3, 96, n - 2), [eos]])
        row[1] = 60 if eos == 50 else row[1]  # a token above eos, so that argmax and first-eos differ
        sl = slice(t - n, t) if left else slice(0, n)
        ids[i, sl], mask[i, sl] = row, 1
    return ids, mask


def _check_pooling_rule_matters(ids: np.ndarray, eos: int) -> None:
    first_eos = (ids == eos).argmax(-1)
    assert (ids.argmax(-1) != first_eos).any(), "test batch cannot tell the two pooling rules apart"


def test_clip_full_text_half_parity(clip_full):
    d, ref = clip_full
    ids, mask = _text_batch(eos=50)
    _check_pooling_rule_matters(ids, 50)
    module, params = vision.load_clip_text(d, with_projection=True)
    assert module.config.eos_token_id == 50 and module.config.projection_dim == 40
    out = jax.jit(module.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    with torch.no_grad():
        r = ref.text_model(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
        embeds = ref.text_projection(r.pooler_output)
    _compare("CLIPModel text half + text_projection, right-padded", out, r.hidden_states, r.last_hidden_state,
             embeds)
    plain_module, plain_params = vision.load_clip_text(d)
    assert type(plain_module).__name__ == "CLIPTextModel" and set(plain_params) == {"text_model"}
    jax.tree.map(np.testing.assert_array_equal, plain_params["text_model"], params["text_model"])


def test_clip_text_legacy_eos_parity(clip_text_legacy):
    """CLIPTextModelWithProjection with eos_token_id == 2: pooled at argmax(input_ids), unprojected and projected."""
    d, ref = clip_text_legacy
    ids, mask = _text_batch(eos=2)
    _check_pooling_rule_matters(ids, 2)
    module, params = vision.load_clip_text(d)
    assert module.config.eos_token_id == 2
    out = jax.jit(module.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    with torch.no_grad():
        r = ref(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
        pooled = ref.text_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).pooler_output
    _compare("CLIPTextModelWithProjection (legacy eos=2), pooler_output", out, r.hidden_states,
             r.last_hidden_state, pooled)
    _, proj_params = vision.load_clip_text(d, with_projection=True)
    embeds = np.asarray(out.pooled) @ proj_params["text_projection"]["kernel"]
    diff = _max_diff(embeds, r.text_embeds)
    print(f"[parity] CLIPTextModelWithProjection (legacy eos=2), text_embeds {diff:.2e}")
    assert diff <= TOL


def test_clip_text_model_left_padded_parity(clip_text_plain):
    """Standalone CLIPTextModel (keys without ``text_model.``), left padding: real positions and pooled."""
    d, ref = clip_text_plain
    ids, mask = _text_batch(eos=50, left=True)
    module, params = vision.load_clip_text(d)
    out = jax.jit(module.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    with torch.no_grad():
        r = ref(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    _compare("CLIPTextModel, left-padded (real positions)", out, r.hidden_states, r.last_hidden_state,
             r.pooler_output, rows=mask.astype(bool))


def test_eos_positions_rules():
    ids = jnp.array([[97, 60, 5, 50, 1], [97, 50, 50, 1, 1]])
    assert eos_positions(ids, 50).tolist() == [3, 1]
    assert eos_positions(ids, 2).tolist() == [0, 0]


# --------------------------------------------------------------------------------------------------
# Hook points


def test_hook_points_and_patch_embedding_goes_through_linear(clip_vision_dirs, images):
    d, _ = clip_vision_dirs["plain"]
    module, params = vision.load_clip_vision(d)
    seen: dict[str, list[str]] = {"linear": [], "attention": [], "mlp": [], "embed": []}

    def record(ctx, nxt, *args):
        seen[ctx.kind].append(ctx.name)
        return nxt(*args)

    def double_patch(ctx, nxt, x, kernel, bias):
        return nxt(x, 2 * kernel, bias)

    with hooks.use_hooks([hooks.Hook(k, record) for k in seen],
                         hooks.Hook("linear", double_patch, hooks.path_matcher(r".*/patch_embedding"))):
        hooked = module.apply({"params": params}, images[1])
    assert "vision_model/embeddings/patch_embedding" in seen["linear"]
    assert "vision_model/encoder/layers_1/self_attn/q_proj" in seen["linear"]
    assert seen["attention"] == ["vision_model/encoder/layers_0/self_attn", "vision_model/encoder/layers_1/self_attn"]
    assert seen["mlp"] == ["vision_model/encoder/layers_0/mlp", "vision_model/encoder/layers_1/mlp"]
    assert seen["embed"] == ["vision_model/embeddings"]
    plain = module.apply({"params": params}, images[1])
    assert float(jnp.max(jnp.abs(hooked.last_hidden_state - plain.last_hidden_state))) > 1e-3


def test_vit_hook_paths(vit_dir, images):
    module, params = vision.load_vit(vit_dir[0])
    seen = []
    with hooks.use_hooks(hooks.Hook("attention", lambda ctx, nxt, *a: seen.append(ctx.name) or nxt(*a)),
                         hooks.Hook("mlp", lambda ctx, nxt, *a: seen.append(ctx.name) or nxt(*a))):
        module.apply({"params": params}, images[1])
    assert seen == ["encoder/layer_0/attention/attention", "encoder/layer_0", "encoder/layer_1/attention/attention",
                    "encoder/layer_1"]


def test_text_embed_hook_prepended_prompt_shifts_pooling(clip_text_plain):
    """Two prompt vectors prepended by an ``embed`` hook: positions cover them and the pooled token moves."""
    module, params = vision.load_clip_text(clip_text_plain[0])
    ids, mask = (jnp.asarray(a) for a in _text_batch(eos=50))
    seen = []

    def prepend(ctx, nxt, ids, embeds, mask):
        seen.append(ctx.name)
        embeds, mask = nxt(ids, embeds, mask)
        prompt = jnp.ones((embeds.shape[0], 2, embeds.shape[2]), embeds.dtype)
        return jnp.concatenate([prompt, embeds], 1), jnp.concatenate([jnp.ones_like(mask[:, :2]), mask], 1)

    short_ids, short_mask = ids[:, :14], mask[:, :14]  # 14 + 2 prompts = max_position_embeddings
    with hooks.use_hooks(hooks.Hook("embed", prepend)):
        out = module.apply({"params": params}, short_ids, short_mask)
        with pytest.raises(InputError, match="max_position_embeddings"):
            module.apply({"params": params}, ids, mask)
    assert seen[0] == "text_model/embeddings/token_embedding"
    assert out.last_hidden_state.shape == (3, 16, 64)
    index = eos_positions(short_ids, 50) + 2
    np.testing.assert_array_equal(out.pooled, out.last_hidden_state[jnp.arange(3), index])


# --------------------------------------------------------------------------------------------------
# Errors, configs, preprocessing


@pytest.mark.parametrize("shape, found", [((1, 16, 16, 3), "16x16x3"), ((1, 32, 32, 1), "32x32x1"),
                                          ((1, 3, 32, 32), "3x32x32")])
def test_wrong_image_shape_names_both_shapes(vit_dir, clip_vision_dirs, shape, found):
    for module, params in (vision.load_vit(vit_dir[0]), vision.load_clip_vision(clip_vision_dirs["plain"][0])):
        with pytest.raises(InputError) as e:
            module.apply({"params": params}, jnp.zeros(shape))
        assert "32x32x3" in str(e.value) and found in str(e.value)
        if shape[1] == 3:
            assert "NCHW" in str(e.value)


def test_missing_tensor_names_the_key(vit_dir, clip_full, tmp_path):
    d, _ = vit_dir
    state = load_file(f"{d}/model.safetensors")
    del state["encoder.layer.1.attention.attention.key.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    shutil.copy(f"{d}/config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=r"encoder\.layer\.1\.attention\.attention\.key\.weight"):
        vision.load_vit(tmp_path)
    # asking for the projection of a checkpoint that has none
    with pytest.raises(CheckpointError, match=r"visual_projection\.weight"):
        vision.load_clip_vision(_vision_only_copy(clip_full[0], tmp_path / "v"), with_projection=True)


def _vision_only_copy(src: str, dst) -> str:
    dst.mkdir()
    state = {k: v for k, v in load_file(f"{src}/model.safetensors").items() if k != "visual_projection.weight"}
    save_file(state, str(dst / "model.safetensors"))
    shutil.copy(f"{src}/config.json", dst / "config.json")
    return str(dst)


def test_hub_id_is_offline_error():
    for load in (vision.load_vit, vision.load_clip_vision, vision.load_clip_text, vision.image_mean_std):
        with pytest.raises(OfflineError, match="openai/clip-vit-base-patch32"):
            load("openai/clip-vit-base-patch32")


def test_image_mean_std(vit_dir, clip_full, tmp_path):
    mean, std, size = vision.image_mean_std(vit_dir[0])
    assert (mean, std, size) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), (IMAGE, IMAGE))
    mean, std, size = vision.image_mean_std(clip_full[0])
    assert mean == vision.OPENAI_CLIP_MEAN and size == (IMAGE, IMAGE)
    # the reference defaults are those of transformers' processors
    assert tuple(transformers.CLIPImageProcessor().image_mean) == vision.OPENAI_CLIP_MEAN
    assert tuple(transformers.CLIPImageProcessor().image_std) == vision.OPENAI_CLIP_STD
    assert tuple(transformers.ViTImageProcessor().image_mean) == vision.IMAGENET_STANDARD_MEAN
    # a preprocessor_config.json written by transformers wins
    d = tmp_path / "clip"
    shutil.copytree(clip_full[0], d)
    transformers.CLIPImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6], size={"shortest_edge": 40},
                                    crop_size={"height": 32, "width": 32}).save_pretrained(d)
    assert vision.image_mean_std(d) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), (32, 32))


def test_config_from_hf_variants():
    full = {"model_type": "clip", "projection_dim": 32,
            "text_config": {"hidden_size": 64, "num_attention_heads": 4, "eos_token_id": 2},
            "text_config_dict": {"hidden_size": 96}, "vision_config": {"image_size": [64, 64], "patch_size": 16}}
    t = CLIPTextConfig.from_hf(full)
    assert (t.hidden_size, t.eos_token_id, t.projection_dim, t.max_position_embeddings) == (96, 2, 32, 77)
    v = CLIPVisionConfig.from_hf(full, dtype=jnp.bfloat16)
    assert (v.image_size, v.patch_size, v.num_patches, v.dtype) == ((64, 64), (16, 16), 16, jnp.bfloat16)
    nested_default = {"model_type": "clip", "vision_config": {"projection_dim": 48}}
    assert CLIPVisionConfig.from_hf(nested_default).projection_dim == 512  # CLIPModel's own default wins
    assert CLIPVisionConfig.from_hf({"model_type": "clip_vision_model", "hidden_size": 64,
                                     "num_attention_heads": 4}).hidden_size == 64
    assert ViTConfig.from_hf({"model_type": "vit", "image_size": 48, "patch_size": 16}).num_patches == 9
    with pytest.raises(ConfigError, match="clip_text_model"):
        CLIPVisionConfig.from_hf({"model_type": "clip_text_model"})
    with pytest.raises(ConfigError, match="not a multiple of patch_size"):
        ViTConfig.from_hf({"model_type": "vit", "image_size": 50})
    with pytest.raises(ConfigError, match="hidden_act"):
        CLIPTextConfig.from_hf({"model_type": "clip_text_model", "hidden_act": "nope"})


def test_bfloat16_compute_runs(clip_vision_dirs, images):
    """bf16 compute is as accurate as bf16 allows, measured on this network.

    Reference: transformers in float32 on the bf16-rounded weights and pixels (what our bf16 model computes
    with: parameters are cast to bf16 where used, pixels on entry), so that what remains is the rounding of
    the computation itself. Its size for this network is measured with PyTorch's own bf16 run of the same
    model (every op rounded to bf16, float32 accumulation in matmuls, LayerNorm and softmax, as ours).
    Bound: our relative L2 error <= 2x PyTorch's; the two frameworks round at different points (XLA fuses
    elementwise ops), measured ratio ~1.3. An error beyond bf16 rounding (a lossy extra cast, a wrong
    constant of ~1%) exceeds it, while the former absolute bound (0.25 on outputs of size ~4, ~16 bf16
    ulps) did not see such errors.
    """
    d, ref = clip_vision_dirs["plain"]
    module, params = vision.load_clip_vision(d, dtype=jnp.bfloat16)
    out = jax.jit(module.apply)({"params": params}, images[1])
    assert out.last_hidden_state.dtype == jnp.bfloat16 and out.pooled.dtype == jnp.bfloat16
    rounded = copy.deepcopy(ref)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        want = rounded(images[0].to(torch.bfloat16).float()).pooler_output.double().numpy()
        torch_bf16 = copy.deepcopy(ref).to(torch.bfloat16)(images[0].to(torch.bfloat16)).pooler_output
    assert torch_bf16.dtype == torch.bfloat16

    def rel_err(a) -> float:
        return float(np.linalg.norm(np.asarray(a, np.float64) - want) / np.linalg.norm(want))

    ours, theirs = rel_err(out.pooled.astype(jnp.float32)), rel_err(torch_bf16.double().numpy())
    u = 2.0**-8  # bf16 unit roundoff
    print(f"\n[bf16] CLIPVisionModel pooled, relative L2 error vs fp32 on bf16-rounded weights/pixels: ours "
          f"{ours:.2e} ({ours / u:.2f} u), PyTorch bf16 {theirs:.2e} ({theirs / u:.2f} u)")
    assert 0 < theirs < 4 * u  # the yardstick is bf16 rounding, not a broken reference
    assert ours <= 2 * theirs
