"""The registry's ``qformer_vlm`` family: a tiny InstructBLIP-like model (ViT -> Q-Former -> linear -> LM)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.models import layers, registry
from vlpeft_jax.models.vlm import QFormerVLM


def tiny(**qformer):
    return {"family": "qformer_vlm",
            "vision": dict(family="vit", image_size=16, patch_size=8, hidden_size=12, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=24, add_pooling_layer=False),
            "qformer": dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                            cross_attention_frequency=1, num_query_tokens=3, vocab_size=30,
                            max_position_embeddings=16, **qformer),
            "decoder": dict(family="llama", vocab_size=30, hidden_size=20, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1)}


def test_family_builds_with_qformer_text_embeddings():
    m, inputs = registry.build_model(tiny())
    assert isinstance(m, QFormerVLM) and m.image_token_id is None
    assert m.qformer.config.encoder_hidden_size == 12  # the vision tower's width
    assert m.qformer.config.qformer_text_input and m.lm_width == 20
    assert {"qformer_input_ids", "qformer_attention_mask", "pixel_values"} <= set(inputs)
    params = layers.unbox(jax.jit(m.init)(jax.random.key(0), **inputs))["params"]
    emb = params["qformer"]["embeddings"]
    assert emb["word_embeddings"]["embedding"].shape == (30, 16)
    assert emb["position_embeddings"]["embedding"].shape == (16, 16)
    assert params["qformer"]["query_tokens"].shape == (1, 3, 16)
    for i in range(2):  # every layer: self-attention q,k,v and (frequency 1) cross-attention
        layer = params["qformer"]["encoder"][f"layer_{i}"]
        assert set(layer["attention"]["attention"]) == {"query", "key", "value"}
        assert set(layer["crossattention"]["attention"]) == {"query", "key", "value"}
        assert layer["crossattention"]["attention"]["key"]["kernel"].shape == (12, 16)
    # the shapes ViT's last_hidden_state feeds the Q-Former; the query outputs are prepended to the text
    ids = jnp.array([[1, 5, 6, 7]])
    text = jnp.array([[1, 9, 2, 0]])
    forward = jax.jit(lambda text: m.apply({"params": params}, ids, jnp.ones_like(ids), jnp.zeros((1, 16, 16, 3)),
                                           qformer_input_ids=text, qformer_attention_mask=(text > 0).astype(jnp.int32)))
    out = forward(text)
    assert out.logits.shape == (1, 3 + 4, 30)
    other = forward(text.at[0, 1].set(11))
    assert not np.allclose(out.logits, other.logits)  # the Q-Former text reaches the LM


def test_blip2_layout_takes_no_text():
    m, inputs = registry.build_model(tiny(qformer_text_input=False))
    assert "qformer_input_ids" not in inputs
    params = jax.eval_shape(lambda: layers.unbox(m.init(jax.random.key(0), **inputs)))["params"]
    assert "embeddings" not in params["qformer"] and "layernorm" in params["qformer"]


@pytest.mark.parametrize("change, match", [
    (lambda c: c.pop("qformer"), "model.qformer is missing"),
    (lambda c: c.update(connector={}), "no setting.*connector.*valid: vision, qformer, decoder"),
    (lambda c: c["qformer"].update(num_querys=4), "qformer_vlm.qformer.*num_querys"),
    (lambda c: c["qformer"].update(cross_attention_frequency=0), "cross_attention_frequency=0"),
    (lambda c: c["qformer"].pop("num_query_tokens"), "num_query_tokens=None"),
    (lambda c: c["vision"].update(family="nope"), "vision.family='nope'"),
])
def test_bad_configs_name_the_key(change, match):
    cfg = tiny()
    change(cfg)
    with pytest.raises(ConfigError, match=match):
        registry.build_model(cfg)
