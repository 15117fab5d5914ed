"""Prefix tuning and prompt tuning on BERT against peft 0.21 (``task_type="FEATURE_EXTRACTION"``, ``BertModel``).

peft runs BERT prefix tuning through ``past_key_values`` (``PeftModelForFeatureExtraction.forward`` puts
``get_prompt()``, a ``DynamicCache``, there), so Hugging Face's ``BertEmbeddings`` numbers the tokens from
``P`` (``position_ids[:, past_key_values_length:...]``); our ``PrefixTuning`` shifts BERT's positions by ``P``
through the ``positions`` hook. Prompt tuning prepends the prompt to the input embeddings, which then take
positions ``0..P+t-1``.

For each method, on a tiny random BertModel saved by transformers and loaded with our loader (padded batch,
compared at the real tokens; the pooled output too):

(a) peft ``save_pretrained`` with non-zero prompts -> ``import_peft`` -> same ``last_hidden_state``;
(b) ours -> ``export_peft`` -> ``PeftModel.from_pretrained`` -> same outputs.

Run with ``-s`` to see the measured max abs differences.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

from tests.max_diffs import MaxDiffs
from vlpeft_jax.hf import bert as hf_bert
from vlpeft_jax.hf import peft_io
from vlpeft_jax.models import hooks
from vlpeft_jax.peft import base as pb
from vlpeft_jax.peft.prefix import PrefixTuning
from vlpeft_jax.peft.prompt import PromptTuning

jax.config.update("jax_default_matmul_precision", "highest")

TOL = 1e-5
VOCAB, P, HEADS = 64, 3, 4
MAX_DIFFS = MaxDiffs("BERT max abs diff vs peft 0.21 (fp32)")
report_max_diffs = MAX_DIFFS.fixture()


def record(name: str, ours, ref) -> float:
    diff = float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64))))
    return MAX_DIFFS.record(name, diff)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=HEADS,
                                  intermediate_size=32, max_position_embeddings=32)
    transformers.BertModel(cfg).save_pretrained(d)
    module, params = hf_bert.load_bert(d)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, VOCAB, (2, 7))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0  # BERT numbers positions 0..t-1 whatever the padding (HF and ours): pad on the right
    return d, module, jax.tree.map(jnp.asarray, params), ids, mask


def hf_base(d) -> torch.nn.Module:
    return transformers.BertModel.from_pretrained(d, attn_implementation="eager").eval()


@functools.partial(jax.jit, static_argnames=("module", "method"))
def _apply(module, method, params, p, ids, mask, position_ids):
    return pb.apply_with(module.apply, [(method, p)], {"params": params}, ids, mask, position_ids=position_ids)


def ours(bert, method, p, position_ids=None):
    _, module, params, ids, mask = bert
    out = _apply(module, method, params, p, jnp.asarray(ids), jnp.asarray(mask),
                 None if position_ids is None else jnp.asarray(position_ids))
    return np.asarray(out.last_hidden_state), np.asarray(out.pooled)


def theirs(bert, pm, **kw):
    _, _, _, ids, mask = bert
    with torch.no_grad():
        out = pm(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), **kw)
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def randomise(module_: torch.nn.Module, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module_.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))


def compare(bert, label, got, want, prompt_len=0):
    """Hidden states at the real tokens (after ``prompt_len`` prompt rows) and the pooled output."""
    real = bert[4].astype(bool)
    (h, pooled), (h_ref, pooled_ref) = got, want
    assert h.shape == h_ref.shape
    diff = record(f"{label} last_hidden_state", h[:, prompt_len:][real], h_ref[:, prompt_len:][real])
    diff_pooled = record(f"{label} pooled", pooled, pooled_ref)
    print(f"{label}: max |Δhidden| = {diff:.2e}, max |Δpooled| = {diff_pooled:.2e}")
    assert diff <= TOL and diff_pooled <= TOL


# --------------------------------------------------------------------------------------------------
# Prefix tuning


@pytest.mark.parametrize("projection", [True, False])
def test_bert_prefix_peft_saved_imported_here(bert, projection, tmp_path):
    d, _, params, ids, _ = bert
    pm = peft.get_peft_model(hf_base(d), peft.PrefixTuningConfig(
        task_type="FEATURE_EXTRACTION", num_virtual_tokens=P, prefix_projection=projection,
        encoder_hidden_size=8)).eval()
    randomise(pm.prompt_encoder["default"], 0.5, seed=1)
    pm.save_pretrained(tmp_path)
    method, p = peft_io.import_peft(tmp_path, params)
    assert isinstance(method, PrefixTuning) and method.num_kv_heads == HEADS
    keys = p["encoder"]["layer_1"]["attention"]["self"]["prefix_keys"]
    assert keys.shape == (P, HEADS, 4) and np.abs(keys).min() > 0
    want = theirs(bert, pm)
    compare(bert, f"prefix peft->ours projection={projection}", ours(bert, method, p), want)
    # explicit position_ids: peft shifts them by P (_adjust_prompt_learning_kwargs), and so do we
    explicit = np.tile(np.arange(ids.shape[1]), (ids.shape[0], 1))
    compare(bert, f"prefix peft->ours projection={projection} explicit position_ids",
            ours(bert, method, p, explicit), theirs(bert, pm, position_ids=torch.as_tensor(explicit)))
    # the position shift matters: without it the outputs differ (the checks above can fail)
    active = [h for h in method.hooks(p) if h.kind != "positions"]
    with hooks.use_hooks(active):
        unshifted = bert[1].apply({"params": params}, jnp.asarray(ids), jnp.asarray(bert[4])).last_hidden_state
    assert np.abs(np.asarray(unshifted) - want[0])[bert[4].astype(bool)].max() > 1e-3


@pytest.mark.parametrize("projection", [True, False])
def test_bert_prefix_trained_here_loads_in_peft(bert, projection, tmp_path):
    d, _, params, _, _ = bert
    method = PrefixTuning(num_virtual_tokens=P, num_kv_heads=HEADS, projection=projection, encoder_hidden_size=8)
    p = method.init(jax.random.key(3), params)
    assert [s.name for s in method.sites(params)] == [f"encoder/layer_{i}/attention/self" for i in range(2)]
    peft_io.export_peft(method, p, d, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PREFIX_TUNING" and cfg["task_type"] == "FEATURE_EXTRACTION"
    assert cfg["num_layers"] == 2 and cfg["num_attention_heads"] == HEADS and cfg["token_dim"] == 16
    pm = peft.PeftModel.from_pretrained(hf_base(d), tmp_path).eval()
    assert type(pm).__name__ == "PeftModelForFeatureExtraction"
    compare(bert, f"prefix ours->peft projection={projection}", ours(bert, method, p), theirs(bert, pm))


# --------------------------------------------------------------------------------------------------
# Prompt tuning


def test_bert_prompt_peft_saved_imported_here(bert, tmp_path):
    d, _, params, _, _ = bert
    pm = peft.get_peft_model(hf_base(d), peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION",
                                                                 num_virtual_tokens=4)).eval()
    randomise(pm.prompt_encoder["default"], 0.1, seed=11)
    pm.save_pretrained(tmp_path)
    method, p = peft_io.import_peft(tmp_path, params)
    assert isinstance(method, PromptTuning) and method.targets == ("embeddings/word_embeddings",)
    got = ours(bert, method, p)
    assert got[0].shape == (2, 4 + 7, 16)
    want = theirs(bert, pm)
    compare(bert, "prompt peft->ours", got, want, prompt_len=4)
    np.testing.assert_allclose(got[0][:, :4], want[0][:, :4], atol=TOL)  # the prompt rows too


def test_bert_prompt_trained_here_loads_in_peft(bert, tmp_path):
    d, _, params, _, _ = bert
    method = PromptTuning(num_virtual_tokens=4, init_from="vocab")
    p = method.init(jax.random.key(13), params)
    peft_io.export_peft(method, p, d, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["task_type"] == "FEATURE_EXTRACTION"
    assert cfg["num_layers"] == 2 and cfg["num_attention_heads"] == HEADS
    pm = peft.PeftModel.from_pretrained(hf_base(d), tmp_path).eval()
    compare(bert, "prompt ours->peft", ours(bert, method, p), theirs(bert, pm), prompt_len=4)
