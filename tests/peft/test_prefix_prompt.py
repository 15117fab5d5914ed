"""Prefix tuning, prompt tuning and deep prompts: parity with peft (both directions), finalize, KV-cache decoding,
text init, evaluation-time prefix replacement and bad inputs (issue 5).

peft's prefix tuning passes the prefix as Hugging Face ``past_key_values``, so the real tokens are numbered from
``P``; our PrefixTuning shifts positions by ``P`` through the ``positions`` hook, so our model is called *without*
``position_ids``. With left padding, our positions skip the pads (``cumsum(mask) - 1``, as HF ``generate``), while
peft's ``forward`` alone numbers a padded row from its pad tokens; the peft reference is therefore called with
``position_ids = cumsum(mask) - 1`` (which peft shifts by ``P`` itself), and compared at real tokens. Run with
``-s`` to see the measured max abs differences.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.hf import peft_io
from vlpeft_jax.hf.decoders import load_gpt2, load_llama
from vlpeft_jax.models import hooks, layers
from vlpeft_jax.models.vit import ViTConfig, ViTModel
from vlpeft_jax.peft import base as pb
from vlpeft_jax.peft import registry
from vlpeft_jax.peft.prefix import PrefixTuning, replace_prefix
from vlpeft_jax.peft.prompt import DeepPromptTuning, PromptTuning

VOCAB, P = 64, 3
FAMILIES = ("gpt2", "llama")
KV_HEADS = {"gpt2": 4, "llama": 2}  # LLaMA with grouped-query attention: 4 query heads, 2 key/value heads


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    out = {}
    for family in FAMILIES:
        d = tmp_path_factory.mktemp(family)
        if family == "gpt2":
            cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=2, n_head=4)
            transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
            module, params = load_gpt2(d)
        else:
            cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
            transformers.LlamaForCausalLM(cfg).save_pretrained(d)
            module, params = load_llama(d)
        out[family] = (d, module, jax.tree_util.tree_map(jnp.asarray, params))
    return out


def hf_base(d):
    return transformers.AutoModelForCausalLM.from_pretrained(d).eval()


@functools.partial(jax.jit, static_argnames=("module", "methods", "decode", "train"))
def _apply(module, methods, params, peft_params, ids, mask, position_ids, cache, rng, decode, train):
    return pb.apply_with(module.apply, list(zip(methods, peft_params, strict=True)), {"params": params}, ids, mask,
                         position_ids=position_ids, cache=cache, decode=decode, rng=rng, train=train)


@functools.partial(jax.jit, static_argnames=("module", "methods"))
def _apply_vision(module, methods, params, peft_params, pixels):
    return pb.apply_with(module.apply, list(zip(methods, peft_params, strict=True)), {"params": params}, pixels)


def run(module, params, methods, ids, mask=None, *, position_ids=None, cache=None, rng=None, decode=False,
        train=False):
    """The model under ``[(method, peft_params), ...]``, jitted (eager op-by-op dispatch is much slower here)."""
    return _apply(module, tuple(m for m, _ in methods), params, tuple(p for _, p in methods), jnp.asarray(ids),
                  mask, position_ids, cache, rng, decode, train)


def inputs(seed, b=2, t=6, right_pad=0, left_pad=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    mask = torch.ones_like(ids)
    if right_pad:
        mask[1, -right_pad:] = 0
    if left_pad:
        mask[1, :left_pad] = 0
    return ids, mask


def generate_positions(mask):
    """HF ``generate``'s position ids: ``cumsum(mask) - 1``, pads set to 1 (never read)."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


@functools.partial(jax.jit, static_argnames=("module", "methods", "decode", "drop_kind"))
def _positions_seen(module, methods, params, peft_params, ids, mask, cache, decode, drop_kind=None):
    """The position ids the model finally uses (captured by an outermost ``positions`` hook) and the logits;
    ``drop_kind`` leaves out the methods' hooks of that kind."""
    seen = []

    def capture(ctx, nxt, positions):
        positions = nxt(positions)
        seen.append((ctx.decode, positions))
        return positions

    active = [h for m, p in zip(methods, peft_params, strict=True) for h in m.hooks(p) if h.kind != drop_kind]
    with hooks.use_hooks(active, hooks.Hook("positions", capture)):
        out = module.apply({"params": params}, ids, mask, cache=cache, decode=decode)
    assert len(seen) == 1 and seen[0][0] == decode
    return seen[0][1], out


def positions_seen(module, params, methods, ids, mask=None, *, cache=None, decode=False, drop_kind=None):
    ids = jnp.asarray(ids)
    mask = jnp.ones(ids.shape, jnp.int32) if mask is None else jnp.asarray(mask)
    return _positions_seen(module, tuple(m for m, _ in methods), params, tuple(p for _, p in methods), ids, mask,
                           cache, decode, drop_kind)


def randomise(module_, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module_.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))


def max_diff(ours, ref, mask=None):
    ours, ref = np.asarray(ours), np.asarray(ref)
    if mask is not None:
        real = np.asarray(mask, bool)
        ours, ref = ours[real], ref[real]
    return float(np.abs(ours - ref).max())


# ------------------------------------------------------------------------------------------------------
# Prefix tuning vs peft


def _check_against_peft(module, params, method, p, pm, ids, mask, label):
    """Ours (no position_ids) vs peft on a batch whose row 1 is left-padded; returns nothing, asserts ≤ 1e-5."""
    m = jnp.asarray(mask.numpy())
    with torch.no_grad():
        ref = pm(input_ids=ids, attention_mask=mask, position_ids=generate_positions(mask)).logits.numpy()
        plain = pm(input_ids=ids[:1], attention_mask=mask[:1]).logits.numpy()  # peft numbering its own positions
    ours = run(module, params, [(method, p)], ids.numpy(), m).logits
    diff = max_diff(ours, ref, mask)
    print(f"prefix {label}, left-padded batch, no position_ids: max |Δlogits| = {diff:.2e}")
    assert diff <= 1e-5
    diff = max_diff(np.asarray(ours)[:1], plain)
    print(f"prefix {label}, unpadded row vs peft forward without position_ids: max |Δlogits| = {diff:.2e}")
    assert diff <= 1e-5
    # explicit position_ids are shifted by P as peft shifts them
    explicit = run(module, params, [(method, p)], ids.numpy(), m,
                   position_ids=jnp.asarray(generate_positions(mask).numpy())).logits
    diff = max_diff(explicit, ref, mask)
    print(f"prefix {label}, explicit position_ids: max |Δlogits| = {diff:.2e}")
    assert diff <= 1e-5
    # without the positions shift the outputs differ: the checks above can fail
    _, unshifted = positions_seen(module, params, [(method, p)], ids.numpy(), m, drop_kind="positions")
    assert max_diff(unshifted.logits, ref, mask) > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("projection", [True, False])
def test_prefix_peft_saved_imported_here(models, family, projection, tmp_path):
    d, module, params = models[family]
    pm = peft.get_peft_model(hf_base(d), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection, encoder_hidden_size=8)).eval()
    randomise(pm.prompt_encoder["default"], 0.5, seed=1)
    pm.save_pretrained(tmp_path)
    method, p = peft_io.import_peft(tmp_path, params)
    assert isinstance(method, PrefixTuning) and method.num_kv_heads == KV_HEADS[family]
    layer0 = p["transformer"]["h_0"]["attn"] if family == "gpt2" else p["model"]["layers_0"]["self_attn"]
    assert layer0["prefix_keys"].shape == (P, KV_HEADS[family], 4) and np.abs(layer0["prefix_keys"]).min() > 0
    _check_against_peft(module, params, method, p, pm, *inputs(2, left_pad=2),
                        f"peft->ours {family} projection={projection}")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("projection", [True, False])
def test_prefix_trained_here_loads_in_peft(models, family, projection, tmp_path):
    d, module, params = models[family]
    method = PrefixTuning(num_virtual_tokens=P, num_kv_heads=KV_HEADS[family], projection=projection,
                          encoder_hidden_size=8)
    p = method.init(jax.random.key(3), params)
    assert ("prefix_encoder" in p) == projection
    peft_io.export_peft(method, p, d, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PREFIX_TUNING" and cfg["num_layers"] == 2 and cfg["prefix_projection"] == projection
    pm = peft.PeftModel.from_pretrained(hf_base(d), tmp_path).eval()
    _check_against_peft(module, params, method, p, pm, *inputs(4, left_pad=3),
                        f"ours->peft {family} projection={projection}")


def test_finalize_drops_the_encoder_with_identical_outputs(models):
    _, module, params = models["llama"]
    method = PrefixTuning(num_virtual_tokens=P, num_kv_heads=2, encoder_hidden_size=8)
    p = method.init(jax.random.key(5), params)
    plain = method.finalize(p)
    assert "prefix_encoder" not in plain
    assert method.num_params(plain) == 2 * 2 * P * 2 * 4  # layers x (keys, values) x P x kv_heads x head_dim
    # encoder: embedding P x 16, type embedding 16, dense 16x8+8, per layer out 8x16+16
    assert method.num_params(p) == P * 16 + 16 + 16 * 8 + 8 + 2 * (8 * 16 + 16)
    ids, _ = inputs(6)
    a = run(module, params, [(method, p)], ids.numpy()).logits
    b = run(module, params, [(method, plain)], ids.numpy()).logits
    assert max_diff(a, b) <= 1e-6
    assert max_diff(a, run(module, params, [], ids.numpy()).logits) > 1e-3
    # the type embedding is a real parameter: it gets gradient
    g = jax.grad(lambda q: run(module, params, [(method, q)], ids.numpy()).logits.sum())(p)
    assert float(jnp.abs(g["prefix_encoder"]["type_embedding"]).sum()) > 0


def _cached_vs_full(module, params, methods, ids, prefill, extra=0):
    """Logits of a prefill + one-token ``decode=True`` steps, and of the full sequence."""
    b, t = ids.shape
    full = run(module, params, methods, ids).logits
    cache = module.init_cache(b, t + extra)
    out = run(module, params, methods, ids[:, :prefill], jnp.ones((b, prefill), jnp.int32), cache=cache)
    steps, cache = [out.logits[:, -1]], out.cache
    for i in range(prefill, t - 1):
        out = run(module, params, methods, ids[:, i:i + 1], jnp.ones((b, 1), jnp.int32), cache=cache, decode=True)
        steps.append(out.logits[:, -1])
        cache = out.cache
    added = full.shape[1] - t  # prompt positions in front of the sequence
    # the prefill's last logits predict token `prefill`; each step's logits the token after the one fed
    return np.stack(steps, 1), np.asarray(full)[:, added + prefill - 1:added + t - 1]


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_with_kv_cache_decoding(models, family):
    _, module, params = models[family]
    method = PrefixTuning(num_virtual_tokens=P, num_kv_heads=KV_HEADS[family], encoder_hidden_size=8)
    p = method.init(jax.random.key(7), params)
    ids = jnp.asarray(inputs(8, t=8)[0].numpy())
    cached, full = _cached_vs_full(module, params, [(method, p)], ids, prefill=4)
    diff = max_diff(cached, full)
    print(f"prefix {family} KV-cache decode vs full sequence: max |Δlogits| = {diff:.2e}")
    assert cached.shape[1] == 4 and diff <= 1e-5
    # the prefill and each decode step number the real tokens from P (the cache holds no prefix)
    pos, out = positions_seen(module, params, [(method, p)], ids[:, :4], cache=module.init_cache(2, 8))
    np.testing.assert_array_equal(pos, np.broadcast_to(np.arange(P, P + 4), (2, 4)))
    pos, _ = positions_seen(module, params, [(method, p)], ids[:, 4:5], cache=out.cache, decode=True)
    np.testing.assert_array_equal(pos, np.full((2, 1), P + 4))


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_greedy_decoding_matches_peft(models, family, tmp_path):
    """Left-padded greedy decoding with our KV cache == peft's model on the whole decoded sequence.

    The reference is peft's ``forward`` over prompt + our greedy tokens (mask-aware positions, which peft shifts
    by P), read at the positions that predicted each new token. peft's own ``generate`` is not the reference:
    with peft 0.21.2 and transformers 5.24 its prefill receives an empty cache (transformers renamed the
    ``past_key_values`` argument to ``cache``), so it decodes without the prefix at all.
    """
    d, module, params = models[family]
    method = PrefixTuning(num_virtual_tokens=P, num_kv_heads=KV_HEADS[family], encoder_hidden_size=8)
    p = method.init(jax.random.key(21), params)
    peft_io.export_peft(method, p, d, tmp_path)
    pm = peft.PeftModel.from_pretrained(hf_base(d), tmp_path).eval()
    ids, mask = inputs(22, left_pad=2)
    new = 3
    out = run(module, params, [(method, p)], ids.numpy(), jnp.asarray(mask.numpy()),
              cache=module.init_cache(2, ids.shape[1] + new))
    steps, tokens = [np.asarray(out.logits[:, -1])], []
    for _ in range(new - 1):
        token = jnp.argmax(out.logits[:, -1], axis=-1)[:, None]
        tokens.append(np.asarray(token))
        out = run(module, params, [(method, p)], token, jnp.ones((2, 1), jnp.int32), cache=out.cache, decode=True)
        steps.append(np.asarray(out.logits[:, -1]))
    ours = np.stack(steps, 1)
    full_ids = torch.cat([ids, torch.from_numpy(np.concatenate(tokens, 1)).long()], 1)
    full_mask = torch.cat([mask, torch.ones(2, new - 1, dtype=mask.dtype)], 1)
    with torch.no_grad():
        logits = pm(input_ids=full_ids, attention_mask=full_mask, position_ids=generate_positions(full_mask)).logits
    ref = logits[:, ids.shape[1] - 1:].numpy()
    diff = max_diff(ours, ref)
    print(f"prefix {family} greedy decode (left-padded) vs peft on the decoded sequence: max |Δlogits| = {diff:.2e}")
    assert ref.shape == ours.shape and diff <= 1e-5
    np.testing.assert_array_equal(ours[:, :-1].argmax(-1), np.concatenate(tokens, 1))


def test_eval_replacement_of_the_prefix(models):
    _, module, params = models["gpt2"]
    method = PrefixTuning(num_virtual_tokens=P, num_kv_heads=4, encoder_hidden_size=8)
    p = method.init(jax.random.key(9), params)
    ids = inputs(10)[0].numpy()
    keep = run(module, params, [(method, p)], ids).logits
    base = run(module, params, [], ids).logits

    def ev(mode, **kw):
        m = PrefixTuning(num_virtual_tokens=P, num_kv_heads=4, encoder_hidden_size=8, eval_replacement=mode)
        return run(module, params, [(m, p)], ids, **kw).logits

    assert max_diff(ev("remove"), base) == 0.0  # "-Prefix": the model without any prefix (nor position shift)
    # positions: shifted by P whenever a prefix is there (kept, zeros, noise), not when it is removed
    mask = jnp.asarray([[1] * 6, [0, 0] + [1] * 4])
    real = np.array([list(range(6)), [0, 0, 0, 1, 2, 3]])
    for mode, shift in (("keep", P), ("zeros", P), ("noise", P), ("remove", 0)):
        m = PrefixTuning(num_virtual_tokens=P, num_kv_heads=4, encoder_hidden_size=8, eval_replacement=mode)
        pos, _ = positions_seen(module, params, [(m, p)], ids, mask)
        np.testing.assert_array_equal(pos, real + shift, err_msg=mode)
    assert max_diff(ev("remove", train=True), keep) == 0.0  # replacement only at evaluation
    zeros = ev("zeros")
    assert max_diff(zeros, base) > 1e-4 and max_diff(zeros, keep) > 1e-4  # zero keys still take attention mass
    noise = ev("noise", rng=jax.random.key(1))
    assert max_diff(noise, ev("noise", rng=jax.random.key(1))) == 0.0 and max_diff(noise, keep) > 1e-4
    plain = method.finalize(p)
    noisy = replace_prefix(plain, "noise", jax.random.key(2))
    k, nk = plain["transformer"]["h_0"]["attn"]["prefix_keys"], noisy["transformer"]["h_0"]["attn"]["prefix_keys"]
    assert abs(float(jnp.std(nk)) / float(jnp.std(k)) - 1) < 0.5 and max_diff(nk, k) > 0


# ------------------------------------------------------------------------------------------------------
# Prompt tuning vs peft


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_peft_saved_imported_here(models, family, tmp_path):
    d, module, params = models[family]
    pm = peft.get_peft_model(hf_base(d), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    randomise(pm.prompt_encoder["default"], 0.1, seed=11)
    ids, mask = inputs(12)
    with torch.no_grad():
        ref = pm(input_ids=ids, attention_mask=mask).logits.numpy()
    pm.save_pretrained(tmp_path)
    method, p = peft_io.import_peft(tmp_path, params)
    assert isinstance(method, PromptTuning)
    out = run(module, params, [(method, p)], ids.numpy(), jnp.asarray(mask.numpy()))
    assert out.logits.shape == (2, 4 + 6, VOCAB) and out.attention_mask.shape == (2, 10)
    diff = max_diff(out.logits, ref)
    print(f"prompt peft->ours {family}: max |Δlogits| = {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_trained_here_loads_in_peft(models, family, tmp_path):
    d, module, params = models[family]
    method = PromptTuning(num_virtual_tokens=4, init_from="vocab")
    p = method.init(jax.random.key(13), params)
    peft_io.export_peft(method, p, d, tmp_path)
    pm = peft.PeftModel.from_pretrained(hf_base(d), tmp_path).eval()
    ids, mask = inputs(14)
    with torch.no_grad():
        ref = pm(input_ids=ids, attention_mask=mask).logits.numpy()
    diff = max_diff(run(module, params, [(method, p)], ids.numpy(), jnp.asarray(mask.numpy())).logits, ref)
    print(f"prompt ours->peft {family}: max |Δlogits| = {diff:.2e}")
    assert diff <= 1e-5


def test_prompt_text_init_is_the_token_embeddings_of_the_text(models, tmp_path):
    from vlpeft_jax.data.tokenizer import WordTokenizer

    d, _, params = models["llama"]
    tok = WordTokenizer.train(["describe the image in one short sentence", "a photo of"])
    tok.save(tmp_path)
    text = "describe the image briefly"  # "briefly" is unknown: <unk>, as the tokenizer says
    ids = tok.encode(text)  # <bos> ... <eos>: peft keeps special tokens
    table = np.asarray(params["model"]["embed_tokens"]["embedding"])
    exact = PromptTuning(num_virtual_tokens=None, init_from="text", init_text=text, tokenizer=str(tmp_path))
    got = exact.init(jax.random.key(0), params)["model"]["embed_tokens"]["prompt_embeddings"]
    np.testing.assert_array_equal(got, table[ids])
    # a longer prompt repeats the text, as peft's TEXT init does
    n = len(ids) + 3
    method = PromptTuning(num_virtual_tokens=n, init_from="text", init_text=text, tokenizer=str(tmp_path))
    got = method.init(jax.random.key(0), params)["model"]["embed_tokens"]["prompt_embeddings"]
    pm = peft.get_peft_model(hf_base(d), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=n, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(tmp_path)))
    want = pm.prompt_encoder["default"].embedding.weight.detach().numpy()
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, table[(ids * 2)[:n]])
    with pytest.raises(ConfigError, match="longer than the prompt"):
        PromptTuning(num_virtual_tokens=len(ids) - 1, init_from="text", init_text=text,
                     tokenizer=str(tmp_path)).init(jax.random.key(0), params)
    # random init at the scale of the table (peft's N(0, 1) would dwarf it)
    r = PromptTuning(num_virtual_tokens=64).init(jax.random.key(0), params)["model"]["embed_tokens"]
    assert abs(float(jnp.std(r["prompt_embeddings"])) / table.std() - 1) < 0.3


def test_prompt_with_kv_cache_decoding(models):
    _, module, params = models["llama"]
    method = PromptTuning(num_virtual_tokens=4, init_from="vocab")
    p = method.init(jax.random.key(15), params)
    ids = jnp.asarray(inputs(16, t=8)[0].numpy())
    cached, full = _cached_vs_full(module, params, [(method, p)], ids, prefill=4, extra=4)
    assert max_diff(cached, full) <= 1e-5


def test_prompt_goes_after_the_class_token_of_image_embeddings():
    cfg = ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                    image_size=(8, 8), patch_size=(4, 4), add_pooling_layer=False)
    vit = ViTModel(cfg)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    params = layers.unbox(jax.jit(vit.init)(jax.random.key(1), x))["params"]
    method = PromptTuning(num_virtual_tokens=3, targets=("embeddings",))
    p = method.init(jax.random.key(2), params)
    plain = _apply_vision(vit, (), params, (), x).hidden_states[0]
    emb = _apply_vision(vit, (method,), params, (p,), x).hidden_states[0]
    assert emb.shape == (2, 1 + 3 + 4, 16)
    np.testing.assert_array_equal(emb[:, 0], plain[:, 0])
    np.testing.assert_array_equal(emb[:, 1:4], np.broadcast_to(p["embeddings"]["prompt_embeddings"], (2, 3, 16)))
    np.testing.assert_array_equal(emb[:, 4:], plain[:, 1:])
    deep = DeepPromptTuning(num_virtual_tokens=3, targets=("embeddings",))
    dp = deep.init(jax.random.key(3), params)
    assert pb.module_paths(dp, "layer_prompts") == [("encoder", "layer_1", "attention", "attention")]
    out = _apply_vision(vit, (deep,), params, (dp,), x)
    assert out.last_hidden_state.shape == (2, 8, 16)


# ------------------------------------------------------------------------------------------------------
# Deep prompts


def _capture_prompt_rows(module, params, method, p, ids, projection):
    """The normalised hidden state of the prompt rows entering every layer's attention, under prompt tuning."""

    @jax.jit
    def capture_run(params, p, ids):
        seen = {}

        def capture(ctx, nxt, x, kernel, bias):
            seen[ctx.path[:-1]] = x[:, :P]  # a traced value of this very trace: returned below
            return nxt(x, kernel, bias)

        where = lambda path: path[-1] == projection  # noqa: E731
        with hooks.use_hooks(method.hooks(p), hooks.Hook("linear", capture, where=where)):
            module.apply({"params": params}, ids)
        return seen

    return {k: np.asarray(v) for k, v in capture_run(params, p, jnp.asarray(ids)).items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_deep_prompts_with_natural_layer_prompts_are_prompt_tuning(models, family):
    _, module, params = models[family]
    deep = DeepPromptTuning(num_virtual_tokens=P, init_from="vocab")
    dp = deep.init(jax.random.key(17), params)
    layer_paths = pb.module_paths(dp, "layer_prompts")
    assert layer_paths == ([("transformer", "h_1", "attn")] if family == "gpt2" else
                           [("model", "layers_1", "self_attn")])
    embed_path = ("transformer", "wte") if family == "gpt2" else ("model", "embed_tokens")
    shallow = PromptTuning(num_virtual_tokens=P)
    sp = {}
    pb.set_path(sp, embed_path, {"prompt_embeddings": pb.get_path(dp, embed_path)["prompt_embeddings"]})
    ids = inputs(18)[0].numpy()
    seen = _capture_prompt_rows(module, params, shallow, sp, ids, "c_attn" if family == "gpt2" else "k_proj")
    natural = pb.copy_tree(dp)
    for path in layer_paths:
        rows = seen[path]
        np.testing.assert_allclose(rows[0], rows[1], atol=1e-6)  # the prompt rows never see the input
        pb.set_path(natural, path + ("layer_prompts",), jnp.asarray(rows[0]))
    want = run(module, params, [(shallow, sp)], ids).logits
    got = run(module, params, [(deep, natural)], ids).logits
    assert got.shape == (2, P + 6, VOCAB) and max_diff(got, want) <= 1e-5
    # learned (here: random) layer prompts change what the real tokens see
    assert max_diff(run(module, params, [(deep, dp)], ids).logits[:, P:], want[:, P:]) > 1e-3


def test_deep_prompts_decode_with_the_cache_and_train(models):
    _, module, params = models["llama"]
    deep = DeepPromptTuning(num_virtual_tokens=P, init_from="vocab")
    dp = deep.init(jax.random.key(19), params)
    ids = jnp.asarray(inputs(20, t=8)[0].numpy())
    cached, full = _cached_vs_full(module, params, [(deep, dp)], ids, prefill=4, extra=P)
    assert max_diff(cached, full) <= 1e-5
    g = jax.grad(lambda q: run(module, params, [(deep, q)], ids).logits[:, P:].sum())(dp)
    assert float(jnp.abs(g["model"]["layers_1"]["self_attn"]["layer_prompts"]).sum()) > 0
    assert float(jnp.abs(g["model"]["embed_tokens"]["prompt_embeddings"]).sum()) > 0


# ------------------------------------------------------------------------------------------------------
# Bad inputs and the registry


def test_bad_inputs(models):
    _, _, params = models["gpt2"]
    with pytest.raises(ConfigError, match="num_virtual_tokens=0"):
        PrefixTuning(num_virtual_tokens=0, num_kv_heads=4)
    with pytest.raises(ConfigError, match="set num_kv_heads"):
        PrefixTuning()
    with pytest.raises(ConfigError, match="num_kv_heads=3 does not divide the key width 16"):
        PrefixTuning(num_kv_heads=3).init(jax.random.key(0), params)
    with pytest.raises(ConfigError, match="matches no attention module; available: transformer/h_0/attn"):
        PrefixTuning(num_kv_heads=4, targets=("self_attn",)).init(jax.random.key(0), params)
    with pytest.raises(ConfigError, match="eval_replacement='blur'"):
        PrefixTuning(num_kv_heads=4, eval_replacement="blur")
    with pytest.raises(ConfigError, match="cannot be merged"):
        PrefixTuning(num_kv_heads=4).merge(params, {})
    with pytest.raises(ConfigError, match="num_virtual_tokens=0"):
        PromptTuning(num_virtual_tokens=0)
    with pytest.raises(ConfigError, match="3 tokens, longer than the prompt"):
        PromptTuning(num_virtual_tokens=2, init_from="text", init_token_ids=(1, 2, 3))
    with pytest.raises(ConfigError, match="needs init_text and tokenizer"):
        PromptTuning(init_from="text")
    with pytest.raises(ConfigError, match="needs init_from='text'"):
        PromptTuning(num_virtual_tokens=None)
    with pytest.raises(ConfigError, match="init_from='bogus'"):
        PromptTuning(init_from="bogus")
    with pytest.raises(ConfigError, match=r"ids must be in \[0, 64\)"):
        PromptTuning(num_virtual_tokens=3, init_from="text", init_token_ids=(1, 99)).init(jax.random.key(0), params)
    with pytest.raises(ConfigError, match="matches no embedding module"):
        PromptTuning(targets=("nope",)).init(jax.random.key(0), params)
    with pytest.raises(ConfigError, match="cannot be merged"):
        DeepPromptTuning().merge(params, {})
    with pytest.raises(ConfigError, match="num_virtual_tokens=0"):
        DeepPromptTuning(num_virtual_tokens=0)
    with pytest.raises(peft_io.AdapterShapeError, match="has 3 layers but"):
        peft_io.import_peft_state({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 1, "num_attention_heads": 4,
                                   "token_dim": 16, "num_layers": 3},
                                  {"prompt_embeddings": np.zeros((1, 3 * 2 * 16))}, params)


def test_registry_builds_hashable_methods():
    m = registry.build_method("prefix", {"num_virtual_tokens": 8, "num_kv_heads": 2, "targets": ["self_attn"]})
    assert isinstance(m, PrefixTuning) and m.targets == ("self_attn",) and hash(m) == hash(m)
    d = registry.build_method("deep_prompt", {"num_virtual_tokens": 2})
    assert isinstance(d, DeepPromptTuning) and d.name == "deep_prompt" and hash(d)
    assert isinstance(registry.build_method("prompt", {"init_token_ids": [1, 2], "init_from": "text"}), PromptTuning)
    with pytest.raises(ConfigError, match="num_virtual_tokens=0"):
        registry.build_method("prompt", {"num_virtual_tokens": 0})
