"""Every hook point of a decoder, proven by plugging in a trivial function and checking its effect.

Each check compares against an independent construction (edited weights, hand-built embeddings), so a
hook point that is not wired, or wired in the wrong place, fails.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpeft_jax.models import hooks, layers
from vlpeft_jax.models.llama import LlamaConfig, LlamaForCausalLM
from vlpeft_jax.peft import base as pb

CFG = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def lm():
    model = LlamaForCausalLM(CFG)
    ids = jax.random.randint(jax.random.key(0), (2, 7), 0, CFG.vocab_size)
    params = layers.unbox(model.init(jax.random.key(1), ids))["params"]
    mask = jnp.array([[1] * 7, [0, 0] + [1] * 5])

    def run(p, *hk, **kw):
        with hooks.use_hooks(*hk):
            return model.apply({"params": p}, ids, mask, **kw)

    return model, params, ids, mask, run


def _zeroed(params, name):
    p = pb.copy_tree(params)
    for path in pb.module_paths(params):
        if path[-1] == name:
            k = pb.get_path(params, path + ("kernel",))
            pb.set_path(p, path + ("kernel",), jnp.zeros_like(k))
    return p


def test_linear_hook_equals_edited_weights(lm):
    _, params, _, _, run = lm
    zero_o = hooks.Hook("linear", lambda c, nxt, x, w, b: 0 * nxt(x, w, b), where=hooks.path_matcher(".*/o_proj"))
    np.testing.assert_allclose(run(params, zero_o).logits, run(_zeroed(params, "o_proj")).logits, atol=1e-6)


def test_mlp_hook_equals_edited_weights(lm):
    _, params, _, _, run = lm
    zero_mlp = hooks.Hook("mlp", lambda c, nxt, x: jnp.zeros_like(nxt(x)))
    np.testing.assert_allclose(run(params, zero_mlp).logits, run(_zeroed(params, "down_proj")).logits, atol=1e-6)


def test_attention_hook_prefix_kv_second_mask_and_knockout(lm):
    _, params, _, _, run = lm
    base = run(params)

    # extra per-layer prefix keys/values that are fully masked change nothing
    def masked_prefix(c, nxt, q, k, v, bias):
        b, _, kvh, d = k.shape
        pk = jnp.ones((b, 3, kvh, d))
        bias = jnp.broadcast_to(bias, (b, bias.shape[1], q.shape[1], k.shape[1]))
        extra = jnp.full(bias.shape[:3] + (3,), layers.NEG_INF)
        return nxt(q, jnp.concatenate([pk, k], 1), jnp.concatenate([pk, v], 1), jnp.concatenate([extra, bias], -1))

    real = np.asarray(lm[3], bool)  # padded query rows attend uniformly to whatever keys exist: skip them
    out = run(params, hooks.Hook("attention", masked_prefix))
    np.testing.assert_allclose(np.asarray(out.logits)[real], np.asarray(base.logits)[real], atol=1e-5)

    # a second mask mixed by a gate: gate 1 on the first mask is the plain model
    def mixed(c, nxt, q, k, v, bias):
        gate = jnp.ones(q.shape[:2] + (1, 1))
        blocked = bias + layers.NEG_INF * (jnp.arange(k.shape[1]) > 0)
        return gate * nxt(q, k, v, bias) + (1 - gate) * nxt(q, k, v, blocked)

    np.testing.assert_allclose(run(params, hooks.Hook("attention", mixed)).logits, base.logits, atol=1e-5)

    # knockout: block the edge (source 2 -> target 6) in layer 1 only
    def knockout(c, nxt, q, k, v, bias):
        block = jnp.zeros((q.shape[1], k.shape[1])).at[6, 2].set(layers.NEG_INF)
        return nxt(q, k, v, bias + block)

    out = run(params, hooks.Hook("attention", knockout, where=lambda p: hooks.HookContext("attention", p).layer == 1))
    hs, bhs = out.hidden_states, base.hidden_states
    np.testing.assert_allclose(hs[1], bhs[1], atol=1e-6)  # before layer 1: untouched
    np.testing.assert_allclose(hs[2][:, :6], bhs[2][:, :6], atol=1e-6)  # other targets in layer 1: untouched
    assert np.abs(np.asarray(hs[2][:, 6] - bhs[2][:, 6])).max() > 1e-4  # the blocked target changed


def test_embed_hook_prepends_prompt_like_inputs_embeds(lm):
    model, params, ids, mask, run = lm
    prompt = jax.random.normal(jax.random.key(5), (2, CFG.hidden_size))

    def prepend(c, nxt, i, e, m):
        e, m = nxt(i, e, m)
        b = e.shape[0]
        return (jnp.concatenate([jnp.broadcast_to(prompt, (b,) + prompt.shape), e], 1),
                jnp.concatenate([jnp.ones((b, 2), m.dtype), m], 1))

    out = run(params, hooks.Hook("embed", prepend))
    assert out.logits.shape[1] == ids.shape[1] + 2
    embeds = model.apply({"params": params}, ids, method=model.embed_tokens)
    manual = model.apply({"params": params}, None, jnp.concatenate([jnp.ones((2, 2), mask.dtype), mask], 1),
                         inputs_embeds=jnp.concatenate([jnp.broadcast_to(prompt, (2, 2, CFG.hidden_size)), embeds], 1))
    np.testing.assert_allclose(out.logits, manual.logits, atol=1e-5)


def test_final_hidden_and_lm_head_hooks(lm):
    _, params, _, _, run = lm
    out = run(params, hooks.Hook("final_hidden", lambda c, nxt, h: jnp.zeros_like(nxt(h))))
    np.testing.assert_array_equal(out.logits, np.zeros(out.logits.shape))  # tied head, no bias
    half = run(params, hooks.Hook("lm_head", lambda c, nxt, h: 0.5 * nxt(h)))
    np.testing.assert_allclose(half.logits, 0.5 * run(params).logits, atol=1e-6)


def test_positions_hook_rewrites_computed_and_given_positions(lm):
    model, params, ids, mask, run = lm
    seen = []

    # rotary attention depends on relative positions only: stretch them (a uniform shift would change nothing)
    def stretch(c, nxt, pos):
        seen.append((c.path, c.decode))
        return 2 * nxt(pos) + 3

    hook = hooks.Hook("positions", stretch)
    computed = layers.positions_from_mask(mask, *mask.shape)  # left padding skipped: cumsum(mask) - 1
    want = run(params, position_ids=2 * computed + 3).logits
    np.testing.assert_allclose(run(params, hook).logits, want, atol=1e-5)
    assert seen == [(("model",), False)]
    # explicit position_ids go through the hook too
    np.testing.assert_allclose(run(params, hook, position_ids=computed).logits, want, atol=1e-5)
    assert np.abs(np.asarray(want - run(params).logits)).max() > 1e-4
    # with a KV cache: the prefill and each decode step (ctx.decode set), positions continued from the cache
    seen.clear()
    cache = model.init_cache(2, 8)
    with hooks.use_hooks(hook):
        out = model.apply({"params": params}, ids[:, :6], mask[:, :6], cache=cache)
        step = model.apply({"params": params}, ids[:, 6:], jnp.ones((2, 1), jnp.int32), cache=out.cache, decode=True)
    assert seen == [(("model",), False), (("model",), True)]
    np.testing.assert_allclose(step.logits[:, -1], want[:, -1], atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_positions_hook_in_gpt2_and_bert(family):
    from vlpeft_jax.models.bert import BertConfig, BertModel
    from vlpeft_jax.models.gpt2 import GPT2Config, GPT2LMHeadModel

    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=40, max_position_embeddings=16, hidden_size=16,
                                           num_hidden_layers=1, num_attention_heads=2))
        trunk, main = ("transformer",), lambda out: out.logits
    else:
        model = BertModel(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16))
        trunk, main = (), lambda out: out.last_hidden_state
    ids = jax.random.randint(jax.random.key(0), (2, 5), 0, 40)
    mask = jnp.ones((2, 5), jnp.int32)
    params = layers.unbox(model.init(jax.random.key(1), ids, mask))["params"]
    seen = []

    def shift2(c, nxt, pos):
        seen.append(c.path)
        return nxt(pos) + 2

    positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
    with hooks.use_hooks(hooks.Hook("positions", shift2)):
        got = main(model.apply({"params": params}, ids, mask))
    want = main(model.apply({"params": params}, ids, mask, position_ids=positions + 2))
    assert seen == [trunk]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(np.asarray(want - main(model.apply({"params": params}, ids, mask)))).max() > 1e-4
