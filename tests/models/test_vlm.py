"""The two VLM compositions: visual tokens placed as documented, Mapping Layer kinds, Q-Former VLM, decoding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.eval import decode
from vlpeft_jax.models import layers, registry
from vlpeft_jax.models.bert import BertConfig, QFormer
from vlpeft_jax.models.vlm import ConnectorConfig, MappingLayer, QFormerVLM, check_placeholders

VISION = dict(family="vit", image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=32, add_pooling_layer=False)
DECODER = dict(family="gpt2", vocab_size=30, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
               max_position_embeddings=64)


def _vlm(connector, image_token_id=None, vision=VISION):
    cfg = dict(family="prefix_vlm", vision=vision, decoder=DECODER, connector=connector)
    if image_token_id is not None:
        cfg["image_token_id"] = image_token_id
    m, inputs = registry.build_model(cfg)
    return m, layers.unbox(m.init(jax.random.key(0), **inputs))["params"]


@pytest.fixture(scope="module")
def inputs():
    pixels = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    ids = jnp.array([[5, 6, 7, 8], [0, 0, 9, 10]])
    mask = jnp.array([[1, 1, 1, 1], [0, 0, 1, 1]])
    return pixels, ids, mask


def test_prefix_vlm_prepends_visual_tokens(inputs):
    pixels, ids, mask = inputs
    m, p = _vlm(dict(kind="mlp", num_layers=2))
    out = m.apply({"params": p}, ids, mask, pixels)
    visual = m.apply({"params": p}, pixels, method=m.encode_image)
    assert visual.shape == (2, 4, 24)  # (16/8)^2 patches, class token dropped
    lm = m.language_model
    text = lm.apply({"params": p["language_model"]}, ids, method=lm.embed_tokens)
    manual = lm.apply({"params": p["language_model"]}, None, jnp.concatenate([jnp.ones((2, 4), int), mask], 1),
                      inputs_embeds=jnp.concatenate([visual, text], 1))
    np.testing.assert_allclose(out.logits, manual.logits, atol=1e-5)
    text_only = jax.jit(lambda p: m.apply({"params": p}, ids, mask, pixels, logits_to_keep=4))(p)  # caption loss
    assert text_only.logits.shape == (2, 4, 30)
    np.testing.assert_allclose(text_only.logits, out.logits[:, -4:], atol=1e-6)


def test_placeholders_equal_prepending_when_in_front(inputs):
    pixels, ids, _ = inputs
    img = 29
    m, p = _vlm(dict(kind="linear"), image_token_id=img)
    m_pre, _ = _vlm(dict(kind="linear"))
    with_ph = jnp.concatenate([jnp.full((2, 4), img), ids], 1)
    a = m.apply({"params": p}, with_ph, None, pixels).logits
    b = m_pre.apply({"params": p}, ids, None, pixels).logits
    np.testing.assert_allclose(a, b, atol=1e-5)
    check_placeholders(np.asarray(with_ph), img, 4)
    with pytest.raises(ConfigError, match="rows \\[0, 1\\] hold \\[3, 3\\]"):
        check_placeholders(np.asarray(with_ph[:, 1:]), img, 4)


def _connector_input(m, p, pixels):
    """What the Mapping Layer receives in ``encode_image`` (intercepted), and the vision tower's own output."""
    seen = []

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, MappingLayer) and context.method_name == "__call__":
            seen.append(np.asarray(args[0]))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        visual = m.apply({"params": p}, pixels, method=m.encode_image)
    tower = m.vision_tower.apply({"params": p["vision_tower"]}, pixels)
    assert len(seen) == 1
    return seen[0], tower, visual


# which tokens of which hidden state reach the connector: [b, 1 + 4 patches, 16] -> selection
SELECTED = {"all": lambda h: h, "cls": lambda h: h[:, :1], "patches": lambda h: h[:, 1:]}


@pytest.mark.parametrize("kind,feature,num_prefix,n_out", [("linear", "all", 1, 5), ("mlp", "cls", 3, 3),
                                                            ("transformer", "patches", 1, 4),
                                                            ("transformer", "cls", 2, 2)])
def test_mapping_layer_kinds(kind, feature, num_prefix, n_out, inputs):
    m, p = _vlm(dict(kind=kind, feature=feature, num_prefix=num_prefix, num_layers=2))
    assert m.apply({"params": p}, inputs[0], method=m.encode_image).shape == (2, n_out, 24)
    assert m.num_visual_tokens(5) == n_out
    fed, tower, _ = _connector_input(m, p, inputs[0])
    np.testing.assert_array_equal(fed, np.asarray(SELECTED[feature](tower.last_hidden_state)))


@pytest.mark.parametrize("feature,vision_layer", [("patches", -1), ("cls", -1), ("all", -1), ("patches", -2),
                                                   ("cls", 0)])
def test_connector_input_values(feature, vision_layer, inputs):
    """The connector's input is the chosen hidden state's chosen tokens (values, not only the shape): -1 is the
    final (normed) output, other indices ``hidden_states[i]`` as in HF's ``output_hidden_states`` (a 2-layer
    tower: three distinct states and the normed output); with a linear connector its output is that input
    times the kernel, plus the bias."""
    two_layers = dict(VISION, num_hidden_layers=2)
    m, p = _vlm(dict(kind="linear", feature=feature, vision_layer=vision_layer), vision=two_layers)
    fed, tower, visual = _connector_input(m, p, inputs[0])
    h = tower.last_hidden_state if vision_layer == -1 else tower.hidden_states[vision_layer]
    want = np.asarray(SELECTED[feature](h))
    np.testing.assert_array_equal(fed, want)
    assert fed.shape == (2, {"patches": 4, "cls": 1, "all": 5}[feature], 16)
    states = [np.asarray(x) for x in (tower.last_hidden_state, *tower.hidden_states)]
    assert len(states) == 4 and sum(np.array_equal(SELECTED[feature](x), want) for x in states) == 1  # all differ
    lin = p["multi_modal_projector"]["linear_1"]
    np.testing.assert_allclose(visual, want @ np.asarray(lin["kernel"]) + np.asarray(lin["bias"]), atol=1e-5)


def test_mapping_layer_bad_settings():
    with pytest.raises(ConfigError, match="connector.kind='conv'"):
        ConnectorConfig(kind="conv")
    with pytest.raises(ConfigError, match="num_prefix > 1"):
        ConnectorConfig(kind="linear", feature="cls", num_prefix=4)
    with pytest.raises(ConfigError, match="not divisible by connector.num_heads"):
        layer = MappingLayer(ConnectorConfig(kind="transformer", num_heads=5), out_features=8)
        layer.init(jax.random.key(0), jnp.ones((1, 3, 4)))


def test_qformer_vlm_with_and_without_instruction(inputs):
    pixels, ids, mask = inputs
    vision = registry.build_vision(VISION)
    decoder = registry.build_decoder(DECODER)
    qcfg = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                      cross_attention_frequency=1, encoder_hidden_size=16, num_query_tokens=3,
                      qformer_text_input=True, max_position_embeddings=32)
    m = QFormerVLM(vision_model=vision, qformer=QFormer(qcfg), language_model=decoder, lm_width=24, num_query_tokens=3)
    p = layers.unbox(m.init(jax.random.key(0), ids, mask, pixels, qformer_input_ids=ids, qformer_attention_mask=mask))
    out = m.apply(p, ids, mask, pixels, qformer_input_ids=ids, qformer_attention_mask=mask)
    assert out.logits.shape == (2, 3 + 4, 30)
    kept = jax.jit(lambda p: m.apply(p, ids, mask, pixels, qformer_input_ids=ids, qformer_attention_mask=mask,
                                     logits_to_keep=4))(p)
    np.testing.assert_allclose(kept.logits, out.logits[:, -4:], atol=1e-6)
    other = m.apply(p, ids, mask, pixels, qformer_input_ids=ids[::-1], qformer_attention_mask=mask[::-1])
    assert not np.allclose(out.logits, other.logits)  # the instruction reaches the queries
    assert set(p["params"]) == {"vision_model", "qformer", "language_model", "language_projection"}


def test_greedy_decoding_of_a_vlm_matches_recomputation(inputs):
    pixels, ids, mask = inputs
    m, p = _vlm(dict(kind="mlp"))
    step = decode.ModuleApply(m)
    gen = decode.generate(step, p, {"input_ids": ids, "pixel_values": pixels}, mask, max_new_tokens=5,
                          eos_token_id=None, pad_token_id=0)
    seq, cur, cur_mask = [], ids, mask
    for _ in range(5):  # no cache: the whole sequence every time
        logits = m.apply({"params": p}, cur, cur_mask, pixels).logits[:, -1]
        nxt = jnp.argmax(logits, -1)
        seq.append(nxt)
        cur = jnp.concatenate([cur, nxt[:, None]], 1)
        cur_mask = jnp.concatenate([cur_mask, jnp.ones((2, 1), int)], 1)
    np.testing.assert_array_equal(gen.sequences, jnp.stack(seq, 1))


MMP = "multi_modal_projector"


@pytest.mark.parametrize("settings", [
    dict(method="adapter", placement="parallel", targets=[f"{MMP}/layers_\\d+/mlp"], bottleneck_size=4),
    dict(method="adapter", placement="sequential", targets=[f"{MMP}/layers_0/self_attn/o_proj"], bottleneck_size=4),
    dict(method="prefix", targets=[f"{MMP}/layers_\\d+/self_attn"], num_virtual_tokens=3, num_kv_heads=2),
    dict(method="lora", targets=[f"{MMP}/.*_proj", f"{MMP}/.*fc\\d"], rank=2),
])
def test_methods_target_the_transformer_connector(settings, inputs):
    from vlpeft_jax.peft import base as peft_base
    from vlpeft_jax.peft.registry import build_methods

    pixels, ids, mask = inputs
    m, p = _vlm(dict(kind="transformer", feature="patches", num_layers=2, num_heads=2))
    assert {"self_attn", "mlp", "ln_1", "ln_2"} <= set(p["multi_modal_projector"]["layers_0"])
    method = build_methods({"x": settings})["x"]
    peft = method.init(jax.random.key(2), p)
    leaves = jax.tree_util.tree_leaves_with_path(peft)
    names = [jax.tree_util.keystr(k) for k, _ in leaves]
    assert any("multi_modal_projector" in n for n in names)  # (a prefix encoder's shared MLP sits outside it)
    assert not any("language_model" in n or "vision_tower" in n for n in names)

    def visual(peft_params):
        return peft_base.apply_with(m.apply, [(method, peft_params)], {"params": p}, pixels,
                                    method=m.encode_image)

    plain = m.apply({"params": p}, pixels, method=m.encode_image)
    noisy = jax.tree.map(lambda x: x + 0.5 * jax.random.normal(jax.random.key(3), x.shape, x.dtype), peft)
    assert not np.allclose(visual(noisy), plain, atol=1e-4)  # the method reaches the connector's tokens
