"""Parity of our decoder LMs (GPT-2, LLaMA, Qwen2) with transformers' PyTorch models, KV cache, hooks, IO.

Tiny random Hugging Face models are built once per module, saved (safetensors, sharded safetensors,
pytorch_model.bin, base-class checkpoints), loaded with our loaders and compared on logits and every
hidden state. Run with ``-s`` to see the table of measured max abs differences.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from tests.max_diffs import MaxDiffs
from vlpeft_jax.errors import CheckpointError, ConfigError
from vlpeft_jax.hf import decoders, io
from vlpeft_jax.models import hooks, llama

jax.config.update("jax_default_matmul_precision", "highest")

TOL = 1e-4
VOCAB = 211
BATCH, LENGTH = 3, 10

MAX_DIFFS = MaxDiffs("max abs diff vs transformers (fp32)")
report_max_diffs = MAX_DIFFS.fixture()
record = MAX_DIFFS.record


# --------------------------------------------------------------------------------------------------
# Reference models (built once per module)

SPECS = {
    # GPT-2, tied head (as released), plain safetensors.
    "gpt2": dict(cls="GPT2LMHeadModel", save="safetensors", config=dict(
        vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4)),
    # GPT-2 with an untied head, exact gelu and per-layer attention scaling, through pytorch_model.bin.
    "gpt2_untied": dict(cls="GPT2LMHeadModel", save="bin", config=dict(
        vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, tie_word_embeddings=False,
        activation_function="gelu", scale_attn_by_inverse_layer_idx=True)),
    # LLaMA: GQA 8 query / 2 kv heads, explicit head_dim (8 x 16 != 64), llama3 RoPE scaling, untied,
    # sharded safetensors.
    "llama_gqa": dict(cls="LlamaForCausalLM", save="sharded", config=dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16))),
    # LLaMA with a tied head, linear RoPE scaling, attention and MLP biases.
    "llama_tied": dict(cls="LlamaForCausalLM", save="safetensors", config=dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        rope_parameters=dict(rope_type="linear", rope_theta=500000.0, factor=2.0))),
    # Qwen2: q/k/v biases, GQA, tied head (as Qwen2-0.5B), through pytorch_model.bin.
    "qwen2": dict(cls="Qwen2ForCausalLM", save="bin", config=dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
}


def _config_class(cls_name: str):
    return {"GPT2LMHeadModel": transformers.GPT2Config, "LlamaForCausalLM": transformers.LlamaConfig,
            "Qwen2ForCausalLM": transformers.Qwen2Config}[cls_name]


def _make_hf(spec: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    config = _config_class(spec["cls"])(**spec["config"])
    config._attn_implementation = "eager"
    model = getattr(transformers, spec["cls"])(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a missed one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _save(model: torch.nn.Module, how: str, directory) -> None:
    if how == "safetensors":
        model.save_pretrained(directory)
    elif how == "sharded":
        model.save_pretrained(directory, max_shard_size="40KB")
        assert (directory / "model.safetensors.index.json").is_file()
        assert len(list(directory.glob("model-*.safetensors"))) > 1
    elif how == "bin":
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    else:
        raise ValueError(how)


class Family:
    """A reference HF model, its checkpoint directory, our model and params, and jitted forwards."""

    def __init__(self, name: str, tmp_dir):
        spec = SPECS[name]
        self.name = name
        self.hf = _make_hf(spec)
        self.dir = tmp_dir / name
        self.dir.mkdir()
        _save(self.hf, spec["save"], self.dir)
        self.loader = decoders.load_gpt2 if spec["cls"] == "GPT2LMHeadModel" else decoders.load_llama
        self.model, self.params = self.loader(self.dir)
        self.forward = jax.jit(lambda p, ids, mask: self.model.apply({"params": p}, ids, mask))

        @functools.partial(jax.jit, static_argnames="decode")
        def cached(p, ids, mask, cache, decode):
            return self.model.apply({"params": p}, ids, mask, cache=cache, decode=decode)

        self.cached = cached

    def hf_forward(self, ids: np.ndarray, mask: np.ndarray, position_ids: np.ndarray | None = None,
                   inputs_embeds: torch.Tensor | None = None):
        kwargs = dict(attention_mask=torch.tensor(mask), output_hidden_states=True)
        if position_ids is not None:
            kwargs["position_ids"] = torch.tensor(position_ids)
        with torch.no_grad():
            if inputs_embeds is not None:
                return self.hf(inputs_embeds=inputs_embeds, **kwargs)
            return self.hf(input_ids=torch.tensor(ids), **kwargs)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("decoders")
    cache: dict[str, Family] = {}

    def get(name: str) -> Family:
        if name not in cache:
            cache[name] = Family(name, tmp)
        return cache[name]

    return get


def _batch(padding: str, seed: int = 0, length: int = LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and a mask for sequences of ``length``, ``length - 2``, ``length - 4`` tokens (padded left/right)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(BATCH, length)).astype(np.int32)
    mask = np.zeros((BATCH, length), np.int32)
    for row, n in enumerate((length, length - 2, length - 4)):
        if padding == "right":
            mask[row, :n] = 1
        else:
            mask[row, length - n:] = 1
    ids = np.where(mask == 1, ids, 0).astype(np.int32)
    return ids, mask


def _generate_position_ids(mask: np.ndarray) -> np.ndarray:
    """What transformers' generate passes: cumsum(mask) - 1, 0 where masked."""
    return np.where(mask == 1, np.cumsum(mask, -1) - 1, 0)


def _masked_max_diff(ours, ref, mask: np.ndarray) -> float:
    diff = np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64))
    return float(diff[mask.astype(bool)].max())


# --------------------------------------------------------------------------------------------------
# Parity of full forward passes


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("padding", ["right", "left"])
def test_logits_and_hidden_states_match_transformers(families, name, padding):
    fam = families(name)
    ids, mask = _batch(padding)
    # HF's forward numbers positions 0..t-1 whatever the mask; generate passes cumsum(mask)-1, which
    # is what our model computes from the mask by itself.
    ref = fam.hf_forward(ids, mask, position_ids=_generate_position_ids(mask))
    out = fam.forward(fam.params, ids, mask)
    n_layers = fam.model.config.num_hidden_layers
    assert len(out.hidden_states) == len(ref.hidden_states) == n_layers + 1
    logit_diff = _masked_max_diff(out.logits, ref.logits.numpy(), mask)
    hidden_diff = max(_masked_max_diff(a, b.numpy(), mask)
                      for a, b in zip(out.hidden_states, ref.hidden_states, strict=True))
    record(f"{name} logits ({padding} padding)", logit_diff)
    record(f"{name} hidden states ({padding} padding)", hidden_diff)
    assert out.logits.shape == (BATCH, LENGTH, VOCAB)
    assert logit_diff <= TOL, logit_diff
    assert hidden_diff <= TOL, hidden_diff
    np.testing.assert_array_equal(out.attention_mask, mask)


def test_unpadded_batch_matches_hf_default_positions(families):
    """Without padding our positions are HF's own default (0..t-1)."""
    fam = families("gpt2")
    ids = np.random.default_rng(1).integers(0, VOCAB, (BATCH, LENGTH)).astype(np.int32)
    ref = fam.hf(input_ids=torch.tensor(ids)).logits.detach().numpy()
    out = fam.forward(fam.params, ids, np.ones_like(ids))
    diff = np.abs(np.asarray(out.logits) - ref).max()
    record("gpt2 logits (no mask)", diff)
    assert diff <= TOL


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_logits_to_keep_and_causal_lm_loss_match_transformers(families, name):
    """``logits_to_keep`` keeps the last positions as HF's does, and the causal-LM loss on them (labels shifted,
    -100 ignored) is HF's ``labels=`` loss."""
    from vlpeft_jax.train.losses import causal_lm_loss

    fam = families(name)
    ids = np.random.default_rng(2).integers(0, VOCAB, (BATCH, LENGTH)).astype(np.int32)
    labels = ids.copy()
    labels[:, :3] = -100  # a prompt
    labels[0, -2:] = -100  # padding of one row
    ref = fam.hf(input_ids=torch.tensor(ids), logits_to_keep=4)
    ref_loss = float(fam.hf(input_ids=torch.tensor(ids), labels=torch.tensor(labels).long()).loss)
    out = jax.jit(lambda p: fam.model.apply({"params": p}, ids, np.ones_like(ids), logits_to_keep=4))(fam.params)
    assert out.logits.shape == (BATCH, 4, VOCAB)
    diff = np.abs(np.asarray(out.logits) - ref.logits.detach().numpy()).max()
    record(f"{name} logits_to_keep=4", diff)
    assert diff <= TOL
    full = fam.forward(fam.params, ids, np.ones_like(ids)).logits
    loss, metrics = causal_lm_loss(full, labels)
    record(f"{name} causal LM loss", abs(float(loss) - ref_loss))
    assert abs(float(loss) - ref_loss) <= 1e-5
    assert 0.0 <= float(metrics["token_accuracy"]) <= 1.0
    with pytest.raises(ValueError, match="logits_to_keep=-1"):
        fam.model.apply({"params": fam.params}, ids, logits_to_keep=-1)


def test_inputs_embeds_and_embed_tokens(families):
    fam = families("gpt2")
    ids, mask = _batch("left")
    embeds = fam.model.apply({"params": fam.params}, ids, method="embed_tokens")
    from_ids = fam.forward(fam.params, ids, mask).logits
    from_embeds = jax.jit(lambda p, m, e: fam.model.apply({"params": p}, None, m, inputs_embeds=e))(
        fam.params, mask, embeds).logits
    np.testing.assert_allclose(from_embeds, from_ids, atol=1e-6)


def test_base_class_checkpoint_loads(families, tmp_path):
    """A checkpoint saved from GPT2Model (keys without 'transformer.') loads into the LM with a tied head."""
    fam = families("gpt2")
    fam.hf.transformer.save_pretrained(tmp_path)
    keys = load_file(str(tmp_path / "model.safetensors")).keys()
    assert "wte.weight" in keys and not any(k.startswith("transformer.") for k in keys)
    model, params = decoders.load_gpt2(tmp_path)
    assert model.config == fam.model.config
    jax.tree.map(np.testing.assert_array_equal, params, fam.params)


# --------------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_kv_cache_decoding_matches_full_sequence(families, name):
    """Prefill a left-padded prompt, then feed tokens one at a time: logits equal the full-sequence ones."""
    fam = families(name)
    n_new = 4
    prompt, prompt_mask = _batch("left", seed=2, length=LENGTH - n_new)  # the full sequence is LENGTH long
    new_tokens = np.random.default_rng(3).integers(1, VOCAB, (BATCH, n_new)).astype(np.int32)
    full_ids = np.concatenate([prompt, new_tokens], 1)
    full_mask = np.concatenate([prompt_mask, np.ones_like(new_tokens)], 1)
    full = np.asarray(fam.forward(fam.params, full_ids, full_mask).logits)

    cache = fam.model.init_cache(BATCH, LENGTH + 3)  # spare slots must stay masked out
    out = fam.cached(fam.params, prompt, prompt_mask, cache, decode=False)
    step_logits = [np.asarray(out.logits)]
    cache = out.cache
    assert int(cache.index) == LENGTH - n_new
    for j in range(n_new):
        out = fam.cached(fam.params, new_tokens[:, j:j + 1], np.ones((BATCH, 1), np.int32), cache, decode=True)
        cache = out.cache
        step_logits.append(np.asarray(out.logits))
    assert int(cache.index) == LENGTH
    cached = np.concatenate(step_logits, 1)
    diff = _masked_max_diff(cached, full, full_mask)
    record(f"{name} KV-cache decode vs full sequence", diff)
    assert diff <= TOL, diff
    # and against transformers on the full sequence
    ref = fam.hf_forward(full_ids, full_mask, position_ids=_generate_position_ids(full_mask)).logits.numpy()
    diff_hf = _masked_max_diff(cached, ref, full_mask)
    record(f"{name} KV-cache decode vs transformers", diff_hf)
    assert diff_hf <= TOL, diff_hf


# --------------------------------------------------------------------------------------------------
# Hook points


def _prompt_hook(prompt: jax.Array) -> hooks.Hook:
    """Prepends learned prompt embeddings at the prefill only (like prompt tuning)."""

    def fn(ctx, nxt, ids, embeds, mask):
        embeds, mask = nxt(ids, embeds, mask)
        if ctx.decode:
            return embeds, mask
        b = embeds.shape[0]
        p = jnp.broadcast_to(prompt[None], (b, *prompt.shape)).astype(embeds.dtype)
        return jnp.concatenate([p, embeds], 1), jnp.concatenate([jnp.ones((b, prompt.shape[0]), mask.dtype), mask], 1)

    return hooks.Hook("embed", fn)


def _jit_with_hooks(model, active_hooks, **apply_kwargs):
    """``model.apply`` jitted with hooks active while it is traced (how PEFT steps run)."""

    @functools.partial(jax.jit, static_argnames="decode")
    def run(params, ids, mask, cache=None, decode=False):
        with hooks.use_hooks(active_hooks):
            return model.apply({"params": params}, ids, mask, cache=cache, decode=decode, **apply_kwargs)

    return run


def test_embed_hook_prepends_tokens_and_positions_follow(families):
    """GPT-2 (absolute positions): a prompt added by the hook shifts positions exactly as in HF."""
    fam = families("gpt2")
    ids, mask = _batch("right")
    prompt = np.random.default_rng(4).normal(size=(3, 64)).astype(np.float32)
    out = _jit_with_hooks(fam.model, _prompt_hook(jnp.asarray(prompt)))(fam.params, ids, mask)
    hf_embeds = torch.cat([torch.tensor(prompt)[None].expand(BATCH, -1, -1),
                           fam.hf.transformer.wte(torch.tensor(ids))], 1)
    hf_mask = np.concatenate([np.ones((BATCH, 3), np.int32), mask], 1)
    ref = fam.hf_forward(None, hf_mask, inputs_embeds=hf_embeds)
    assert out.logits.shape == (BATCH, LENGTH + 3, VOCAB)
    np.testing.assert_array_equal(out.attention_mask, hf_mask)
    diff = _masked_max_diff(out.logits, ref.logits.numpy(), hf_mask)
    record("gpt2 logits with a 3-token embed-hook prompt", diff)
    assert diff <= TOL


def test_embed_hook_with_cache(families):
    """The prompt is added at the prefill; decoding steps (decode=True) continue after it."""
    fam = families("llama_gqa")
    run = _jit_with_hooks(fam.model, _prompt_hook(jnp.asarray(np.random.default_rng(5).normal(size=(2, 64)),
                                                              jnp.float32)))
    ids, mask = _batch("left", seed=6)
    n_new = 2
    new = np.random.default_rng(7).integers(1, VOCAB, (BATCH, n_new)).astype(np.int32)
    full = run(fam.params, np.concatenate([ids, new], 1), np.concatenate([mask, np.ones_like(new)], 1))
    out = run(fam.params, ids, mask, fam.model.init_cache(BATCH, 2 + LENGTH + n_new))
    steps = [out.logits]
    for j in range(n_new):
        out = run(fam.params, new[:, j:j + 1], np.ones((BATCH, 1), np.int32), out.cache, decode=True)
        steps.append(out.logits)
    assert int(out.cache.index) == 2 + LENGTH + n_new
    diff = _masked_max_diff(np.concatenate(steps, 1), full.logits, np.asarray(full.attention_mask))
    record("llama_gqa KV-cache decode with embed-hook prompt", diff)
    assert diff <= TOL, diff


@pytest.mark.parametrize("name,expected", [
    ("gpt2", {"embed": {"transformer/wte"}, "positions": {"transformer"},
              "attention": {f"transformer/h_{i}/attn" for i in range(2)},
              "mlp": {f"transformer/h_{i}/mlp" for i in range(2)}, "final_hidden": {"transformer/ln_f"},
              "lm_head": {"lm_head"}}),
    ("qwen2", {"embed": {"model/embed_tokens"}, "positions": {"model"},
               "attention": {f"model/layers_{i}/self_attn" for i in range(2)},
               "mlp": {f"model/layers_{i}/mlp" for i in range(2)}, "final_hidden": {"model/norm"},
               "lm_head": {"lm_head"}}),
])
def test_hook_points_and_paths(families, name, expected):
    fam = families(name)
    seen: dict[str, set[str]] = {k: set() for k in hooks.HOOK_KINDS}

    def recorder(kind):
        def fn(ctx, nxt, *args):
            seen[kind].add(ctx.name)
            if kind == "attention":
                assert ctx.inputs is not None and ctx.positions is not None
            return nxt(*args)
        return hooks.Hook(kind, fn)

    ids, mask = _batch("right")
    with hooks.use_hooks([recorder(k) for k in hooks.HOOK_KINDS]):  # tracing runs the hooks; no compile needed
        jax.eval_shape(lambda p: fam.model.apply({"params": p}, ids, mask), fam.params)
    for kind, paths in expected.items():
        assert seen[kind] == paths, (kind, seen[kind])
    # every projection is a Linear: its linear-hook path is a parameter path holding a kernel
    flat = io.flatten_tree(fam.params)
    kernels = {k[: -len("/kernel")] for k in flat if k.endswith("/kernel")}
    assert seen["linear"] == kernels


# --------------------------------------------------------------------------------------------------
# Export round trip


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "qwen2"])
def test_to_hf_state_dict_round_trip(families, name, tmp_path):
    fam = families(name)
    exported = decoders.to_hf_state_dict(fam.params, fam.model.config)
    hf_state = {k: v.numpy() for k, v in fam.hf.state_dict().items()}
    tied = fam.model.config.tie_word_embeddings
    expected_keys = {k for k in hf_state if not (tied and k == "lm_head.weight")}
    assert set(exported) == expected_keys
    for k, v in exported.items():
        np.testing.assert_array_equal(v, hf_state[k], err_msg=k)
    # and back in through a saved checkpoint
    save_file(exported, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(fam.hf.config.to_dict()))
    _, params = fam.loader(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, params, fam.params)


# --------------------------------------------------------------------------------------------------
# Bad input


def test_unsupported_rope_scaling_is_named():
    cfg = dict(SPECS["llama_gqa"]["config"], model_type="llama",
               rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    with pytest.raises(ConfigError, match=r"'yarn'.*default, linear, llama3"):
        llama.LlamaConfig.from_hf(cfg)
    old_style = {"model_type": "llama", "rope_theta": 10000.0, "rope_scaling": {"type": "dynamic", "factor": 2.0}}
    with pytest.raises(ConfigError, match="'dynamic'"):
        llama.LlamaConfig.from_hf(old_style)


def test_old_style_rope_config_is_read():
    cfg = llama.LlamaConfig.from_hf({"model_type": "llama", "rope_theta": 500000.0, "hidden_size": 64,
                                     "num_attention_heads": 4, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert (cfg.rope_theta, cfg.rope_type, cfg.rope_factor, cfg.head_dim) == (500000.0, "linear", 2.0, 16)


def _broken_copy(families, tmp_path, edit) -> str:
    fam = families("llama_tied")
    state = load_file(str(fam.dir / "model.safetensors"))
    edit(state)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((fam.dir / "config.json").read_text())
    return str(tmp_path)


def test_missing_tensor_is_named(families, tmp_path):
    key = "model.layers.1.mlp.up_proj.weight"
    d = _broken_copy(families, tmp_path, lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        decoders.load_llama(d)


def test_wrong_shape_is_named(families, tmp_path):
    key = "model.layers.0.self_attn.k_proj.weight"  # [64, 64] in the checkpoint

    def edit(state):
        state[key] = np.zeros((32, 64), np.float32)

    d = _broken_copy(families, tmp_path, edit)
    with pytest.raises(CheckpointError) as err:
        decoders.load_llama(d)
    msg = str(err.value)
    assert key in msg and "(32, 64)" in msg and "(64, 64)" in msg, msg


def test_non_decoder_model_type_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="'bert'.*gpt2, llama, opt, qwen2"):
        decoders.load_decoder(tmp_path)
