"""Decoding parity: our jitted greedy / beam search with a KV cache vs transformers' ``generate``.

Tiny random GPT-2 and LLaMA (grouped-query attention) models are built with transformers (PyTorch),
saved, and loaded through ``vlpeft_jax.hf.decoders``. Prompts are a left-padded batch of different
lengths. The EOS token is chosen from the reference's own continuation, so that some sequences stop
early. References are always recomputed here from transformers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.eval.decode import GenerateOutput, ModuleApply, generate
from vlpeft_jax.hf.decoders import load_gpt2, load_llama
from vlpeft_jax.models.bert import BertConfig, QFormer
from vlpeft_jax.models.gpt2 import GPT2Config, GPT2LMHeadModel
from vlpeft_jax.models.layers import unbox
from vlpeft_jax.models.llama import LlamaConfig, LlamaForCausalLM
from vlpeft_jax.models.vit import ViTConfig, ViTModel
from vlpeft_jax.models.vlm import ConnectorConfig, PrefixVLM, QFormerVLM

jax.config.update("jax_default_matmul_precision", "highest")

VOCAB = 96
PAD = 1  # transformers' beam search fills with `pad or eos`: a nonzero pad keeps that quirk out of the way
PROMPT_LENGTHS = (5, 2, 7)
# Random models are near-uniform at the default init; a larger init gives clear argmax gaps, so the
# comparison tests decoding, not float round-off between two libraries.
INIT_RANGE = 0.3


def _hf_model(family: str) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                      initializer_range=INIT_RANGE, bos_token_id=None, eos_token_id=None,
                                      pad_token_id=PAD)
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   initializer_range=INIT_RANGE, bos_token_id=None, eos_token_id=None,
                                   pad_token_id=PAD, attn_implementation="eager")
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def family(request, tmp_path_factory):
    """(name, transformers model, our step function, our params) for one decoder family."""
    name = request.param
    hf = _hf_model(name)
    d = tmp_path_factory.mktemp(name)
    hf.save_pretrained(d)
    module, params = (load_gpt2 if name == "gpt2" else load_llama)(d)
    return name, hf, ModuleApply(module), params


@pytest.fixture(scope="module")
def prompts():
    """Left-padded prompt ids ``[3, 7]`` and mask; no pad token inside the prompts."""
    rng = np.random.default_rng(0)
    t = max(PROMPT_LENGTHS)
    ids = np.full((len(PROMPT_LENGTHS), t), PAD, np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(PROMPT_LENGTHS):
        ids[i, t - n:] = rng.integers(2, VOCAB, n)
        mask[i, t - n:] = 1
    return ids, mask


def _hf_generate(hf, prompts, max_new_tokens, eos, **kw):
    ids, mask = prompts
    with torch.no_grad():
        return hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                           max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=PAD,
                           return_dict_in_generate=True, output_scores=True, **kw)


def _hf_new_tokens(out, prompt_len: int, max_new_tokens: int) -> np.ndarray:
    """transformers' generated part, padded to ``max_new_tokens`` (it stops early when all rows finished)."""
    new = out.sequences[:, prompt_len:].numpy()
    return np.pad(new, ((0, 0), (0, max_new_tokens - new.shape[1])), constant_values=PAD)


def _ours(family, prompts, **kw) -> GenerateOutput:
    _, _, step, params = family
    ids, mask = prompts
    return generate(step, params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), pad_token_id=PAD,
                    **kw)


def _eos_from(tokens: np.ndarray, row: int, position: int) -> int:
    """A token the reference generates in ``row`` at ``position`` (and not before), to use as EOS."""
    tok = int(tokens[row, position])
    assert tok not in tokens[row, :position].tolist()
    return tok


# --------------------------------------------------------------------------------------------------
# Greedy


GREEDY_NEW = 10


@pytest.fixture(scope="module")
def greedy_no_eos(family, prompts):
    """transformers' greedy continuation without EOS (also the source of the EOS id for the next tests)."""
    out = _hf_generate(family[1], prompts, GREEDY_NEW, None)
    return _hf_new_tokens(out, prompts[0].shape[1], GREEDY_NEW)


def test_greedy_matches_transformers_without_eos(family, prompts, greedy_no_eos):
    ours = _ours(family, prompts, max_new_tokens=GREEDY_NEW, eos_token_id=None, output_logits=True)
    np.testing.assert_array_equal(np.asarray(ours.sequences), greedy_no_eos)
    np.testing.assert_array_equal(np.asarray(ours.lengths), GREEDY_NEW)


def test_greedy_matches_transformers_with_early_eos(family, prompts, greedy_no_eos):
    eos = _eos_from(greedy_no_eos, row=0, position=3)
    ref = _hf_new_tokens(_hf_generate(family[1], prompts, GREEDY_NEW, eos), prompts[0].shape[1], GREEDY_NEW)
    assert (ref[0, 4:] == PAD).all() and ref[0, 3] == eos  # row 0 really stops early in the reference
    ours = _ours(family, prompts, max_new_tokens=GREEDY_NEW, eos_token_id=eos, output_logits=True)
    np.testing.assert_array_equal(np.asarray(ours.sequences), ref)
    assert int(ours.lengths[0]) == 4


def test_cached_logits_equal_full_sequence_logits(family, prompts):
    """Each decode step's logits (from the KV cache) equal a full forward pass over prompt + generated tokens."""
    name, hf, step, params = family
    ids, mask = prompts
    ours = _ours(family, prompts, max_new_tokens=GREEDY_NEW, eos_token_id=None, output_logits=True)
    full_ids = np.concatenate([ids, np.asarray(ours.sequences)], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(np.asarray(ours.sequences))], axis=1)
    full = jax.jit(step.module.apply)({"params": params}, jnp.asarray(full_ids, jnp.int32), jnp.asarray(full_mask))
    t = ids.shape[1]
    expected = np.asarray(full.logits[:, t - 1:-1])
    diff = np.abs(np.asarray(ours.logits) - expected).max()
    print(f"{name}: cached vs full-sequence logits, max abs diff {diff:.2e}")
    assert diff <= 1e-4
    # ... and both equal transformers' logits on the same full sequence.
    with torch.no_grad():
        positions = np.maximum(np.cumsum(full_mask, -1) - 1, 0)  # what generate passes for left padding
        ref = hf(input_ids=torch.tensor(full_ids), attention_mask=torch.tensor(full_mask),
                 position_ids=torch.tensor(positions)).logits[:, t - 1:-1].numpy()
    diff_hf = np.abs(np.asarray(ours.logits) - ref).max()
    print(f"{name}: cached logits vs transformers, max abs diff {diff_hf:.2e}")
    assert diff_hf <= 1e-4


def test_prefill_from_embeddings_equals_prefill_from_ids(family, prompts):
    """Prefilling with ``inputs_embeds`` (as VLMs do) decodes the same tokens as prefilling with ids."""
    name, _, step, params = family
    ids, mask = prompts
    embeds = step.module.apply({"params": params}, jnp.asarray(ids, jnp.int32), method="embed_tokens")
    from_ids = _ours(family, prompts, max_new_tokens=GREEDY_NEW, eos_token_id=None, output_logits=True)
    from_embeds = generate(step, params, embeds, jnp.asarray(mask), max_new_tokens=GREEDY_NEW, eos_token_id=None,
                           pad_token_id=PAD, output_logits=True)
    np.testing.assert_array_equal(np.asarray(from_embeds.sequences), np.asarray(from_ids.sequences))
    np.testing.assert_allclose(np.asarray(from_embeds.scores), np.asarray(from_ids.scores), atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Beam search


BEAM_NEW = 12
NUM_BEAMS = 3


@pytest.fixture(scope="module")
def beam_no_eos(family, prompts):
    """transformers' beam search without EOS: (output, generated tokens padded to BEAM_NEW)."""
    out = _hf_generate(family[1], prompts, BEAM_NEW, None, num_beams=NUM_BEAMS)
    return out, _hf_new_tokens(out, prompts[0].shape[1], BEAM_NEW)


@pytest.fixture(scope="module")
def beam_eos(greedy_no_eos, beam_no_eos):
    """Two EOS ids: the token row 1 proposes first (a one-token hypothesis finishes at the first step), and
    the most frequent token of the EOS-free beams (many hypotheses finish, so the early-stopping rules and
    the length penalty decide which one wins)."""
    first = int(greedy_no_eos[1, 0])
    counts = np.bincount(beam_no_eos[1].ravel(), minlength=VOCAB)
    counts[first] = -1
    return [first, int(np.argmax(counts))]


@pytest.mark.parametrize("length_penalty,early_stopping",
                         [(1.0, False), (1.0, True), (1.0, "never"), (2.0, False), (2.0, True), (2.0, "never"),
                          (0.5, "never"), (-1.0, False)])
def test_beam_search_matches_transformers(family, prompts, beam_eos, length_penalty, early_stopping):
    name, hf = family[:2]
    kw = dict(num_beams=NUM_BEAMS, length_penalty=length_penalty, early_stopping=early_stopping)
    ref = _hf_generate(hf, prompts, BEAM_NEW, beam_eos, **kw)
    ref_tokens = _hf_new_tokens(ref, prompts[0].shape[1], BEAM_NEW)
    assert np.isin(ref_tokens, beam_eos).any()  # the EOS handling is exercised
    ours = _ours(family, prompts, max_new_tokens=BEAM_NEW, eos_token_id=beam_eos, method="beam", **kw)
    np.testing.assert_array_equal(np.asarray(ours.sequences), ref_tokens)
    diff = np.abs(np.asarray(ours.scores) - ref.sequences_scores.numpy()).max()
    print(f"{name} beam lp={length_penalty} early_stopping={early_stopping}: max |score diff| {diff:.2e}")
    assert diff <= 1e-4


def test_beam_search_without_eos_matches_transformers(family, prompts, beam_no_eos):
    name = family[0]
    ref, ref_tokens = beam_no_eos
    ours = _ours(family, prompts, max_new_tokens=BEAM_NEW, eos_token_id=None, method="beam", num_beams=NUM_BEAMS)
    np.testing.assert_array_equal(np.asarray(ours.sequences), ref_tokens)
    diff = np.abs(np.asarray(ours.scores) - ref.sequences_scores.numpy()).max()
    print(f"{name} beam without EOS: max |score diff| {diff:.2e}")
    assert diff <= 1e-4


# --------------------------------------------------------------------------------------------------
# Errors


def test_bad_settings_fail_clearly(family, prompts):
    with pytest.raises(ConfigError, match="decoding method"):
        _ours(family, prompts, max_new_tokens=2, eos_token_id=None, method="sample")
    with pytest.raises(ConfigError, match="early_stopping"):
        _ours(family, prompts, max_new_tokens=2, eos_token_id=None, method="beam", num_beams=2, early_stopping="x")
    with pytest.raises(ConfigError, match="max_new_tokens"):
        _ours(family, prompts, max_new_tokens=0, eos_token_id=None)


# --------------------------------------------------------------------------------------------------
# Vision-language compositions: the prefill carries the visual tokens, the steps are plain LM steps.


def _tiny_vit() -> ViTModel:
    return ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                              image_size=(16, 16), patch_size=(8, 8)))


@pytest.fixture(scope="module", params=["prefix", "qformer"])
def vlm(request, prompts):
    """(name, module, params, pixel values) of a randomly initialised tiny VLM."""
    if request.param == "prefix":
        lm = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, max_position_embeddings=64, hidden_size=32,
                                        num_hidden_layers=2, num_attention_heads=4))
        model = PrefixVLM(vision_tower=_tiny_vit(), language_model=lm, lm_width=32,
                          connector=ConnectorConfig(kind="mlp", num_layers=2))
    else:
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2))
        qformer = QFormer(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, cross_attention_frequency=1, encoder_hidden_size=16,
                                     num_query_tokens=3, add_pooler=False))
        model = QFormerVLM(vision_model=_tiny_vit(), qformer=qformer, language_model=lm, lm_width=32,
                           num_query_tokens=3)
    ids, mask = (jnp.asarray(a, jnp.int32) for a in prompts)
    pixels = jax.random.normal(jax.random.key(1), (ids.shape[0], 16, 16, 3))
    # Random parameters drawn directly for the abstract shapes (no compiled init); weights with std 0.2
    # (not 0.02) give clearly non-uniform predictions, so that beams and scores differ.
    abstract = unbox(jax.eval_shape(model.init, jax.random.key(0), ids, mask, pixels)["params"])
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.ones(x.shape, x.dtype) if path[-1].key == "scale"
        else jnp.asarray(rng.normal(0.0, 0.2, x.shape), x.dtype), abstract)
    return request.param, model, params, pixels


def test_vlm_cached_decoding_equals_full_forward(vlm, prompts):
    """Greedy and beam search on a VLM: step logits and beam scores agree with one full forward pass."""
    name, model, params, pixels = vlm
    ids, mask = (jnp.asarray(a, jnp.int32) for a in prompts)
    step = ModuleApply(model)
    inputs = {"input_ids": ids, "pixel_values": pixels}
    n = 6

    @jax.jit
    def full_logits(new_tokens):
        full_ids = jnp.concatenate([ids, new_tokens], axis=1)
        full_mask = jnp.concatenate([mask, jnp.ones_like(new_tokens)], axis=1)
        return model.apply({"params": params}, full_ids, full_mask, pixels).logits[:, -n - 1:-1]

    greedy = generate(step, params, inputs, mask, max_new_tokens=n, eos_token_id=None, pad_token_id=PAD,
                      output_logits=True)
    diff = np.abs(np.asarray(greedy.logits) - np.asarray(full_logits(greedy.sequences))).max()
    print(f"{name} VLM: cached vs full-sequence logits, max abs diff {diff:.2e}")
    assert diff <= 1e-4
    if name != "prefix":
        return  # beam search's bookkeeping does not depend on the composition: one VLM suffices

    beam = generate(step, params, inputs, mask, max_new_tokens=n, eos_token_id=None, pad_token_id=PAD,
                    method="beam", num_beams=NUM_BEAMS, length_penalty=1.0)
    logp = jax.nn.log_softmax(full_logits(beam.sequences), -1)
    expected = jnp.take_along_axis(logp, beam.sequences[..., None], -1)[..., 0].sum(-1) / n
    diff = np.abs(np.asarray(beam.scores) - np.asarray(expected)).max()
    print(f"{name} VLM: beam score vs full-sequence log-probability, max abs diff {diff:.2e}")
    assert diff <= 1e-4
    assert (np.asarray(beam.scores) >= np.asarray(greedy.scores) - 1e-5).all()  # beam search finds no worse
