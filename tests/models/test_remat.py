"""Per-layer rematerialisation (``remat`` config field): same parameter tree, same loss, same gradients, hooks
(LoRA, records, side inputs) and the KV-cache decode path unchanged."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.models import hooks, layers
from vlpeft_jax.models.registry import build_model
from vlpeft_jax.peft import base as pb
from vlpeft_jax.peft.registry import build_method

POLICIES = ("full", "dots", "dots_no_batch")
FAMILIES = {
    "gpt2": {"family": "gpt2", "vocab_size": 31, "max_position_embeddings": 16, "hidden_size": 16,
             "num_hidden_layers": 2, "num_attention_heads": 2},
    "llama": {"family": "llama", "vocab_size": 31, "hidden_size": 16, "intermediate_size": 24,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
}
TARGETS = {"gpt2": ("c_attn", "c_fc"), "llama": ("q_proj", "v_proj", "down_proj")}


def _probe(ctx: hooks.HookContext, nxt, q, k, v, bias):
    """An attention hook that reads a side input and records a value: both must survive remat."""
    out = nxt(q, k, v, bias)
    modality = ctx.side_input("modality")
    scaled = out * (1.0 + modality[:, :, None, None].astype(out.dtype))
    ctx.record("loss/probe", jnp.mean(jnp.square(scaled)))
    ctx.record("probe_max", jnp.max(scaled))
    return scaled


@functools.cache
def _setup(family: str):
    cfg = FAMILIES[family]
    model, _ = build_model(cfg)
    ids = jnp.array([[3, 5, 7, 9, 11, 2], [0, 0, 4, 6, 8, 10]])
    mask = jnp.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    params = layers.unbox(jax.jit(model.init)(jax.random.key(0), ids, mask))["params"]
    lora = build_method("lora", {"targets": TARGETS[family], "rank": 2})
    lp = lora.init(jax.random.key(1), params)
    # B starts at zero; make both factors non-zero so every gradient is non-trivial.
    lp = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(a.size), a.shape), lp)
    modality = jnp.array([[0, 0, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0]])
    return cfg, ids, mask, params, lora, lp, modality


def _loss(model, lora, ids, mask, modality, base, lp):
    probe = hooks.Hook("attention", _probe)

    def apply(*a, **kw):
        with hooks.use_hooks(probe):
            return model.apply(*a, **kw)

    out, records = pb.apply_with(apply, [(lora, lp)], {"params": base}, ids, mask, record=True,
                                 side_inputs={"modality": modality})
    logp = jax.nn.log_softmax(out.logits[:, :-1].astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    ce = jnp.sum(nll * mask[:, 1:]) / jnp.sum(mask[:, 1:])
    return ce + records.total("loss/probe"), (ce, jnp.stack(records["probe_max"]))


# GPT-2 runs every policy, LLaMA (grouped-query attention, a gated MLP) the two extremes: one compile per family.
RUNS = {"gpt2": ("none", *POLICIES), "llama": ("none", "full", "dots_no_batch")}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def results(request):
    """Loss, aux and gradients (full fine-tuning and LoRA) of every policy of RUNS, from one jitted function."""
    family = request.param
    cfg, ids, mask, params, lora, lp, modality = _setup(family)
    models = {p: build_model({**cfg, "remat": p})[0] for p in RUNS[family]}

    @jax.jit
    def every_policy(base, lp):
        return {p: jax.value_and_grad(lambda b, a, m=m: _loss(m, lora, ids, mask, modality, b, a), argnums=(0, 1),
                                      has_aux=True)(base, lp) for p, m in models.items()}

    shapes = {p: jax.eval_shape(lambda m=m: layers.unbox(m.init(jax.random.key(0), ids, mask))["params"])
              for p, m in models.items()}
    return family, cfg, params, shapes, every_policy(params, lp)


def test_same_loss_gradients_and_records(results):
    family, cfg, params, shapes, out = results
    (ref_loss, ref_aux), ref_grads = out["none"]
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(ref_grads[1]))  # LoRA gradients are real
    assert ref_aux[1].shape == (cfg["num_hidden_layers"],)  # one record per layer
    for policy in RUNS[family][1:]:
        assert jax.tree.structure(shapes[policy]) == jax.tree.structure(params), policy  # same parameter paths
        (loss, aux), grads = out[policy]
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, err_msg=policy)
        np.testing.assert_allclose(aux[0], ref_aux[0], rtol=1e-6, err_msg=policy)
        np.testing.assert_allclose(aux[1], ref_aux[1], rtol=1e-6, err_msg=policy)  # records cross the boundary
        flat, ref_flat = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
        assert len(flat) == len(ref_flat)
        for g, r in zip(flat, ref_flat, strict=True):
            # recomputation may fuse differently: float32 rounding, relative to the gradient's scale
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(jnp.abs(r).max()), err_msg=policy)


def test_decode_with_cache_under_remat():
    cfg, ids, mask, params, *_ = _setup("gpt2")
    models = {p: build_model({**cfg, "remat": p})[0] for p in ("none", "full")}

    @jax.jit
    def prefill_and_step(params):
        outs = {}
        for policy, model in models.items():
            first = model.apply({"params": params}, ids, mask, cache=model.init_cache(2, 8))
            nxt = jnp.argmax(first.logits[:, -1], -1)[:, None]
            second = model.apply({"params": params}, nxt, jnp.ones_like(nxt), cache=first.cache, decode=True)
            outs[policy] = (first.logits, second.logits, second.cache.keys[1], second.cache.index)
        return outs

    outs = prefill_and_step(params)
    assert int(outs["full"][3]) == ids.shape[1] + 1
    for a, b in zip(outs["none"], outs["full"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_remat_names_and_errors():
    assert layers.remat_policy("full") is None
    assert layers.remat_policy("dots_no_batch") is jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    with pytest.raises(ConfigError, match="remat='everything'.*none, full, dots, dots_no_batch"):
        build_model({**FAMILIES["gpt2"], "remat": "everything"})
    for family in ("opt", "t5", "vit", "clip_vision"):
        with pytest.raises(ConfigError, match="remat="):
            from vlpeft_jax.models import registry

            fn = {**registry.DECODERS, **registry.ENCODER_DECODERS, **registry.VISION}[family]
            fn({"family": family, "remat": "bogus"})


def test_runner_refuses_remat_with_a_method_that_cannot_run_inside_it():
    """MAM's "top" placement carries a value out of the layers through Python state; with ``model.remat`` the run
    is refused before any work (one ConfigError naming both), while "all" and remat="none" are accepted."""
    import types

    import ml_collections

    from vlpeft_jax.errors import ConfigError
    from vlpeft_jax.experiments import runner
    from vlpeft_jax.peft.mam import MAM

    def setup(remat, placement):
        cfg = ml_collections.ConfigDict({"model": {"family": "prefix_vlm", "decoder": {"family": "gpt2",
                                                                                       "remat": remat}}})
        return types.SimpleNamespace(cfg=cfg, methods={"mam": MAM(num_visual=4, max_length=16,
                                                                  mam_layers=placement)})

    assert runner.remat_policies({"family": "prefix_vlm", "vision": {"remat": "dots"},
                                  "decoder": {"remat": "none"}}) == {"dots"}
    with pytest.raises(ConfigError, match=r"mam cannot run inside rematerialised layers \(model.remat=full\)"):
        runner.check_remat(setup("full", "top"))
    runner.check_remat(setup("full", "all"))
    runner.check_remat(setup("none", "top"))
