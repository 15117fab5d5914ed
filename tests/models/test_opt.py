"""Parity of our OPT decoder with transformers' ``OPTForCausalLM``: logits, KV cache, generate, LoRA vs peft, IO.

Tiny random OPT models (pre-LN and post-LN, with and without ``word_embed_proj_dim != hidden_size``, tied
and untied heads) are built with transformers, saved with ``save_pretrained``, loaded with
``hf.load_pretrained`` and compared in fp32 on a padded batch. Run with ``-s`` to see the measured max abs
differences.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

from tests.max_diffs import MaxDiffs
from tests.peft.test_peft_parity import copy_into_peft, key, perturb_ours
from vlpeft_jax import hf
from vlpeft_jax.errors import ConfigError
from vlpeft_jax.eval import decode
from vlpeft_jax.hf import decoders
from vlpeft_jax.models import layers, registry
from vlpeft_jax.models.opt import OPTConfig, OPTForCausalLM
from vlpeft_jax.peft import base as pb
from vlpeft_jax.peft.lora import LoRA

jax.config.update("jax_default_matmul_precision", "highest")

TOL = 1e-4
LORA_TOL = 1e-5
VOCAB = 97
BATCH, LENGTH = 3, 9
EOS, PAD = 2, 1

MAX_DIFFS = MaxDiffs("OPT max abs diff vs transformers / peft (fp32)")
report_max_diffs = MAX_DIFFS.fixture()
record = MAX_DIFFS.record


BASE = dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=32, pad_token_id=PAD, bos_token_id=EOS, eos_token_id=EOS,
            init_std=0.2)  # logits of order 1 (0.02 gives post-LN logits of ~0.01: weak evidence)
SPECS = {
    "pre": dict(BASE, do_layer_norm_before=True),  # OPT-125m/1.3b/2.7b/6.7b shape
    "post_proj": dict(BASE, do_layer_norm_before=False, word_embed_proj_dim=16),  # OPT-350m shape
    "pre_proj_untied": dict(BASE, do_layer_norm_before=True, word_embed_proj_dim=24, tie_word_embeddings=False),
    "post": dict(BASE, do_layer_norm_before=False, enable_bias=True),
}


class Family:
    """A saved tiny HF OPT, our module and params, and jitted forwards."""

    def __init__(self, name: str, tmp_dir):
        torch.manual_seed(0)
        config = transformers.OPTConfig(**SPECS[name])
        config._attn_implementation = "eager"
        self.hf = transformers.OPTForCausalLM(config).eval()
        with torch.no_grad():  # non-trivial norms and biases, so that a missed one shows
            for n, p in self.hf.named_parameters():
                if n.endswith("bias") or "norm" in n:
                    p.add_(0.1 * torch.randn_like(p))
        self.dir = tmp_dir / name
        self.hf.save_pretrained(self.dir)
        self.model, self.params = hf.load_pretrained(self.dir)
        self.params = jax.tree.map(jnp.asarray, self.params)
        self.forward = jax.jit(lambda p, ids, mask: self.model.apply({"params": p}, ids, mask))

        @functools.partial(jax.jit, static_argnames="decode")
        def cached(p, ids, mask, cache, decode):
            return self.model.apply({"params": p}, ids, mask, cache=cache, decode=decode)

        self.cached = cached

    def hf_forward(self, ids: np.ndarray, mask: np.ndarray, **kwargs):
        with torch.no_grad():
            return self.hf(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(),
                           output_hidden_states=True, **kwargs)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("opt")
    cache: dict[str, Family] = {}

    def get(name: str) -> Family:
        if name not in cache:
            cache[name] = Family(name, tmp)
        return cache[name]

    return get


def _batch(seed: int = 0, length: int = LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids and mask: rows of ``length``, ``length - 2`` and ``length - 5`` real tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(BATCH, length)).astype(np.int32)
    mask = np.zeros((BATCH, length), np.int32)
    for row, n in enumerate((length, length - 2, length - 5)):
        mask[row, length - n:] = 1
    return np.where(mask == 1, ids, PAD).astype(np.int32), mask


def _masked_max_diff(ours, ref, mask: np.ndarray) -> float:
    diff = np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64))
    return float(diff[mask.astype(bool)].max())


# --------------------------------------------------------------------------------------------------
# Forward parity


@pytest.mark.parametrize("name", list(SPECS))
def test_logits_and_hidden_states_match_transformers(families, name):
    """A left-padded batch with HF's own positions (from the mask): logits at every position, hidden states."""
    fam = families(name)
    ids, mask = _batch()
    ref = fam.hf_forward(ids, mask)
    out = fam.forward(fam.params, ids, mask)
    assert len(out.hidden_states) == len(ref.hidden_states) == fam.model.config.num_hidden_layers + 1
    # every position, padding included: OPT numbers padding -1 (row 1), and so do we
    logit_diff = record(f"{name} logits (left padding)", np.abs(np.asarray(out.logits) - ref.logits.numpy()).max())
    hidden_diff = record(f"{name} hidden states", max(_masked_max_diff(a, b.numpy(), mask)
                                                      for a, b in zip(out.hidden_states, ref.hidden_states,
                                                                      strict=True)))
    assert out.logits.shape == (BATCH, LENGTH, VOCAB)
    assert logit_diff <= TOL and hidden_diff <= TOL, (logit_diff, hidden_diff)


def test_tree_mirrors_hf_names_and_exports_back(families):
    """Module paths are HF's; ``to_hf_state_dict`` gives HF's state dict back (tied head left out)."""
    for name in ("post_proj", "pre_proj_untied"):
        fam = families(name)
        dec = fam.params["model"]["decoder"]
        assert {"embed_tokens", "embed_positions", "project_in", "project_out", "layers_1"} <= set(dec)
        assert set(dec["layers_0"]) == {"self_attn", "self_attn_layer_norm", "fc1", "fc2", "final_layer_norm"}
        assert ("final_layer_norm" in dec) == fam.model.config.do_layer_norm_before
        assert ("lm_head" in fam.params) == (not fam.model.config.tie_word_embeddings)
        exported = decoders.to_hf_state_dict(fam.params, fam.model.config)
        theirs = {k: v.numpy() for k, v in fam.hf.state_dict().items()}
        if fam.model.config.tie_word_embeddings:
            theirs.pop("lm_head.weight")
        assert set(exported) == set(theirs)
        for k, v in exported.items():
            np.testing.assert_array_equal(v, theirs[k], err_msg=k)


def test_base_class_checkpoint_loads(families, tmp_path):
    """A checkpoint saved from ``OPTModel`` (keys ``decoder.*``) loads into the LM with its tied head."""
    fam = families("pre")
    fam.hf.model.save_pretrained(tmp_path)
    model, params = hf.load_pretrained(tmp_path)
    assert model.config == fam.model.config
    jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.asarray, fam.params))


def test_logits_to_keep_inputs_embeds_and_explicit_positions(families):
    fam = families("post_proj")
    ids, mask = _batch(seed=1)
    ref = fam.hf_forward(ids, mask, logits_to_keep=3).logits.numpy()
    out = fam.model.apply({"params": fam.params}, ids, mask, logits_to_keep=3)
    assert out.logits.shape == (BATCH, 3, VOCAB)
    assert record("post_proj logits_to_keep=3", np.abs(np.asarray(out.logits) - ref).max()) <= TOL
    # inputs_embeds are word_embed_proj_dim wide (before project_in), as HF's
    embeds = fam.model.apply({"params": fam.params}, ids, method="embed_tokens")
    assert embeds.shape == (BATCH, LENGTH, 16)
    from_embeds = fam.model.apply({"params": fam.params}, None, mask, inputs_embeds=embeds).logits
    np.testing.assert_allclose(from_embeds, fam.forward(fam.params, ids, mask).logits, atol=1e-6)
    # explicit 0-based position ids (HF adds the offset of 2 itself)
    pos = np.broadcast_to(np.arange(LENGTH), (BATCH, LENGTH)).astype(np.int32)
    ones = np.ones_like(mask)
    ref = fam.hf_forward(ids, ones, position_ids=torch.tensor(pos).long()).logits.numpy()
    out = fam.model.apply({"params": fam.params}, ids, ones, position_ids=pos + 0)
    assert record("post_proj explicit position_ids", np.abs(np.asarray(out.logits) - ref).max()) <= TOL


# --------------------------------------------------------------------------------------------------
# KV cache and generation


@pytest.mark.parametrize("name", ["pre", "post_proj"])
def test_kv_cache_decoding_matches_full_sequence(families, name):
    """Prefill a left-padded prompt, then one token at a time: logits equal the full forward (and HF's)."""
    fam = families(name)
    n_new = 4
    prompt, prompt_mask = _batch(seed=2, length=LENGTH - n_new)  # rows of 5, 3 and 0 real tokens
    prompt_mask[2, -1], prompt[2, -1] = 1, 7  # one real token in the last row
    new_tokens = np.random.default_rng(3).integers(3, VOCAB, (BATCH, n_new)).astype(np.int32)
    full_ids = np.concatenate([prompt, new_tokens], 1)
    full_mask = np.concatenate([prompt_mask, np.ones_like(new_tokens)], 1)
    full = np.asarray(fam.forward(fam.params, full_ids, full_mask).logits)
    cache = fam.model.init_cache(BATCH, LENGTH + 3)  # spare slots must stay masked out
    out = fam.cached(fam.params, prompt, prompt_mask, cache, decode=False)
    steps, cache = [np.asarray(out.logits)], out.cache
    for j in range(n_new):
        out = fam.cached(fam.params, new_tokens[:, j:j + 1], np.ones((BATCH, 1), np.int32), cache, decode=True)
        steps.append(np.asarray(out.logits))
        cache = out.cache
    assert int(cache.index) == LENGTH
    cached = np.concatenate(steps, 1)
    assert record(f"{name} KV-cache decode vs full forward", _masked_max_diff(cached, full, full_mask)) <= TOL
    ref = fam.hf_forward(full_ids, full_mask).logits.numpy()
    assert record(f"{name} KV-cache decode vs transformers", _masked_max_diff(cached, ref, full_mask)) <= TOL


STEP = {}


def _generate(fam: Family, ids, mask, **kwargs):
    step = STEP.setdefault(fam.model, decode.ModuleApply(fam.model))
    return decode.generate(step, fam.params, jnp.asarray(ids), jnp.asarray(mask), eos_token_id=EOS,
                           pad_token_id=PAD, **kwargs)


@pytest.mark.parametrize("name", list(SPECS))
def test_greedy_generation_equals_transformers(families, name):
    fam = families(name)
    ids, mask = _batch(seed=4)
    n = 6
    ours = np.asarray(_generate(fam, ids, mask, max_new_tokens=n).sequences)
    with torch.no_grad():
        theirs = fam.hf.generate(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(),
                                 max_new_tokens=n, do_sample=False, num_beams=1, eos_token_id=EOS,
                                 pad_token_id=PAD).numpy()[:, LENGTH:]
    assert theirs.shape[1] > 1 and (theirs != EOS).any()  # a real continuation, not an immediate stop
    np.testing.assert_array_equal(ours[:, :theirs.shape[1]], theirs)
    assert (ours[:, theirs.shape[1]:] == PAD).all()


def test_beam_search_equals_transformers(families):
    fam = families("post_proj")
    ids, mask = _batch(seed=5)
    n, beams = 5, 3
    ours = _generate(fam, ids, mask, max_new_tokens=n, method="beam", num_beams=beams)
    with torch.no_grad():
        theirs = fam.hf.generate(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(),
                                 max_new_tokens=n, do_sample=False, num_beams=beams, eos_token_id=EOS,
                                 pad_token_id=PAD, output_scores=True, return_dict_in_generate=True)
    seqs = theirs.sequences.numpy()[:, LENGTH:]
    np.testing.assert_array_equal(np.asarray(ours.sequences)[:, :seqs.shape[1]], seqs)
    diff = record("post_proj beam sequences_scores", np.abs(np.asarray(ours.scores)
                                                             - theirs.sequences_scores.numpy()).max())
    assert diff <= TOL


# --------------------------------------------------------------------------------------------------
# LoRA vs peft


@pytest.mark.parametrize("name", ["pre", "post_proj"])
def test_lora_on_q_and_v_matches_peft(families, name):
    fam = families(name)
    ids, mask = _batch(seed=6)
    method = LoRA(targets=("q_proj", "v_proj"), rank=4, alpha=6.0)
    p = perturb_ours(method.init(key(0), fam.params))
    assert sorted(p["model"]["decoder"]["layers_0"]["self_attn"]) == ["q_proj", "v_proj"]
    ours = np.asarray(jax.jit(lambda q: pb.apply_with(fam.model.apply, [(method, q)], {"params": fam.params},
                                                      ids, mask).logits)(p))
    assert np.abs(ours - np.asarray(fam.forward(fam.params, ids, mask).logits)).max() > 100 * LORA_TOL
    config = peft.LoraConfig(r=4, lora_alpha=6.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    fresh = transformers.OPTForCausalLM.from_pretrained(fam.dir, attn_implementation="eager").eval()
    pm = peft.get_peft_model(fresh, config).eval()
    copy_into_peft(pm, p)
    with torch.no_grad():
        theirs = pm(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long()).logits.numpy()
    assert record(f"{name} LoRA q_proj/v_proj vs peft", _masked_max_diff(ours, theirs, mask)) <= LORA_TOL


# --------------------------------------------------------------------------------------------------
# Registry, configs, errors


def test_registry_builds_opt_and_a_prefix_vlm_on_it():
    cfg = {"family": "opt", **{k: v for k, v in BASE.items() if not k.endswith("token_id") and k != "init_std"},
           "word_embed_proj_dim": 16, "do_layer_norm_before": False}
    m, inputs = registry.build_model(cfg)
    assert isinstance(m, OPTForCausalLM) and m.config.projects
    shapes = layers.unbox(jax.eval_shape(m.init, jax.random.key(0), **inputs))["params"]
    assert "final_layer_norm" not in shapes["model"]["decoder"]
    vision = dict(family="vit", image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
                  num_attention_heads=2, intermediate_size=32, add_pooling_layer=False)
    vlm, vin = registry.build_model({"family": "prefix_vlm", "vision": vision, "decoder": cfg,
                                     "connector": {"kind": "linear"}})
    out = jax.eval_shape(lambda: vlm.init_with_output(jax.random.key(0), **vin)[0])
    assert out.logits.shape[-1] == VOCAB
    with pytest.raises(ConfigError, match="no setting"):
        registry.build_model({"family": "opt", "n_embd": 4})


def test_config_from_hf_and_errors():
    c = OPTConfig.from_hf(transformers.OPTConfig(**SPECS["post_proj"]).to_dict())
    assert (c.word_embed_proj_dim, c.do_layer_norm_before, c.activation_function) == (16, False, "relu")
    with pytest.raises(ConfigError, match="model_type 'gpt2'"):
        OPTConfig.from_hf({"model_type": "gpt2"})
    with pytest.raises(ConfigError, match="layer_norm_elementwise_affine"):
        OPTConfig.from_hf({"model_type": "opt", "layer_norm_elementwise_affine": False})
    with pytest.raises(ConfigError, match="divisible"):
        OPTConfig(hidden_size=30, num_attention_heads=4)


# --------------------------------------------------------------------------------------------------
# peft adapter export/import and the base-model checkpoint export


def test_lora_export_loads_in_peft_and_imports_back(families, tmp_path):
    """Trained-looking LoRA on attention, feed-forward and ``project_in``: ``export_peft`` ->
    ``PeftModel.from_pretrained`` gives our logits; ``import_peft`` of it (and of peft's re-save) gives them back."""
    from vlpeft_jax.hf import peft_io

    fam = families("post_proj")
    ids, mask = _batch(seed=7)
    method = LoRA(targets=("q_proj", "v_proj", "fc2", "project_in"), rank=4, alpha=6.0)
    p = perturb_ours(method.init(key(0), fam.params))

    def ours_with(m, q):
        return np.asarray(pb.apply_with(fam.model.apply, [(m, q)], {"params": fam.params}, ids, mask).logits)

    ours = ours_with(method, p)
    assert np.abs(ours - np.asarray(fam.forward(fam.params, ids, mask).logits)).max() > 100 * LORA_TOL
    out_dir = peft_io.export_peft(method, p, fam.dir, tmp_path / "ours")
    cfg = json.loads((out_dir / "adapter_config.json").read_text())
    assert (cfg["task_type"], cfg["fan_in_fan_out"], cfg["base_model_name_or_path"]) == ("CAUSAL_LM", False,
                                                                                          str(fam.dir))
    assert sorted(cfg["target_modules"]) == ["fc2", "project_in", "q_proj", "v_proj"]
    fresh = transformers.OPTForCausalLM.from_pretrained(fam.dir, attn_implementation="eager").eval()
    loaded = peft.PeftModel.from_pretrained(fresh, out_dir).eval()
    with torch.no_grad():
        theirs = loaded(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long()).logits.numpy()
    assert record("post_proj LoRA export -> peft", _masked_max_diff(ours, theirs, mask)) <= LORA_TOL

    imported, q = peft_io.import_peft(out_dir, fam.params)
    assert type(imported) is LoRA and imported.alpha == 6.0
    assert jax.tree.structure(q) == jax.tree.structure(p)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), q, jax.tree.map(np.asarray, p))
    assert record("post_proj LoRA export -> import_peft", np.abs(ours_with(imported, q) - ours).max()) <= LORA_TOL
    loaded.save_pretrained(tmp_path / "theirs")  # peft's own files, imported here
    imported, q = peft_io.import_peft(tmp_path / "theirs", fam.params)
    assert record("post_proj LoRA peft save -> import_peft", _masked_max_diff(ours_with(imported, q), theirs, mask)) \
        <= LORA_TOL
    assert peft_io.BaseModelInfo.from_hf_dir(fam.dir).model_type == "opt"


@pytest.mark.parametrize("name", ["pre_proj_untied", "post_proj"])
def test_write_hf_checkpoint_loads_in_transformers(families, tmp_path, name):
    """Our (changed) params written with ``cli.export.write_hf_checkpoint`` load with ``AutoModelForCausalLM``
    and give our logits."""
    from vlpeft_jax.cli.export import write_hf_checkpoint

    fam = families(name)
    leaves, treedef = jax.tree.flatten(fam.params)
    noise = jax.random.split(key(3), len(leaves))
    params = jax.tree.unflatten(treedef, [x + 0.01 * jax.random.normal(k, x.shape) for x, k in zip(leaves, noise,
                                                                                                   strict=True)])
    write_hf_checkpoint(params, fam.model.config, tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert isinstance(hf_model, transformers.OPTForCausalLM)
    ids, mask = _batch(seed=8)
    with torch.no_grad():
        theirs = hf_model(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long()).logits.numpy()
    ours = np.asarray(fam.forward(params, ids, mask).logits)
    assert np.abs(ours - np.asarray(fam.forward(fam.params, ids, mask).logits)).max() > 1e-3  # not the originals
    assert record(f"{name} write_hf_checkpoint -> AutoModelForCausalLM", np.abs(ours - theirs).max()) <= TOL
