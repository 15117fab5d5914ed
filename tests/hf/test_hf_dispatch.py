"""``vlpeft_jax.hf.load_pretrained`` picks the family by model_type; offline and unknown types fail clearly."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from vlpeft_jax import hf
from vlpeft_jax.errors import CheckpointError, OfflineError


def test_supported_types_all_have_loaders():
    assert set(hf.SUPPORTED_MODEL_TYPES) <= set(hf._loaders())


def test_dispatch_loads_gpt2_and_matches_transformers(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    ref.save_pretrained(tmp_path)
    module, params = hf.load_pretrained(tmp_path)
    ids = np.array([[1, 2, 3, 4]])
    ours = module.apply({"params": params}, jnp.asarray(ids)).logits
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(ours) - want).max() < 1e-4


def test_unknown_model_type_and_hub_id(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(CheckpointError, match="model_type 'mamba' is not supported; supported: bert"):
        hf.load_pretrained(tmp_path)
    with pytest.raises(OfflineError, match="no network access"):
        hf.load_pretrained("openai/clip-vit-base-patch32")
    with pytest.raises(CheckpointError, match="does not exist"):
        hf.load_pretrained(str(tmp_path / "missing" / "dir"))


def test_tokenizer_from_directory(tmp_path):
    from vlpeft_jax.data.tokenizer import WordTokenizer

    WordTokenizer.train(["a red circle"]).save(tmp_path)
    tok = hf.load_tokenizer(tmp_path)
    assert tok.decode(tok("a red circle")["input_ids"], skip_special_tokens=True) == "a red circle"
