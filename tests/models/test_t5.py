"""Parity of our T5 with transformers' ``T5ForConditionalGeneration``: logits, cache, generate, LoRA vs peft, IO.

Two tiny random T5s are built with transformers: ``v1`` (T5 v1.0: ``relu``, head tied to ``shared`` and scaled by
``d_model**-0.5``) and ``flan`` (v1.1 / Flan-T5: ``gated-gelu``, its own ``lm_head``, no scaling). They are saved
with ``save_pretrained``, loaded with ``load_t5`` and compared in fp32 on padded batches. Run with ``-s`` to see
the measured max abs differences.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers
from transformers.models.t5.modeling_t5 import T5Attention as TorchT5Attention

from tests.max_diffs import MaxDiffs
from tests.peft.test_peft_parity import copy_into_peft, key, perturb_ours
from vlpeft_jax.errors import ConfigError, InputError
from vlpeft_jax.eval import decode
from vlpeft_jax.hf import t5 as hf_t5
from vlpeft_jax.models import hooks, layers, registry
from vlpeft_jax.models.t5 import T5Config, T5ForConditionalGeneration, relative_position_bucket, shift_right
from vlpeft_jax.peft import base as pb
from vlpeft_jax.peft.lora import LoRA
from vlpeft_jax.tasks.base import PeftApply

jax.config.update("jax_default_matmul_precision", "highest")

TOL = 1e-4
LORA_TOL = 1e-5
VOCAB = 64
BATCH, LENGTH, DEC_LENGTH = 3, 9, 6
PAD, EOS, START = 0, 1, 0

MAX_DIFFS = MaxDiffs("T5 max abs diff vs transformers / peft (fp32)")
report_max_diffs = MAX_DIFFS.fixture()
record = MAX_DIFFS.record


# few buckets and a short max distance, so that the 9-token batches reach the logarithmic buckets
BASE = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
            relative_attention_max_distance=12, decoder_start_token_id=START, pad_token_id=PAD, eos_token_id=EOS)
SPECS = {
    "v1": dict(BASE, feed_forward_proj="relu"),  # t5-small shape: tied and scaled head
    "flan": dict(BASE, feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_decoder_layers=1),
}


class Family:
    """A saved tiny HF T5, our module and params, and a jitted forward."""

    def __init__(self, name: str, tmp_dir):
        torch.manual_seed(0)
        config = transformers.T5Config(**SPECS[name])
        config._attn_implementation = "eager"
        self.hf = transformers.T5ForConditionalGeneration(config).eval()
        with torch.no_grad():
            if name == "flan":  # transformers 5 always ties at construction; a real Flan-T5 head is its own tensor
                self.hf.lm_head.weight = torch.nn.Parameter(0.3 * torch.randn(VOCAB, BASE["d_model"]))
            for n, p in self.hf.named_parameters():
                if "norm" in n:  # non-trivial norm scales, so that a missed one shows
                    p.add_(0.2 * torch.randn_like(p))
                if name == "v1" and n.endswith((".o.weight", ".wo.weight")):  # else the tiny relu model's greedy
                    p.mul_(3.0)                                                # output is one token in every row
        self.dir = tmp_dir / name
        self.hf.save_pretrained(self.dir)
        self.model, self.params = hf_t5.load_t5(self.dir)
        self.params = jax.tree.map(jnp.asarray, self.params)
        self.forward = jax.jit(lambda p, *args: self.model.apply({"params": p}, *args))
        self.step = decode.ModuleApply(self.model)

    def hf_forward(self, ids, mask, dec, dec_mask, model=None):
        with torch.no_grad():
            return (model or self.hf)(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(),
                                      decoder_input_ids=torch.tensor(dec).long(),
                                      decoder_attention_mask=torch.tensor(dec_mask).long(), output_hidden_states=True)

    def hf_generate(self, ids, mask, model=None, **kwargs):
        with torch.no_grad():
            return (model or self.hf).generate(input_ids=torch.tensor(ids).long(),
                                               attention_mask=torch.tensor(mask).long(), do_sample=False,
                                               eos_token_id=EOS, pad_token_id=PAD, **kwargs)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("t5")
    cache: dict[str, Family] = {}

    def get(name: str) -> Family:
        if name not in cache:
            cache[name] = Family(name, tmp)
        return cache[name]

    return get


def _batch(seed: int = 0) -> tuple[np.ndarray, ...]:
    """Encoder ids/mask (left-padded rows of 9, 6 and 3 tokens) and decoder ids/mask (right-padded, start token
    first)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, VOCAB, size=(BATCH, LENGTH)).astype(np.int32)
    mask = np.zeros((BATCH, LENGTH), np.int32)
    for row, n in enumerate((LENGTH, LENGTH - 3, LENGTH - 6)):
        mask[row, LENGTH - n:] = 1
    dec = rng.integers(2, VOCAB, size=(BATCH, DEC_LENGTH)).astype(np.int32)
    dec[:, 0] = START
    dec_mask = np.ones((BATCH, DEC_LENGTH), np.int32)
    dec_mask[1, 4:] = 0
    dec_mask[2, 2:] = 0
    return np.where(mask == 1, ids, PAD), mask, np.where(dec_mask == 1, dec, PAD), dec_mask


def _masked_max_diff(ours, ref, mask: np.ndarray) -> float:
    diff = np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64))
    return float(diff[mask.astype(bool)].max())


# --------------------------------------------------------------------------------------------------
# Forward parity


def test_relative_position_buckets_equal_transformers():
    rel = np.arange(-600, 600)
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 12), (16, 32), (64, 256)):
            theirs = TorchT5Attention._relative_position_bucket(torch.tensor(rel), bidirectional=bidirectional,
                                                                 num_buckets=buckets, max_distance=distance).numpy()
            ours = relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional, num_buckets=buckets,
                                            max_distance=distance)
            np.testing.assert_array_equal(np.asarray(ours), theirs, err_msg=f"{bidirectional} {buckets} {distance}")


@pytest.mark.parametrize("name", list(SPECS))
def test_logits_and_hidden_states_match_transformers(families, name):
    """Left-padded encoder inputs, right-padded decoder inputs: decoder logits, encoder and decoder hidden states."""
    fam = families(name)
    ids, mask, dec, dec_mask = _batch()
    ref = fam.hf_forward(ids, mask, dec, dec_mask)
    out = fam.forward(fam.params, ids, mask, dec, dec_mask)
    assert out.logits.shape == (BATCH, DEC_LENGTH, VOCAB)
    assert np.abs(ref.logits.numpy()).max() > 1.0  # logits of order 1: a wrong scale would show
    logit_diff = record(f"{name} logits (padded)", _masked_max_diff(out.logits, ref.logits.numpy(), dec_mask))
    enc_diff = record(f"{name} encoder hidden states", max(
        _masked_max_diff(a, b.numpy(), mask) for a, b in zip(out.encoder_hidden_states, ref.encoder_hidden_states,
                                                             strict=True)))
    dec_diff = record(f"{name} decoder hidden states", max(
        _masked_max_diff(a, b.numpy(), dec_mask) for a, b in zip(out.hidden_states, ref.decoder_hidden_states,
                                                                 strict=True)))
    assert logit_diff <= TOL and enc_diff <= TOL and dec_diff <= TOL, (logit_diff, enc_diff, dec_diff)


def test_inputs_embeds_logits_to_keep_and_shift_right(families):
    fam = families("flan")
    ids, mask, dec, dec_mask = _batch(seed=1)
    full = np.asarray(fam.forward(fam.params, ids, mask, dec, dec_mask).logits)
    embeds = jax.jit(lambda p: fam.model.apply({"params": p}, ids, method="embed_tokens"))(fam.params)
    out = jax.jit(lambda p, e: fam.model.apply({"params": p}, None, mask, dec, dec_mask, inputs_embeds=e,
                                               logits_to_keep=2))(fam.params, embeds)
    assert out.logits.shape == (BATCH, 2, VOCAB)
    np.testing.assert_allclose(out.logits, full[:, -2:], atol=1e-5)
    labels = np.where(dec_mask == 1, dec, -100)
    np.testing.assert_array_equal(shift_right(labels, START, PAD),
                                  fam.hf._shift_right(torch.tensor(labels).long()).numpy())
    with pytest.raises(InputError, match="exactly one of input_ids"):
        fam.model.apply({"params": fam.params}, ids, mask, dec, inputs_embeds=embeds)


def test_hook_points_are_where_the_docstring_says(families):
    """Paths each hook kind sees (traced once), and each hook's effect vs an independent construction."""
    fam = families("flan")
    ids, mask, dec, dec_mask = _batch(seed=3)
    seen: dict[str, list[str]] = {}

    def spy(kind):
        return hooks.Hook(kind, lambda ctx, nxt, *a: (seen.setdefault(kind, []).append(ctx.name), nxt(*a))[1])

    with hooks.use_hooks(*(spy(k) for k in ("attention", "mlp", "embed", "final_hidden", "lm_head"))):
        jax.eval_shape(lambda p: fam.model.apply({"params": p}, ids, mask, dec, dec_mask), fam.params)
    assert seen["embed"] == ["shared"]  # the encoder's embeddings only
    assert seen["attention"] == ["encoder/block_0/layer_0/SelfAttention", "encoder/block_1/layer_0/SelfAttention",
                                 "decoder/block_0/layer_0/SelfAttention", "decoder/block_0/layer_1/EncDecAttention"]
    assert seen["mlp"] == ["encoder/block_0/layer_1/DenseReluDense", "encoder/block_1/layer_1/DenseReluDense",
                           "decoder/block_0/layer_2/DenseReluDense"]
    assert (seen["final_hidden"], seen["lm_head"]) == (["decoder/final_layer_norm"], ["lm_head"])

    def zero_kernels(suffix):
        return jax.tree_util.tree_map_with_path(
            lambda kp, x: jnp.zeros_like(x) if "/".join(k.key for k in kp).endswith(suffix) else x, fam.params)

    def apply(p, *hk, embeds=None):
        with hooks.use_hooks(*hk):
            return fam.model.apply({"params": p}, None if embeds is not None else ids, mask, dec, dec_mask,
                                   inputs_embeds=embeds).logits

    zero_mlp = hooks.Hook("mlp", lambda ctx, nxt, x: jnp.zeros_like(nxt(x)))
    zero_cross = hooks.Hook("attention", lambda ctx, nxt, q, k, v, b: jnp.zeros_like(nxt(q, k, v, b)),
                            where=lambda path: path[-1] == "EncDecAttention")
    half_embed = hooks.Hook("embed", lambda ctx, nxt, i, e, m: (0.5 * e, m))
    head = [hooks.Hook("final_hidden", lambda ctx, nxt, h: 2.0 * nxt(h)),
            hooks.Hook("lm_head", lambda ctx, nxt, h: nxt(h) + 1.0)]

    @jax.jit
    def run(p):
        embeds = 0.5 * fam.model.apply({"params": p}, ids, method="embed_tokens")
        return [(apply(p, zero_mlp), apply(zero_kernels("DenseReluDense/wo/kernel"))),
                (apply(p, zero_cross), apply(zero_kernels("EncDecAttention/o/kernel"))),
                (apply(p, half_embed), apply(p, embeds=embeds)),
                (apply(p, *head), 2.0 * apply(p) + 1.0)]

    for hooked, reference in run(fam.params):
        np.testing.assert_allclose(hooked, reference, atol=1e-5)
        assert np.abs(np.asarray(hooked) - np.asarray(fam.forward(fam.params, ids, mask, dec, dec_mask).logits)).max() \
            > 1e-2


# --------------------------------------------------------------------------------------------------
# Cache and generation


def test_cached_decoding_matches_full_forward(families):
    """Prefill (encoder + a 2-token decoder prefix) into a cache, then one decoder token at a time."""
    fam = families("v1")
    ids, mask, dec, _ = _batch(seed=2)
    ones = np.ones_like(dec)
    full = np.asarray(fam.forward(fam.params, ids, mask, dec, ones).logits)
    cache = fam.model.init_cache(BATCH, DEC_LENGTH + 2)  # spare slots must stay masked out
    prefill = jax.jit(lambda p, c: fam.step(p, {"input_ids": ids, "decoder_input_ids": dec[:, :2]}, mask, c, False))
    out = prefill(fam.params, cache)
    assert out.cache.cross_keys[0].shape == (BATCH, LENGTH, 4, 8)
    steps, cache = [np.asarray(out.logits)], out.cache
    step = jax.jit(lambda p, tok, c: fam.step(p, tok, jnp.ones_like(tok), c, True))
    for j in range(2, DEC_LENGTH):
        out = step(fam.params, dec[:, j:j + 1], cache)
        steps.append(np.asarray(out.logits))
        cache = out.cache
    assert int(cache.self_attention.index) == DEC_LENGTH
    cached = np.concatenate(steps, 1)
    assert record("v1 cached decoding vs full forward", np.abs(cached - full).max()) <= TOL
    with pytest.raises(InputError, match="encoder input"):
        fam.model.apply({"params": fam.params}, decoder_input_ids=dec[:, :1])


def _generate(fam: Family, ids, mask, step=None, params=None, **kwargs):
    return decode.generate(step or fam.step, fam.params if params is None else params, jnp.asarray(ids),
                           jnp.asarray(mask), eos_token_id=EOS, pad_token_id=PAD, **kwargs)


@pytest.mark.parametrize("name", list(SPECS))
def test_greedy_generation_equals_transformers(families, name):
    fam = families(name)
    ids, mask, _, _ = _batch(seed=4)
    n = 8
    ours = np.asarray(_generate(fam, ids, mask, max_new_tokens=n).sequences)
    theirs = fam.hf_generate(ids, mask, max_new_tokens=n, num_beams=1).numpy()
    assert (theirs[:, 0] == START).all()
    theirs = theirs[:, 1:]
    assert len(np.unique(theirs)) > 2  # a varied continuation, not one token repeated
    np.testing.assert_array_equal(ours[:, :theirs.shape[1]], theirs)
    assert (ours[:, theirs.shape[1]:] == PAD).all()


@pytest.mark.parametrize("name", list(SPECS))
def test_beam_search_equals_transformers(families, name):
    fam = families(name)
    ids, mask, _, _ = _batch(seed=5)
    n, beams = 6, 3
    ours = _generate(fam, ids, mask, max_new_tokens=n, method="beam", num_beams=beams)
    theirs = fam.hf_generate(ids, mask, max_new_tokens=n, num_beams=beams, output_scores=True,
                             return_dict_in_generate=True)
    seqs = theirs.sequences.numpy()[:, 1:]
    np.testing.assert_array_equal(np.asarray(ours.sequences)[:, :seqs.shape[1]], seqs)
    diff = record(f"{name} beam sequences_scores", np.abs(np.asarray(ours.scores)
                                                          - theirs.sequences_scores.numpy()).max())
    assert diff <= TOL


# --------------------------------------------------------------------------------------------------
# LoRA vs peft


def test_lora_on_q_and_v_matches_peft_logits_and_greedy(families):
    """Our LoRA on every ``q``/``v`` (self- and cross-attention) vs peft's ``LoraConfig(target_modules=["q", "v"])``:
    logits, and greedy decoding through the task step function (``PeftApply``) vs peft's ``generate``."""
    fam = families("flan")
    ids, mask, dec, dec_mask = _batch(seed=6)
    method = LoRA(targets=("q", "v"), rank=4, alpha=6.0)
    p = perturb_ours(method.init(key(0), fam.params))
    assert sorted(p["decoder"]["block_0"]["layer_1"]["EncDecAttention"]) == ["q", "v"]
    ours = np.asarray(jax.jit(lambda q: pb.apply_with(fam.model.apply, [(method, q)], {"params": fam.params},
                                                      ids, mask, dec, dec_mask).logits)(p))
    assert np.abs(ours - np.asarray(fam.forward(fam.params, ids, mask, dec, dec_mask).logits)).max() > 100 * LORA_TOL
    config = peft.LoraConfig(r=4, lora_alpha=6.0, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")
    fresh = transformers.T5ForConditionalGeneration.from_pretrained(fam.dir, attn_implementation="eager").eval()
    pm = peft.get_peft_model(fresh, config).eval()
    copy_into_peft(pm, p)
    theirs = fam.hf_forward(ids, mask, dec, dec_mask, model=pm).logits.numpy()
    assert record("flan LoRA q/v vs peft", _masked_max_diff(ours, theirs, dec_mask)) <= LORA_TOL

    step = PeftApply(fam.model, (("lora", method),))
    tokens = np.asarray(_generate(fam, ids, mask, step=step, params={"base": fam.params, "peft": {"lora": p}},
                                  max_new_tokens=5).sequences)
    theirs = fam.hf_generate(ids, mask, model=pm, max_new_tokens=5, num_beams=1).numpy()[:, 1:]
    np.testing.assert_array_equal(tokens[:, :theirs.shape[1]], theirs)


# --------------------------------------------------------------------------------------------------
# Checkpoints, registry, configs, errors


@pytest.mark.parametrize("name", list(SPECS))
def test_tree_names_and_export_round_trip(families, name):
    """Paths are HF's; ``t5_to_hf_state_dict`` gives exactly the tensors ``save_pretrained`` wrote."""
    fam = families(name)
    cfg = fam.model.config
    assert cfg.tie_word_embeddings == (name == "v1") and cfg.scale_decoder_outputs == (name == "v1")
    assert ("lm_head" in fam.params) == (name == "flan")
    assert set(fam.params["decoder"]["block_0"]["layer_1"]) == {"EncDecAttention", "layer_norm"}
    assert "relative_attention_bias" in fam.params["encoder"]["block_0"]["layer_0"]["SelfAttention"]
    assert "relative_attention_bias" not in fam.params["encoder"]["block_1"]["layer_0"]["SelfAttention"]
    saved = safetensors.numpy.load_file(str(fam.dir / "model.safetensors"))
    exported = hf_t5.t5_to_hf_state_dict(fam.params, cfg)
    assert set(exported) == set(saved)
    for k, v in exported.items():
        np.testing.assert_array_equal(v, saved[k], err_msg=k)


def test_checkpoint_with_embed_token_aliases_and_v4_config_loads(families, tmp_path):
    """A checkpoint as transformers 4 wrote Flan-T5: ``encoder/decoder.embed_tokens.weight`` duplicating
    ``shared.weight``, ``lm_head.weight``, ``tie_word_embeddings: false`` and no ``scale_decoder_outputs``."""
    fam = families("flan")
    state = safetensors.numpy.load_file(str(fam.dir / "model.safetensors"))
    state["encoder.embed_tokens.weight"] = state["decoder.embed_tokens.weight"] = state["shared.weight"]
    config = json.loads((fam.dir / "config.json").read_text())
    config.pop("scale_decoder_outputs", None)
    config["tie_word_embeddings"] = False
    safetensors.numpy.save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, params = hf_t5.load_t5(tmp_path)
    assert model.config == fam.model.config
    jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.asarray, fam.params))
    # the to_hf config + exported tensors load in transformers with our logits
    out_dir = tmp_path / "exported"
    out_dir.mkdir()
    (out_dir / "config.json").write_text(json.dumps(model.config.to_hf()))
    safetensors.numpy.save_file(hf_t5.t5_to_hf_state_dict(params, model.config), str(out_dir / "model.safetensors"),
                                metadata={"format": "pt"})
    theirs = transformers.T5ForConditionalGeneration.from_pretrained(out_dir, attn_implementation="eager").eval()
    ids, mask, dec, dec_mask = _batch(seed=7)
    ref = fam.hf_forward(ids, mask, dec, dec_mask, model=theirs).logits.numpy()
    ours = fam.forward(fam.params, ids, mask, dec, dec_mask).logits
    assert record("flan exported checkpoint -> transformers", _masked_max_diff(ours, ref, dec_mask)) <= TOL


def test_unknown_feed_forward_type_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"feed_forward_proj 'gated-swishy'.*valid: '<act>' or 'gated-<act>'"):
        T5Config(feed_forward_proj="gated-swishy")
    with pytest.raises(ConfigError, match="'double-gelu' is not a feed-forward type"):
        T5Config.from_hf({"model_type": "t5", "feed_forward_proj": "double-gelu"})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "feed_forward_proj": "gated-mystery"}))
    with pytest.raises(ConfigError, match="gated-mystery"):  # before any weight is read (there are none here)
        hf_t5.load_t5(tmp_path)
    with pytest.raises(ConfigError, match="model_type 'bart'"):
        T5Config.from_hf({"model_type": "bart"})
    assert T5Config(feed_forward_proj="gated-silu").dense_act_fn == "silu"


def test_config_from_hf_reads_transformers_configs():
    flan = T5Config.from_hf(transformers.T5Config(**SPECS["flan"]).to_dict())
    assert (flan.dense_act_fn, flan.is_gated_act, flan.num_decoder_layers, flan.scale_decoder_outputs) == \
        ("gelu_new", True, 1, False)
    v1 = T5Config.from_hf(transformers.T5Config(**SPECS["v1"]).to_dict())
    assert (v1.dense_act_fn, v1.is_gated_act, v1.num_decoder_layers, v1.scale_decoder_outputs) == \
        ("relu", False, 2, True)
    blip2 = transformers.Blip2Config(text_config=transformers.T5Config(**SPECS["flan"]).to_dict())
    assert T5Config.from_hf(blip2.text_config.to_dict()).d_ff == BASE["d_ff"]


def test_registry_builds_t5():
    cfg = {"family": "t5", "vocab_size": VOCAB, "d_model": 16, "d_kv": 4, "d_ff": 32, "num_layers": 1,
           "num_heads": 2, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}
    m, inputs = registry.build_model(cfg)
    assert isinstance(m, T5ForConditionalGeneration) and m.is_encoder_decoder
    shapes = layers.unbox(jax.eval_shape(m.init, jax.random.key(0), **inputs))["params"]
    assert shapes["lm_head"]["kernel"].shape == (16, VOCAB)
    assert shapes["decoder"]["block_0"]["layer_2"]["DenseReluDense"]["wi_1"]["kernel"].shape == (16, 32)
    with pytest.raises(ConfigError, match="no setting"):
        registry.build_model({"family": "t5", "hidden_size": 4})


def test_dropout_only_when_not_deterministic():
    m, inputs = registry.build_model({"family": "t5", "vocab_size": VOCAB, "d_model": 16, "d_kv": 4, "d_ff": 32,
                                      "num_layers": 1, "num_heads": 2, "dropout_rate": 0.5})
    params = jax.jit(m.init)(jax.random.key(0), **inputs)["params"]

    @jax.jit
    def run(rng):
        def logits(deterministic, r):
            return m.apply({"params": params}, **inputs, deterministic=deterministic, rngs={"dropout": r}).logits

        return logits(True, rng), logits(True, jax.random.key(2)), logits(False, rng)

    plain, plain_other_rng, dropped = (np.asarray(x) for x in run(jax.random.key(1)))
    np.testing.assert_array_equal(plain, plain_other_rng)
    assert np.abs(plain - dropped).max() > 1e-3
