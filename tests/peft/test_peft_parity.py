"""LoRA, rsLoRA, DoRA and IA3 against Hugging Face peft (PyTorch), and peft adapter export/import.

For each method on tiny random GPT-2, LLaMA and BERT models (built with transformers, saved, loaded with
our loaders), with non-zero adapter weights:

(a) our activation-space forward == peft's forward with the same weights copied into peft's modules;
(b) our export (``export_peft``) loaded by ``PeftModel.from_pretrained`` gives our outputs;
(c) an adapter saved by peft (``save_pretrained``) imported here (``import_peft``) gives peft's outputs;
(d) ``merge`` gives the unmerged outputs (and peft's ``merge_and_unload`` ones);
(e) gradients w.r.t. the adapter parameters equal peft's (for DoRA: with the column norm detached; a
    non-detached norm is shown to differ).

Plus the error cases of the import/export, and ``run.py export`` on a hand-built VLM run directory.
Run with ``-s`` to see the table of measured max abs differences.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import peft
import pytest
import torch
import transformers

from tests.max_diffs import MaxDiffs
from tests.peft.dropout_masks import RecordedMasks
from vlpeft_jax.errors import ConfigError, VLPeftError
from vlpeft_jax.hf import bert as hf_bert
from vlpeft_jax.hf import decoders, peft_io
from vlpeft_jax.peft import base as pb
from vlpeft_jax.peft import dora as dora_lib
from vlpeft_jax.peft.dora import DoRA
from vlpeft_jax.peft.ia3 import IA3
from vlpeft_jax.peft.lora import LoRA

jax.config.update("jax_default_matmul_precision", "highest")

TOL = 1e-5  # outputs, fp32
GRAD_TOL = 1e-4
VOCAB = 64
ROOT = Path(__file__).resolve().parents[2]

MAX_DIFFS = MaxDiffs("max abs diff vs peft 0.21 (fp32)")
report_max_diffs = MAX_DIFFS.fixture()
record = MAX_DIFFS.record


# --------------------------------------------------------------------------------------------------
# Models

MODEL_SPECS = {
    "gpt2": dict(cls=transformers.GPT2LMHeadModel, task="CAUSAL_LM", config=transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4)),
    "llama": dict(cls=transformers.LlamaForCausalLM, task="CAUSAL_LM", config=transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, attention_bias=True)),
    "bert": dict(cls=transformers.BertModel, task="FEATURE_EXTRACTION", config=transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32)),
}


class Family:
    """A saved tiny HF model, our module and params, and forwards on a fixed batch (valid positions only)."""

    def __init__(self, name: str, directory: Path):
        spec = MODEL_SPECS[name]
        self.name, self.dir, self.cls, self.task = name, directory, spec["cls"], spec["task"]
        torch.manual_seed(0)
        spec["config"]._attn_implementation = "eager"
        hf = self.cls(spec["config"]).eval()
        with torch.no_grad():  # non-trivial biases: DoRA and IA3 treat them specially
            for n, p in hf.named_parameters():
                if n.endswith("bias"):
                    p.add_(0.1 * torch.randn_like(p))
        hf.save_pretrained(directory)
        loader = {"gpt2": decoders.load_gpt2, "llama": decoders.load_llama, "bert": hf_bert.load_bert}[name]
        self.model, self.params = loader(directory)
        self.params = jax.tree.map(jnp.asarray, self.params)
        rng = np.random.default_rng(0)
        self.ids = rng.integers(1, VOCAB, (2, 7))
        self.mask = np.ones_like(self.ids)
        self.mask[1, 5:] = 0
        self.valid = self.mask.astype(bool)

    def fresh_hf(self) -> torch.nn.Module:
        return self.cls.from_pretrained(self.dir, attn_implementation="eager").eval()

    def ours(self, methods, params=None) -> np.ndarray:
        out = pb.apply_with(self.model.apply, methods, {"params": self.params if params is None else params},
                            jnp.asarray(self.ids), jnp.asarray(self.mask))
        return np.asarray(self._main(out))[self.valid]

    def ours_jax(self, methods, params=None) -> jax.Array:
        out = pb.apply_with(self.model.apply, methods, {"params": self.params if params is None else params},
                            jnp.asarray(self.ids), jnp.asarray(self.mask))
        return self._main(out)

    def _main(self, out):
        return out.last_hidden_state if self.name == "bert" else out.logits

    def torch_out(self, model: torch.nn.Module) -> torch.Tensor:
        out = model(input_ids=torch.tensor(self.ids), attention_mask=torch.tensor(self.mask))
        return out.last_hidden_state if self.name == "bert" else out.logits

    def theirs(self, model: torch.nn.Module) -> np.ndarray:
        with torch.no_grad():
            return self.torch_out(model).numpy()[self.valid]


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, Family]:
    return {n: Family(n, tmp_path_factory.mktemp(n)) for n in MODEL_SPECS}


# --------------------------------------------------------------------------------------------------
# Methods: ours and peft's config with the same meaning

LORA_TARGETS = {
    "gpt2": dict(ours=("c_attn", "c_proj", "c_fc"), peft=["c_attn", "c_proj", "c_fc"], rank_pattern={"c_fc": 2}),
    "llama": dict(ours=("q_proj", "v_proj", "o_proj", "down_proj"), peft=["q_proj", "v_proj", "o_proj", "down_proj"],
                  rank_pattern={"down_proj": 2}),
    "bert": dict(ours=("query", "value", "dense"), peft=["query", "value", "dense"], rank_pattern={}),
}
IA3_TARGETS = {
    "gpt2": dict(targets=("c_attn", "mlp/c_proj"), ff=("mlp/c_proj",), peft=["c_attn", "mlp.c_proj"],
                 peft_ff=["mlp.c_proj"]),
    "llama": dict(targets=("k_proj", "v_proj", "down_proj"), ff=("down_proj",), peft=["k_proj", "v_proj", "down_proj"],
                  peft_ff=["down_proj"]),
    "bert": dict(targets=("key", "value", "output/dense"), ff=("output/dense",), peft=["key", "value", "output.dense"],
                 peft_ff=["output.dense"]),
}
METHODS = ("lora", "rslora", "dora", "ia3")


def make_method(model: str, kind: str):
    """(our method, peft config) for a model family."""
    fan_in_fan_out = model == "gpt2"
    if kind == "ia3":
        t = IA3_TARGETS[model]
        return (IA3(targets=t["targets"], feedforward_modules=t["ff"]),
                peft.IA3Config(target_modules=t["peft"], feedforward_modules=t["peft_ff"],
                               fan_in_fan_out=fan_in_fan_out, task_type=MODEL_SPECS[model]["task"]))
    t = LORA_TARGETS[model]
    settings = dict(targets=t["ours"], rank=4, alpha=6.0, use_rslora=kind == "rslora",
                    rank_pattern=tuple(t["rank_pattern"].items()))
    ours = DoRA(**settings) if kind == "dora" else LoRA(**settings)
    config = peft.LoraConfig(r=4, lora_alpha=6.0, target_modules=t["peft"], rank_pattern=dict(t["rank_pattern"]),
                             use_rslora=kind == "rslora", use_dora=kind == "dora", fan_in_fan_out=fan_in_fan_out,
                             task_type=MODEL_SPECS[model]["task"])
    return ours, config


def key(seed: int) -> jax.Array:
    """A PRNG key whose random ops compile fast on CPU (threefry's are slow to compile, op by op)."""
    return jax.random.key(seed, impl="rbg")


def perturb_ours(p, seed: int = 1):
    """Non-zero adapters: random B, magnitudes and IA3 vectors away from their (identity) init."""
    rng = np.random.default_rng(seed)

    def leaf(kp, v):
        noise = rng.standard_normal(np.shape(v)).astype(np.float32)
        name = kp[-1].key
        if name == "lora_b":
            return jnp.asarray(0.5 * noise)
        if name == "magnitude":
            return v * (1.0 + 0.3 * noise)
        if name in ("input_scale", "output_scale"):
            return jnp.asarray(1.0 + 0.5 * noise)
        if name == "adaption_gate":  # LLaMA-Adapter: open the zero-initialised gate
            return jnp.asarray(0.8 + 0.2 * noise)
        return v

    return jax.tree_util.tree_map_with_path(leaf, p)


def perturb_torch(model: torch.nn.Module, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "lora_B" in n:
                p.copy_(0.5 * noise)
            elif "lora_magnitude_vector" in n:
                p.mul_(1.0 + 0.3 * noise)
            elif "ia3_l" in n:
                p.copy_(1.0 + 0.5 * noise)


def hf_name(path) -> str:
    """Our module path -> HF module name, written independently of peft_io (``h_0`` -> ``h.0``)."""
    return ".".join(re.sub(r"_(\d+)$", r".\1", part) for part in path)


def adapted(p, marker_keys=("lora_a", "input_scale", "output_scale")):
    out = []
    for marker in marker_keys:
        out += [(path, marker) for path in pb.module_paths(p, marker)]
    return out


def peft_module(pm, path):
    return pm.base_model.model.get_submodule(hf_name(path))


def copy_into_peft(pm, p) -> None:
    """Writes our adapter values into peft's modules by hand (not through our export)."""
    with torch.no_grad():
        for path, marker in adapted(p):
            q, mod = pb.get_path(p, path), peft_module(pm, path)
            if marker == "lora_a":
                mod.lora_A["default"].weight.copy_(torch.tensor(np.asarray(q["lora_a"]).T))
                mod.lora_B["default"].weight.copy_(torch.tensor(np.asarray(q["lora_b"]).T))
                if "magnitude" in q:
                    mod.lora_magnitude_vector["default"].weight.copy_(torch.tensor(np.asarray(q["magnitude"])))
            else:
                assert mod.is_feedforward == (marker == "input_scale"), path
                v = np.asarray(q[marker])
                mod.ia3_l["default"].copy_(torch.tensor(v[None, :] if marker == "input_scale" else v[:, None]))


def torch_grads(pm, p) -> dict:
    """peft's gradients in our layout, keyed like our peft params."""
    grads = {}
    for path, marker in adapted(p):
        mod = peft_module(pm, path)
        if marker == "lora_a":
            g = {"lora_a": grad_of(mod.lora_A["default"].weight).T, "lora_b": grad_of(mod.lora_B["default"].weight).T}
            if "magnitude" in pb.get_path(p, path):
                g["magnitude"] = grad_of(mod.lora_magnitude_vector["default"].weight)
        else:
            g = {marker: grad_of(mod.ia3_l["default"]).reshape(-1)}
        pb.set_path(grads, path, g)
    return grads


def grad_of(t: torch.Tensor) -> np.ndarray:
    """A parameter's gradient (zeros where the loss does not reach it, e.g. BERT's pooler)."""
    return np.zeros(tuple(t.shape), np.float32) if t.grad is None else t.grad.numpy()


def loss_weights(fam: Family, width: int) -> np.ndarray:
    r = np.random.default_rng(5).normal(size=(*fam.ids.shape, width)).astype(np.float32)
    return r * fam.mask[..., None] / fam.mask.sum()


def max_tree_diff(a, b) -> float:
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


# --------------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("model", list(MODEL_SPECS))
@pytest.mark.parametrize("kind", METHODS)
def test_parity_with_peft(families, model, kind, tmp_path):
    fam = families[model]
    method, config = make_method(model, kind)
    init = method.init(key(0), fam.params)
    p = perturb_ours(init)
    ours = fam.ours([(method, p)])
    base_out = fam.ours([])
    assert np.abs(ours - base_out).max() > 100 * TOL  # the adapter matters

    # (a) same weights in peft's modules
    pm = peft.get_peft_model(fam.fresh_hf(), config).eval()
    if kind == "dora":  # peft initialises the magnitude to ||W||_c as we do
        for path in pb.module_paths(init, "magnitude"):
            want = peft_module(pm, path).lora_magnitude_vector["default"].weight.detach().numpy()
            assert record(f"{model}/dora init magnitude", np.abs(pb.get_path(init, path)["magnitude"] - want).max()) \
                <= TOL
    copy_into_peft(pm, p)
    assert record(f"{model}/{kind} (a) forward", np.abs(ours - fam.theirs(pm)).max()) <= TOL

    # (e) gradients w.r.t. the adapter parameters
    width = ours.shape[-1]
    weights = loss_weights(fam, width)
    g_ours = jax.grad(lambda q: jnp.sum(fam.ours_jax([(method, q)]) * weights))(p)
    for prm in pm.parameters():
        prm.grad = None
    (fam.torch_out(pm) * torch.tensor(weights)).sum().backward()
    assert record(f"{model}/{kind} (e) gradients", max_tree_diff(g_ours, torch_grads(pm, p))) <= GRAD_TOL

    # (d) merge: same outputs as unmerged, and as peft's merge_and_unload
    merged = fam.ours([], method.merge(fam.params, p))
    assert record(f"{model}/{kind} (d) merge vs unmerged", np.abs(merged - ours).max()) <= TOL
    assert record(f"{model}/{kind} (d) merge vs peft merge", np.abs(merged - fam.theirs(pm.merge_and_unload())).max()) \
        <= TOL

    # (b) our export -> PeftModel.from_pretrained
    out_dir = peft_io.export_peft(method, p, fam.dir, tmp_path / "ours")
    cfg = json.loads((out_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == ("IA3" if kind == "ia3" else "LORA") and cfg["task_type"] == fam.task
    assert cfg["fan_in_fan_out"] == (model == "gpt2") and cfg["base_model_name_or_path"] == str(fam.dir)
    loaded = peft.PeftModel.from_pretrained(fam.fresh_hf(), out_dir).eval()
    assert record(f"{model}/{kind} (b) export->peft", np.abs(ours - fam.theirs(loaded)).max()) <= TOL

    # (c) peft save_pretrained (non-zero weights) -> import_peft
    pm2 = peft.get_peft_model(fam.fresh_hf(), config).eval()
    perturb_torch(pm2)
    pm2.save_pretrained(tmp_path / "theirs")
    imported, q = peft_io.import_peft(tmp_path / "theirs", fam.params)
    assert type(imported) is type(method)
    if kind != "ia3":
        assert imported.use_rslora == (kind == "rslora") and imported.alpha == 6.0
    assert jax.tree.structure(q) == jax.tree.structure(imported.init(key(0), fam.params))
    assert record(f"{model}/{kind} (c) peft->import", np.abs(fam.ours([(imported, q)]) - fam.theirs(pm2)).max()) <= TOL


def test_dora_gradient_needs_detached_norm(families, monkeypatch):
    """With the column norm left in the graph, the LoRA factors' gradients no longer match peft's."""
    fam = families["gpt2"]
    method, config = make_method("gpt2", "dora")
    p = perturb_ours(method.init(key(0), fam.params))
    pm = peft.get_peft_model(fam.fresh_hf(), config).eval()
    copy_into_peft(pm, p)
    weights = loss_weights(fam, VOCAB)
    (fam.torch_out(pm) * torch.tensor(weights)).sum().backward()
    want = torch_grads(pm, p)

    def attached_norm(kernel, delta):
        return jnp.linalg.norm(kernel + delta, axis=-2)

    monkeypatch.setattr(dora_lib, "column_norm", attached_norm)
    g = jax.grad(lambda q: jnp.sum(fam.ours_jax([(method, q)]) * weights))(p)
    assert max_tree_diff(factors(g), factors(want)) > 100 * GRAD_TOL
    assert max_tree_diff(magnitudes(g), magnitudes(want)) <= GRAD_TOL  # the norm does not depend on m


def factors(tree) -> list:
    return [v for kp, v in jax.tree_util.tree_leaves_with_path(tree) if kp[-1].key in ("lora_a", "lora_b")]


def magnitudes(tree) -> list:
    return [v for kp, v in jax.tree_util.tree_leaves_with_path(tree) if kp[-1].key == "magnitude"]


def test_dora_dropout_only_in_training(families):
    fam = families["llama"]
    method = DoRA(targets=("q_proj", "v_proj"), rank=2, dropout=0.5)
    p = perturb_ours(method.init(key(0), fam.params))
    ev = fam.ours([(method, p)])
    out = pb.apply_with(fam.model.apply, [(method, p)], {"params": fam.params}, jnp.asarray(fam.ids),
                        jnp.asarray(fam.mask), rng=key(3), train=True)
    assert np.abs(ev - fam.ours([], method.merge(fam.params, p))).max() <= TOL
    assert not np.allclose(ev, np.asarray(out.logits)[fam.valid], atol=1e-3)


# --------------------------------------------------------------------------------------------------
# Train-mode dropout under the same mask

DROPOUT = 0.5


class FixedMaskDropout(torch.nn.Module):
    """A dropout whose keep mask is given: ``x * keep / (1 - p)``, what ``torch.nn.Dropout`` computes in training
    for the mask it draws (checked in :func:`test_fixed_mask_dropout_is_torch_dropout`)."""

    def __init__(self, keep: np.ndarray, p: float):
        super().__init__()
        self.keep, self.p = torch.tensor(np.asarray(keep)), p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert tuple(x.shape) == tuple(self.keep.shape), (tuple(x.shape), tuple(self.keep.shape))
        return x * self.keep.to(x.dtype) / (1.0 - self.p)


def test_fixed_mask_dropout_is_torch_dropout():
    torch.manual_seed(0)
    x = torch.randn(4, 7, 32) + 3.0  # no zeros: the output's zeros are the dropped elements
    y = torch.nn.Dropout(DROPOUT).train()(x)
    keep = (y != 0).numpy()
    assert 0.4 < keep.mean() < 0.6
    torch.testing.assert_close(FixedMaskDropout(keep, DROPOUT)(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("model", list(MODEL_SPECS))
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_train_mode_dropout_matches_peft_under_the_same_mask(families, model, kind, monkeypatch):
    """Training forward and gradients with dropout == peft's with the same keep masks in its ``lora_dropout``.

    Our hooks draw the masks (recorded per module); peft's dropout modules are replaced by those masks and the
    adapted layers put in training mode (peft's DoRA then feeds the dropped-out input to both added terms,
    ``x W`` and ``x A B``, and keeps ``x`` in the base output). The masks are Bernoulli(1 - p), differ between
    modules, and change the output.
    """
    fam = families[model]
    method, config = make_method(model, kind)
    method = dataclasses.replace(method, dropout=DROPOUT)
    config.lora_dropout = DROPOUT
    p = perturb_ours(method.init(key(0), fam.params))
    recorded = RecordedMasks(method, monkeypatch)
    rng = key(3)

    def train_forward(q):
        out = pb.apply_with(fam.model.apply, [(recorded, q)], {"params": fam.params}, jnp.asarray(fam.ids),
                            jnp.asarray(fam.mask), rng=rng, train=True)
        return fam._main(out)

    ours = np.asarray(train_forward(p))[fam.valid]
    masks = dict(recorded.masks)
    paths = pb.module_paths(p, "lora_a")
    assert set(masks) == {"/".join(path) for path in paths}
    keep = np.concatenate([m.ravel() for m in masks.values()])
    assert abs(keep.mean() - (1 - DROPOUT)) < 0.05, keep.mean()  # Bernoulli(1 - p), ~2000+ draws
    same_shape = [(a, b) for a, b in itertools.combinations(masks.values(), 2) if a.shape == b.shape]
    assert same_shape and not any(np.array_equal(a, b) for a, b in same_shape)  # one mask per module
    assert np.abs(ours - fam.ours([(method, p)])).max() > 100 * TOL  # dropout changes the output

    pm = peft.get_peft_model(fam.fresh_hf(), config).eval()
    copy_into_peft(pm, p)
    for path in paths:
        mod = peft_module(pm, path)
        assert isinstance(mod.lora_dropout["default"], torch.nn.Dropout)
        mod.lora_dropout["default"] = FixedMaskDropout(masks["/".join(path)], DROPOUT)
        mod.train()  # only the adapted layers: the base model's own dropouts stay off
    assert record(f"{model}/{kind} train-mode dropout forward", np.abs(ours - fam.theirs(pm)).max()) <= TOL

    weights = loss_weights(fam, ours.shape[-1])
    recorded.masks.clear()
    g_ours = jax.grad(lambda q: jnp.sum(train_forward(q) * weights))(p)
    assert all(np.array_equal(recorded.masks[n], m) for n, m in masks.items())  # the same masks again
    for prm in pm.parameters():
        prm.grad = None
    (fam.torch_out(pm) * torch.tensor(weights)).sum().backward()
    assert record(f"{model}/{kind} train-mode dropout gradients", max_tree_diff(g_ours, torch_grads(pm, p))) \
        <= GRAD_TOL


# --------------------------------------------------------------------------------------------------
# Export/import details and errors


def test_target_modules_and_rank_pattern_written_as_peft_expects(families, tmp_path):
    fam = families["gpt2"]
    lora = LoRA(targets=("attn/c_proj", "c_fc"), rank=4, rank_pattern=(("h_1/mlp/c_fc", 2),))
    config, state = peft_io.peft_state(lora, lora.init(key(0), fam.params), fam.dir)
    # "c_proj" alone would also pick mlp.c_proj, so the attention one is written with its parent
    assert config["target_modules"] == ["attn.c_proj", "c_fc"]
    assert config["rank_pattern"] == {re.escape("transformer.h.1.mlp.c_fc"): 2}
    assert state["base_model.model.transformer.h.1.mlp.c_fc.lora_A.weight"].shape == (2, 32)
    assert state["base_model.model.transformer.h.0.attn.c_proj.lora_B.weight"].shape == (32, 4)
    # with only the family known, full module names are written
    config, _ = peft_io.peft_state(lora, lora.init(key(0), fam.params), "gpt2")
    assert "transformer.h.0.attn.c_proj" in config["target_modules"] and config["fan_in_fan_out"]


def test_alpha_pattern_is_folded_into_b(families, tmp_path):
    fam = families["llama"]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], alpha_pattern={"v_proj": 2},
                             task_type="CAUSAL_LM")
    pm = peft.get_peft_model(fam.fresh_hf(), config).eval()
    perturb_torch(pm)
    pm.save_pretrained(tmp_path)
    method, q = peft_io.import_peft(tmp_path, fam.params)
    assert record("llama/lora alpha_pattern import", np.abs(fam.ours([(method, q)]) - fam.theirs(pm)).max()) <= TOL


def test_vlm_prefix_round_trip(families):
    """Adapters of a model nested under ``language_model`` export with the LM's keys and import back under it."""
    fam = families["llama"]
    vlm_base = {"language_model": fam.params, "vision_tower": {"proj": {"kernel": jnp.ones((4, 4))}}}
    lora = LoRA(targets=(r"language_model/.*q_proj",), rank=2)
    p = perturb_ours(lora.init(key(0), vlm_base))
    config, state = peft_io.peft_state(lora, p, fam.dir, prefix=("language_model",))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in state
    method, q = peft_io.import_peft_state(config, state, vlm_base, prefix=("language_model",))
    assert method.targets[0] == "language_model/model/layers_0/self_attn/q_proj"
    np.testing.assert_array_equal(np.asarray(q["language_model"]["model"]["layers_1"]["self_attn"]["q_proj"]["lora_b"]),
                                  np.asarray(p["language_model"]["model"]["layers_1"]["self_attn"]["q_proj"]["lora_b"]))
    everywhere = LoRA(targets=("q_proj", "proj"), rank=2)
    with pytest.raises(peft_io.UnsupportedAdapterError, match="vision_tower/proj.*outside the exported model"):
        peft_io.peft_state(everywhere, everywhere.init(key(0), vlm_base), fam.dir,
                           prefix=("language_model",))


def test_import_errors_name_the_key(families, tmp_path):
    gpt2, llama = families["gpt2"], families["llama"]
    lora = LoRA(targets=("c_attn",), rank=2)
    config, state = peft_io.peft_state(lora, lora.init(key(0), gpt2.params), gpt2.dir)

    bad = dict(config, peft_type="LOHA")
    with pytest.raises(peft_io.UnsupportedAdapterError, match="peft_type 'LOHA' is not supported"):
        peft_io.import_peft_state(bad, state, gpt2.params)
    with pytest.raises(peft_io.UnsupportedAdapterError, match="bias='all'"):
        peft_io.import_peft_state(dict(config, bias="all"), state, gpt2.params)
    a_key = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
    wrong = dict(state, **{a_key: np.zeros((2, 31), np.float32)})
    with pytest.raises(peft_io.AdapterShapeError, match=re.escape(f"{a_key!r} has shape (2, 31)")):
        peft_io.import_peft_state(config, wrong, gpt2.params)
    with pytest.raises(peft_io.AdapterTargetError, match=re.escape(a_key) + ".*not a linear layer"):
        peft_io.import_peft_state(config, state, llama.params)  # a GPT-2 adapter onto LLaMA
    with pytest.raises(peft_io.AdapterStateError, match="lora_B.weight is missing"):
        peft_io.import_peft_state(config, {k: v for k, v in state.items() if "lora_B" not in k}, gpt2.params)
    dora_cfg = dict(config, use_dora=True)
    with pytest.raises(peft_io.AdapterStateError, match="no lora_magnitude_vector"):
        peft_io.import_peft_state(dora_cfg, state, gpt2.params)
    with pytest.raises(peft_io.AdapterStateError, match="no adapter_config.json"):
        peft_io.import_peft(tmp_path, gpt2.params)
    for err in (peft_io.UnsupportedAdapterError, peft_io.AdapterShapeError, peft_io.AdapterTargetError):
        assert issubclass(err, VLPeftError)


def test_export_errors_and_method_settings(families):
    fam = families["gpt2"]

    class NoExport:
        name = "mystery"

    with pytest.raises(peft_io.UnsupportedAdapterError, match="mystery: NoExport has no peft export"):
        peft_io.peft_state(NoExport(), {}, fam.dir)
    with pytest.raises(peft_io.UnsupportedAdapterError, match="model type 'bloom'"):
        peft_io.peft_state(LoRA(), {}, "bloom")
    with pytest.raises(ConfigError, match="dora.rank=0"):
        DoRA(rank=0)
    with pytest.raises(ConfigError, match="dora.dropout=1.5"):
        DoRA(dropout=1.5)
    with pytest.raises(ConfigError, match="ia3.targets is empty"):
        IA3(targets=())
    with pytest.raises(ConfigError, match="feedforward_modules.*not among the targets"):
        IA3(targets=("c_attn",), feedforward_modules=("c_fc",)).init(key(0), fam.params)
    with pytest.raises(ConfigError, match="matches no module"):
        IA3(targets=("q_proj",), feedforward_modules=()).init(key(0), fam.params)
    assert hash(DoRA(rank_pattern={"c_fc": 2})) == hash(DoRA(rank_pattern=(("c_fc", 2),)))
    ia3 = IA3(targets=("c_attn", "c_fc"), feedforward_modules=("c_fc",))
    p = ia3.init(key(0), fam.params)
    assert ia3.num_params(p) == 2 * (96 + 32)  # c_attn output (3 x 32) and c_fc input (32), 2 layers


# --------------------------------------------------------------------------------------------------
# run.py export on a hand-built VLM run directory


@pytest.fixture(scope="module")
def vlm_run(tmp_path_factory):
    from vlpeft_jax.cli.config import load_config_file
    from vlpeft_jax.data.tokenizer import WordTokenizer
    from vlpeft_jax.models import layers, registry
    from vlpeft_jax.peft.registry import build_methods
    from vlpeft_jax.train import checkpoint

    d = tmp_path_factory.mktemp("vlm_run")
    cfg = load_config_file(ROOT / "configs/shapes_lora.py", "smoke")
    cfg.run_dir = str(d)
    cfg.peft = {
        "lora": dict(targets=[r"language_model/.*_proj"], rank=4, alpha=8.0),
        "dora": dict(method="dora", targets=[r"language_model/.*(q|v)_proj"], rank=2, alpha=4.0, use_rslora=True),
        "ia3": dict(targets=[r"language_model/.*(k|v|down)_proj"], feedforward_modules=["down_proj"]),
        "llama_adapter": dict(targets=[r"language_model/.*self_attn"], adapter_len=3, adapter_layers=1),
        "vision": dict(method="lora", targets=[r"vision_tower/.*"], rank=2),
    }
    tokenizer = WordTokenizer.train(["a red circle above a blue square", "two green triangles"])
    tokenizer.save(d / "tokenizer")
    model_cfg = cfg.model.to_dict()
    model_cfg["decoder"]["vocab_size"] = tokenizer.vocab_size
    module, inputs = registry.build_model(model_cfg)
    # Random base weights filled on the host (compiling the VLM's init would cost more than the whole test).
    abstract = jax.eval_shape(lambda: layers.unbox(module.init(key(0), **inputs))["params"])
    rng = np.random.default_rng(0)

    def fill(kp, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        name = kp[-1].key
        return jnp.asarray(1.0 + 0.1 * noise if name == "scale" else (0.1 if name == "bias" else 0.05) * noise)

    base = jax.tree_util.tree_map_with_path(fill, abstract)
    methods = build_methods(cfg.peft)
    peft_params = {n: perturb_ours(m.init(key(i), base), seed=i) for i, (n, m) in enumerate(methods.items())}
    checkpoint.save_tree(d / "final" / "base", base)
    checkpoint.save_tree(d / "final" / "peft", peft_params)
    (d / "config.json").write_text(cfg.to_json_best_effort(indent=2))
    return d, cfg, module, base, methods, peft_params, tokenizer


def test_cli_export_vlm_run(vlm_run, tmp_path):
    from vlpeft_jax.cli import export

    d, cfg, module, base, methods, peft_params, tokenizer = vlm_run
    ids = np.random.default_rng(0).integers(1, tokenizer.vocab_size, (2, 7))  # text-only inputs for the LM
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    valid = mask.astype(bool)

    assert export.main(["--run", str(d), "--format", "peft", "--out", str(tmp_path / "lora"), "--method", "lora",
                        "--with-base"]) == 0
    cfg_lora = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg_lora["base_model_name_or_path"] == str((tmp_path / "lora" / "base_model").resolve())
    hf_base = tmp_path / "lora" / "base_model"

    # the other language-model methods, each in its own sub-directory (peft's layout for several adapters)
    only_lm = ml_collections.ConfigDict(json.loads((d / "config.json").read_text()))
    del only_lm.peft["vision"]
    lm_run = tmp_path / "lm_run"
    lm_run.mkdir()
    (lm_run / "tokenizer").symlink_to(d / "tokenizer")
    # the saved parameters match the run's config (the loader checks every key path)
    from vlpeft_jax.train import checkpoint

    checkpoint.save_tree(lm_run / "final" / "base", base)
    checkpoint.save_tree(lm_run / "final" / "peft", {n: p for n, p in peft_params.items() if n != "vision"})
    (lm_run / "config.json").write_text(only_lm.to_json_best_effort())
    assert export.main(["--run", str(lm_run), "--out", str(tmp_path / "all")]) == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["dora", "ia3", "llama_adapter", "lora"]

    for name, adapter_dir in (("lora", tmp_path / "lora"), ("dora", tmp_path / "all" / "dora"),
                              ("ia3", tmp_path / "all" / "ia3"), ("llama_adapter", tmp_path / "all" / "llama_adapter")):
        ours = pb.apply_with(module.apply, [(methods[name], peft_params[name])], {"params": base},
                             jnp.asarray(ids), jnp.asarray(mask)).logits
        plain = module.apply({"params": base}, jnp.asarray(ids), jnp.asarray(mask)).logits
        assert np.abs(np.asarray(ours - plain)).max() > 1e3 * TOL
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_base, attn_implementation="eager").eval()
        pm = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
        with torch.no_grad():
            theirs = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
        assert record(f"shapes VLM LM/{name} run.py export->peft",
                      np.abs(np.asarray(ours)[valid] - theirs[valid]).max()) <= TOL
        # and back: the exported directory imports under the VLM's language_model
        method, q = peft_io.import_peft(adapter_dir, base, prefix=("language_model",))
        back = pb.apply_with(module.apply, [(method, q)], {"params": base}, jnp.asarray(ids), jnp.asarray(mask)).logits
        assert np.abs(np.asarray(back - ours)).max() <= TOL


def test_cli_export_errors(vlm_run, tmp_path, capsys):
    import run as cli
    from vlpeft_jax.cli import export

    d = vlm_run[0]
    with pytest.raises(peft_io.UnsupportedAdapterError, match="vision_tower/.*outside the exported model"):
        export.main(["--run", str(d), "--out", str(tmp_path / "v"), "--method", "vision"])
    assert cli.main(["export", "--run", str(d), "--out", str(tmp_path / "all")]) == 2  # refuses before writing
    assert "vision" in capsys.readouterr().err and not (tmp_path / "all").exists()
    with pytest.raises(ConfigError, match="--method 'nope' is not a method.*its methods: .*vision"):
        export.main(["--run", str(d), "--out", str(tmp_path / "x"), "--method", "nope"])
    with pytest.raises(ConfigError, match="not a run directory"):
        export.main(["--run", str(tmp_path), "--out", str(tmp_path / "x")])
