"""Bottleneck adapters, LLaMA-Adapter, BitFit, trainable-rule presets, stage checks and the PT-PEFT configs.

References are built inside the tests: tiny random transformers models (PyTorch, fp32) with the adapter
written as plain torch forward hooks (sequential: ``out + s·A(out)`` on a linear; parallel:
``FFN(x) + s·A(x)``), and peft's ``AdaptionPrompt`` for LLaMA-Adapter. Run with ``-s`` to see the measured
max abs differences.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tests.max_diffs import MaxDiffs
from tests.peft.dropout_masks import RecordedMasks
from vlpeft_jax.errors import ConfigError
from vlpeft_jax.hf import bert as hf_bert
from vlpeft_jax.hf import decoders, vision
from vlpeft_jax.models import hooks
from vlpeft_jax.peft import base as pb
from vlpeft_jax.peft.adapters import BottleneckAdapter, ffn_hook_points
from vlpeft_jax.peft.bitfit import BitFit
from vlpeft_jax.peft.llama_adapter import LlamaAdapter, attention_modules
from vlpeft_jax.peft.registry import build_method, build_methods
from vlpeft_jax.train import labels as labels_lib
from vlpeft_jax.train import presets
from vlpeft_jax.train.stages import Stage, plan_stages
from vlpeft_jax.tree import leaf_paths, path_str

jax.config.update("jax_default_matmul_precision", "highest")

TOL = 1e-4
VOCAB = 97
MAX_DIFFS = MaxDiffs("max abs diff vs the PyTorch references (fp32)")
report_max_diffs = MAX_DIFFS.fixture()


def record(name: str, ours, ref) -> float:
    diff = float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64))))
    return MAX_DIFFS.record(name, diff)


# --------------------------------------------------------------------------------------------------
# Tiny Hugging Face models, loaded with our loaders (built once per module)


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


class Family:
    """One backbone: the torch reference, our module and params, and how to run both on the same input."""

    def __init__(self, name: str, tmp_path_factory) -> None:
        self.name = name
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        d = tmp_path_factory.mktemp(name)
        if name == "gpt2":
            ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(
                vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4))
            loader = decoders.load_gpt2
        elif name == "llama":
            ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(
                vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2))
            loader = decoders.load_llama
        elif name == "opt":  # fc1/fc2 directly in the decoder layer, where the mlp hook sits
            ref = transformers.OPTForCausalLM(transformers.OPTConfig(
                vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=32, dropout=0.0))
            loader = decoders.load_opt
        elif name == "bert":
            ref = transformers.BertModel(transformers.BertConfig(
                vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=32))
            loader = hf_bert.load_bert
        else:
            ref = transformers.ViTModel(transformers.ViTConfig(
                image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64))
            loader = vision.load_vit
        self.ref = _perturb(ref, 1)
        self.ref.save_pretrained(d)
        self.dir = d
        self.module, params = loader(d)
        self.params = jax.tree.map(jnp.asarray, params)
        if name in ("gpt2", "llama", "opt"):
            ids = rng.integers(0, VOCAB, (2, 7))
            self.torch_inputs = {"input_ids": torch.as_tensor(ids)}
            self.inputs = (jnp.asarray(ids),)
            self.output = lambda out: out.logits
            self.torch_output = lambda out: out.logits
        elif name == "bert":
            ids = rng.integers(1, VOCAB, (2, 7))
            mask = np.ones_like(ids)
            mask[1, 5:] = 0
            self.torch_inputs = {"input_ids": torch.as_tensor(ids), "attention_mask": torch.as_tensor(mask)}
            self.inputs = (jnp.asarray(ids), jnp.asarray(mask))
            self.output = self.torch_output = lambda out: out.last_hidden_state
        else:
            x = rng.normal(size=(2, 3, 16, 16)).astype(np.float32)
            self.torch_inputs = {"pixel_values": torch.as_tensor(x)}
            self.inputs = (jnp.asarray(x.transpose(0, 2, 3, 1)),)
            self.output = self.torch_output = lambda out: out.last_hidden_state

    def run(self, methods=()) -> np.ndarray:
        out = pb.apply_with(self.module.apply, list(methods), {"params": self.params}, *self.inputs)
        return np.asarray(self.output(out))

    def run_torch(self) -> np.ndarray:
        with torch.no_grad():
            return self.torch_output(self.ref(**self.torch_inputs)).numpy()

    def torch_module(self, path: tuple[str, ...]) -> torch.nn.Module:
        """The torch module at our module path (our names mirror the checkpoint names; ViT's in-memory
        modules are named differently in transformers 5)."""
        name = "/".join(path)
        if self.name == "vit":
            name = re.sub(r"^encoder/layer_(\d+)/attention/output/dense$", r"layers.\1.attention.o_proj", name)
            name = re.sub(r"^encoder/layer_(\d+)/output/dense$", r"layers.\1.mlp.fc2", name)
            name = re.sub(r"^encoder/layer_(\d+)$", r"layers.\1.mlp", name)
        name = re.sub(r"_(\d+)(?=/|$)", r".\1", name).replace("/", ".")
        return self.ref.get_submodule(name)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    cache: dict[str, Family] = {}

    def get(name: str) -> Family:
        if name not in cache:
            cache[name] = Family(name, tmp_path_factory)
        return cache[name]

    return get


def _randomise(tree, key, names=("adapter_up", "adapter_up_bias", "adapter_down_bias")):
    """Non-zero values for the zero-initialised leaves, so that the adapters change the outputs."""
    def leaf(path, v):
        if path[-1].key in names:
            return 0.3 * jax.random.normal(jax.random.fold_in(key, hash(path_str(path)) % 2**31), v.shape)
        return v
    return jax.tree_util.tree_map_with_path(leaf, tree)


def _torch_bottleneck(p, activation: str, scaling: float, keep: np.ndarray | None = None, dropout: float = 0.0):
    """The adapter in torch; with ``keep``, dropout on its input with that keep mask (``h * keep / (1 - p)``, what
    ``torch.nn.Dropout`` computes for the mask it draws; tests/peft/test_peft_parity.py checks that)."""
    t = {k: torch.as_tensor(np.asarray(v)) for k, v in p.items()}
    act = {"relu": torch.relu, "tanh": torch.tanh, "gelu": torch.nn.functional.gelu}[activation]
    mask = None if keep is None else torch.tensor(np.asarray(keep))

    def adapter(h):
        if mask is not None:
            assert tuple(h.shape) == tuple(mask.shape), (tuple(h.shape), tuple(mask.shape))
            h = h * mask.to(h.dtype) / (1.0 - dropout)
        z = h @ t["adapter_down"] + t.get("adapter_down_bias", 0.0)
        return scaling * (act(z) @ t["adapter_up"] + t.get("adapter_up_bias", 0.0))

    return adapter


def _attach_torch_adapters(fam: Family, adapter: BottleneckAdapter, peft_params, masks=None) -> list:
    """Torch hooks applying the same adapters to the reference model (with ``masks``, {module name: keep mask},
    their dropout in training); returns the handles to remove."""
    handles = []
    for path in pb.module_paths(peft_params, "adapter_down"):
        keep = None if masks is None else masks["/".join(path)]
        a = _torch_bottleneck(pb.get_path(peft_params, path), adapter.activation, adapter.scaling, keep,
                              adapter.dropout)
        if fam.name == "opt":  # transformers' OPT runs fc1/fc2 on [b*t, d]; the masks are [b, t, d]
            lead = tuple(fam.torch_inputs["input_ids"].shape)
            a = (lambda h, a=a, lead=lead: a(h.reshape(*lead, -1)).reshape(h.shape))
        if adapter.placement == "sequential":
            handles.append(fam.torch_module(path).register_forward_hook(lambda m, i, out, a=a: out + a(out)))
        elif fam.name == "opt":  # the FFN input enters `fc1`; its output leaves `fc2`
            seen = {}
            handles.append(fam.torch_module(path + ("fc1",)).register_forward_pre_hook(
                lambda m, i, seen=seen: seen.update(x=i[0])))
            handles.append(fam.torch_module(path + ("fc2",)).register_forward_hook(
                lambda m, i, out, a=a, seen=seen: out + a(seen["x"])))
        elif fam.name == "bert":  # the FFN input enters `intermediate`; its output leaves `output.dense`
            seen = {}
            handles.append(fam.torch_module(path).register_forward_pre_hook(
                lambda m, i, seen=seen: seen.update(x=i[0])))
            handles.append(fam.torch_module(path[:-1] + ("output", "dense")).register_forward_hook(
                lambda m, i, out, a=a, seen=seen: out + a(seen["x"])))
        else:
            handles.append(fam.torch_module(path).register_forward_hook(lambda m, i, out, a=a: out + a(i[0])))
    return handles


# --------------------------------------------------------------------------------------------------
# Bottleneck adapters


EXPECTED_TARGETS = {
    ("gpt2", "sequential"): {"transformer/h_0/attn/c_proj", "transformer/h_0/mlp/c_proj"},
    ("llama", "sequential"): {"model/layers_0/self_attn/o_proj", "model/layers_0/mlp/down_proj"},
    ("bert", "sequential"): {"encoder/layer_0/attention/output/dense", "encoder/layer_0/output/dense"},
    ("vit", "sequential"): {"encoder/layer_0/attention/output/dense", "encoder/layer_0/output/dense"},
    ("opt", "sequential"): {"model/decoder/layers_0/self_attn/out_proj", "model/decoder/layers_0/fc2"},
    ("gpt2", "parallel"): {"transformer/h_0/mlp"},
    ("llama", "parallel"): {"model/layers_0/mlp"},
    ("bert", "parallel"): {"encoder/layer_0/intermediate"},
    ("vit", "parallel"): {"encoder/layer_0"},
    ("opt", "parallel"): {"model/decoder/layers_0"},
}


@pytest.mark.parametrize("placement", ["sequential", "parallel"])
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "vit", "opt"])
def test_adapter_zero_init_then_matches_torch_reference(families, name, placement):
    fam = families(name)
    activation = "gelu" if name == "bert" else "relu"
    adapter = BottleneckAdapter(placement=placement, bottleneck_size=4, activation=activation, scaling=2.0)
    p = adapter.init(jax.random.key(0), fam.params)
    adapted = {"/".join(path) for path in pb.module_paths(p, "adapter_down")}
    assert {t for t in adapted if re.search(r"_0(/|$)", t)} == EXPECTED_TARGETS[(name, placement)]
    base_out = fam.run()
    np.testing.assert_array_equal(fam.run([(adapter, p)]), base_out)  # zero-initialised up-projection

    p = _randomise(p, jax.random.key(1))
    ours = fam.run([(adapter, p)])
    handles = _attach_torch_adapters(fam, adapter, p)
    try:
        ref = fam.run_torch()
    finally:
        for h in handles:
            h.remove()
    diff = record(f"{name} {placement} adapter vs torch hooks", ours, ref)
    assert diff <= TOL
    assert np.max(np.abs(ours - base_out)) > 1e-3  # the adapters do act


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "vit", "opt"])
def test_hook_point_discovery_matches_where_models_call_hooks(families, name):
    """ffn_hook_points / attention_modules find exactly the paths where the model calls mlp / attention."""
    fam = families(name)
    seen: dict[str, set] = {"mlp": set(), "attention": set()}

    def record_path(ctx, nxt, *args):
        seen[ctx.kind].add(ctx.path)
        return nxt(*args)

    with hooks.use_hooks(hooks.Hook("mlp", record_path), hooks.Hook("attention", record_path)):
        fam.module.apply({"params": fam.params}, *fam.inputs)
    assert set(ffn_hook_points(fam.params)) == seen["mlp"]
    assert set(attention_modules(fam.params)) == seen["attention"]


def test_hook_point_discovery_and_methods_in_a_qformer_vlm():
    """The same discovery on the Q-Former VLM (ViT, Q-Former with query and text FFNs and cross-attention,
    LLaMA), where one method's targets span all three towers."""
    from vlpeft_jax.models import layers, registry
    from vlpeft_jax.models.bert import BertConfig, QFormer
    from vlpeft_jax.models.vlm import QFormerVLM

    vision_cfg = dict(family="vit", image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=32, add_pooling_layer=False)
    decoder_cfg = dict(family="llama", vocab_size=30, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1)
    qcfg = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                      cross_attention_frequency=1, encoder_hidden_size=16, num_query_tokens=3,
                      qformer_text_input=True, max_position_embeddings=32)
    module = QFormerVLM(vision_model=registry.build_vision(vision_cfg), qformer=QFormer(qcfg),
                        language_model=registry.build_decoder(decoder_cfg), lm_width=16, num_query_tokens=3)
    ids, mask = jnp.array([[5, 6, 7], [0, 9, 10]]), jnp.array([[1, 1, 1], [0, 1, 1]])
    args = (ids, mask, jax.random.normal(jax.random.key(1), (2, 16, 16, 3)))
    kwargs = {"qformer_input_ids": ids, "qformer_attention_mask": mask}
    # random values on the abstract shapes: cheaper than compiling the initialisers
    abstract = layers.unbox(jax.eval_shape(module.init, jax.random.key(0), *args, **kwargs))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(0.2 * rng.normal(size=a.shape), a.dtype), abstract)
    seen: dict[str, set] = {"mlp": set(), "attention": set()}

    def record_path(ctx, nxt, *a):
        seen[ctx.kind].add(ctx.path)
        return nxt(*a)

    with hooks.use_hooks(hooks.Hook("mlp", record_path), hooks.Hook("attention", record_path)):
        jax.eval_shape(lambda p: module.apply({"params": p}, *args, **kwargs), params)
    assert set(ffn_hook_points(params)) == seen["mlp"]
    assert set(attention_modules(params)) == seen["attention"]
    # all three methods at once on every tower (one compilation)
    methods = (BottleneckAdapter(placement="parallel", bottleneck_size=2), BottleneckAdapter(bottleneck_size=2),
               LlamaAdapter(targets=(".*",), adapter_len=2))
    peft = [_randomise(m.init(jax.random.key(0), params), jax.random.key(1)) for m in methods]
    peft[2] = _set_gates(peft[2], [0.5] * len(pb.module_paths(peft[2], "adaption_gate")))
    assert len(pb.module_paths(peft[0], "adapter_down")) == 1 + 2 * 2 + 2  # ViT, Q-Former text+query, LLaMA

    @jax.jit
    def logits(peft):
        return pb.apply_with(module.apply, list(zip(methods, peft, strict=True)), {"params": params}, *args,
                             **kwargs).logits

    zeroed = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.zeros_like(v) if path[-1].key in ("adapter_up", "adapter_up_bias", "adaption_gate") else v,
        peft)
    out, base = logits(peft), logits(zeroed)  # zero up-projections and gates: the base model
    assert np.all(np.isfinite(out)) and np.max(np.abs(out - base)) > 1e-4


def test_adapter_dropout_only_in_training(families):
    fam = families("llama")
    adapter = BottleneckAdapter(placement="parallel", bottleneck_size=4, dropout=0.5)

    @jax.jit
    def loss(q, rng):
        out = pb.apply_with(fam.module.apply, [(adapter, q)], {"params": fam.params}, *fam.inputs, rng=rng,
                            train=rng is not None)
        return out.logits.sum(), out.logits

    p = _randomise(adapter.init(jax.random.key(0), fam.params), jax.random.key(1))
    assert not np.allclose(fam.run([(adapter, p)]), loss(p, jax.random.key(2))[1])
    g = jax.grad(lambda q: loss(q, None)[0])(adapter.init(jax.random.key(0), fam.params))
    assert float(jnp.abs(g["model"]["layers_0"]["mlp"]["adapter_up"]).sum()) > 0  # learns from the zero init


@pytest.mark.parametrize("placement", ["sequential", "parallel"])
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "vit", "opt"])
def test_adapter_train_mode_dropout_matches_torch_reference_under_the_same_mask(families, name, placement,
                                                                              monkeypatch):
    """Training forward with dropout == the torch reference with the same keep masks on the adapters' inputs
    (sequential: the linear's output; parallel: the FFN's input). Masks: Bernoulli(1 - p), one per module."""
    fam = families(name)
    activation = "gelu" if name == "bert" else "relu"
    adapter = BottleneckAdapter(placement=placement, bottleneck_size=4, activation=activation, scaling=2.0,
                                dropout=0.4)
    p = _randomise(adapter.init(jax.random.key(0), fam.params), jax.random.key(1))
    recorded = RecordedMasks(adapter, monkeypatch)
    out = pb.apply_with(fam.module.apply, [(recorded, p)], {"params": fam.params}, *fam.inputs,
                        rng=jax.random.key(2), train=True)
    ours = np.asarray(fam.output(out))
    paths = pb.module_paths(p, "adapter_down")
    assert set(recorded.masks) == {"/".join(path) for path in paths}
    keep = np.concatenate([m.ravel() for m in recorded.masks.values()])
    assert abs(keep.mean() - 0.6) < 0.05, keep.mean()
    assert len({m.tobytes() for m in recorded.masks.values()}) == len(recorded.masks)
    assert np.max(np.abs(ours - fam.run([(adapter, p)]))) > 1e-3  # dropout changes the output

    handles = _attach_torch_adapters(fam, adapter, p, masks=recorded.masks)
    try:
        ref = fam.run_torch()
    finally:
        for h in handles:
            h.remove()
    assert record(f"{name} {placement} adapter train-mode dropout vs torch hooks", ours, ref) <= TOL


def test_adapter_bad_inputs_and_registry(families):
    params = families("llama").params
    with pytest.raises(ConfigError, match="bottleneck_size=0"):
        BottleneckAdapter(bottleneck_size=0)
    with pytest.raises(ConfigError, match="placement='serial'; valid: sequential, parallel"):
        BottleneckAdapter(placement="serial")
    with pytest.raises(ConfigError, match="activation='swishy'"):
        BottleneckAdapter(activation="swishy")
    with pytest.raises(ConfigError, match="bottleneck_size=64 is larger than model/layers_0/mlp allows"):
        BottleneckAdapter(placement="parallel", bottleneck_size=64).init(jax.random.key(0), params)
    with pytest.raises(ConfigError, match="matches no feed-forward.*available: model/layers_0/mlp"):
        BottleneckAdapter(placement="parallel", targets=("self_attn",)).init(jax.random.key(0), params)
    with pytest.raises(ConfigError, match="matches no module.*available"):
        BottleneckAdapter(targets=("c_proj",)).init(jax.random.key(0), params)
    adapter = BottleneckAdapter(placement="parallel", bottleneck_size=4)
    p = adapter.init(jax.random.key(0), params)
    with pytest.raises(ConfigError, match="adapter is not mergeable"):
        adapter.merge(params, p)
    built = build_method("p_adapter", {"method": "adapter", "placement": "parallel", "targets": ["mlp"],
                                       "bottleneck_size": 4})
    assert isinstance(built, BottleneckAdapter) and built.targets == ("mlp",) and built.name == "p_adapter"
    hash(built)  # methods are part of jitted step functions
    assert built.num_params(built.init(jax.random.key(0), params)) == 3 * (32 * 4 + 4 + 4 * 32 + 32)


# --------------------------------------------------------------------------------------------------
# LLaMA-Adapter


def _set_gates(p, values):
    paths = pb.module_paths(p, "adaption_gate")
    out = pb.copy_tree(p)
    for path, v in zip(paths, values, strict=True):
        pb.set_path(out, path + ("adaption_gate",), jnp.full((1,), v, jnp.float32))
    return out


@pytest.mark.parametrize("name,targets", [("gpt2", None), ("llama", None), ("bert", ("attention/self",)),
                                          ("vit", ("attention/attention",))])
def test_llama_adapter_zero_gate_is_base(families, name, targets):
    fam = families(name)
    method = LlamaAdapter(adapter_len=3, **({"targets": targets} if targets else {}))
    p = method.init(jax.random.key(0), fam.params)
    assert len(pb.module_paths(p, "adaption_prompt")) == len(attention_modules(fam.params))
    base_out = fam.run()
    np.testing.assert_array_equal(fam.run([(method, p)]), base_out)
    gated = _set_gates(p, [0.5] * len(pb.module_paths(p, "adaption_gate")))
    assert np.max(np.abs(fam.run([(method, gated)]) - base_out)) > 1e-3


def test_llama_adapter_matches_peft_adaption_prompt(families):
    """Our LLaMA-Adapter with peft's prompts and non-zero gates gives peft's logits (LLaMA, GQA 4/2 heads)."""
    import peft

    fam = families("llama")
    method = LlamaAdapter(adapter_len=5, adapter_layers=2)
    p = method.init(jax.random.key(0), fam.params)
    assert sorted(p["model"]) == ["layers_1", "layers_2"]  # the top two of three layers, as peft
    p = _set_gates(p, [0.7, -1.3])
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(fam.ref.config).eval()
    ref.load_state_dict(fam.ref.state_dict())
    pm = peft.get_peft_model(ref, peft.AdaptionPromptConfig(adapter_len=5, adapter_layers=2, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, t in pm.named_parameters():
            if "adaption_" in n:
                layer = re.search(r"layers\.(\d+)\.self_attn\.(adaption_\w+)", n)
                ours = p["model"][f"layers_{layer.group(1)}"]["self_attn"][layer.group(2)]
                t.copy_(torch.as_tensor(np.asarray(ours)))
        ref_logits = pm(**fam.torch_inputs).logits.numpy()
    ours = fam.run([(method, p)])
    diff = record("llama LLaMA-Adapter vs peft AdaptionPrompt", ours, ref_logits)
    assert diff <= 1e-5
    assert np.max(np.abs(ours - fam.run())) > 1e-3


def test_llama_adapter_gpt2_fused_projection_matches_torch_reference(families):
    """GPT-2 (fused c_attn): prompts projected by c_attn, gated attention added before c_proj (the paper)."""
    fam = families("gpt2")
    method = LlamaAdapter(adapter_len=3)
    p = _set_gates(method.init(jax.random.key(3), fam.params), [0.8, -0.6])
    handles = []
    for i in range(2):
        attn = fam.ref.transformer.h[i].attn
        prompt = torch.as_tensor(np.asarray(p["transformer"][f"h_{i}"]["attn"]["adaption_prompt"]))[0]
        gate = float(p["transformer"][f"h_{i}"]["attn"]["adaption_gate"][0])
        seen = {}
        handles.append(attn.c_attn.register_forward_hook(lambda m, i_, out, seen=seen: seen.update(qkv=out)))

        def add_prompt_attention(m, inputs, attn=attn, prompt=prompt, gate=gate, seen=seen):
            d, heads = attn.head_dim, attn.num_heads
            q = seen["qkv"][..., : attn.embed_dim]
            b, t, _ = q.shape
            _, kp, vp = attn.c_attn(prompt).split(attn.embed_dim, dim=-1)
            q = q.view(b, t, heads, d).transpose(1, 2)
            kp = kp.view(-1, heads, d).transpose(0, 1)
            vp = vp.view(-1, heads, d).transpose(0, 1)
            probs = torch.softmax(q @ kp.transpose(-1, -2) / math.sqrt(d), dim=-1)
            return (inputs[0] + gate * (probs @ vp).transpose(1, 2).reshape(b, t, -1),)

        handles.append(attn.c_proj.register_forward_pre_hook(add_prompt_attention))
    try:
        ref = fam.run_torch()
    finally:
        for h in handles:
            h.remove()
    diff = record("gpt2 LLaMA-Adapter vs torch reference", fam.run([(method, p)]), ref)
    assert diff <= TOL


def test_llama_adapter_kv_cache_decoding_and_tanh_gate(families):
    fam = families("llama")
    method = LlamaAdapter(adapter_len=4, adapter_layers=2)
    p = _set_gates(method.init(jax.random.key(0), fam.params), [0.5, 0.9])
    ids = fam.inputs[0]

    @functools.partial(jax.jit, static_argnames="decode")
    def run(q, ids, cache, decode):
        mask = jnp.ones(ids.shape, jnp.int32)
        return pb.apply_with(fam.module.apply, [(method, q)], {"params": fam.params}, ids, mask, cache=cache,
                             decode=decode)

    full = np.asarray(run(p, ids, None, False).logits)
    out = run(p, ids[:, :-2], fam.module.init_cache(2, ids.shape[1]), False)
    steps = []
    for j in (-2, -1):
        out = run(p, ids[:, j:][:, :1], out.cache, True)
        steps.append(np.asarray(out.logits[:, -1]))
    diff = record("llama LLaMA-Adapter KV-cache decode vs full", np.stack(steps, 1), full[:, -2:])
    assert diff <= TOL
    tanh = LlamaAdapter(adapter_len=4, adapter_layers=2, tanh_gate=True)
    p_tanh = _set_gates(p, [math.atanh(0.5), math.atanh(0.9)])
    np.testing.assert_allclose(fam.run([(tanh, p_tanh)]), full, rtol=1e-5, atol=1e-5)


def test_llama_adapter_export_loads_in_peft(families, tmp_path):
    """ours -> export_peft -> PeftModel.from_pretrained gives our logits (raw gate, and tanh gate as tanh(g))."""
    import json

    import peft

    from vlpeft_jax.hf import peft_io

    fam = families("llama")
    for tanh_gate in (False, True):
        method = LlamaAdapter(adapter_len=5, adapter_layers=2, tanh_gate=tanh_gate)
        p = _set_gates(method.init(jax.random.key(4), fam.params), [0.7, -1.3])
        out = peft_io.export_peft(method, p, fam.dir, tmp_path / f"tanh{tanh_gate}")
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert (cfg["peft_type"], cfg["task_type"], cfg["adapter_len"], cfg["adapter_layers"],
                cfg["target_modules"]) == ("ADAPTION_PROMPT", "CAUSAL_LM", 5, 2, "self_attn")
        base = transformers.LlamaForCausalLM.from_pretrained(fam.dir).eval()
        pm = peft.PeftModel.from_pretrained(base, out).eval()
        with torch.no_grad():
            ref = pm(**fam.torch_inputs).logits.numpy()
        ours = fam.run([(method, p)])
        diff = record(f"llama LLaMA-Adapter export->peft (tanh_gate={tanh_gate})", ours, ref)
        print(f"LLaMA-Adapter ours->peft tanh_gate={tanh_gate}: max |Δlogits| = {diff:.2e}")
        assert diff <= 1e-5 and np.max(np.abs(ours - fam.run())) > 1e-3


def test_llama_adapter_peft_saved_imported_here(families, tmp_path):
    """peft save_pretrained (non-zero gates) -> import_peft gives peft's logits."""
    import peft

    from vlpeft_jax.hf import peft_io

    fam = families("llama")
    base = transformers.LlamaForCausalLM.from_pretrained(fam.dir).eval()
    pm = peft.get_peft_model(base, peft.AdaptionPromptConfig(adapter_len=4, adapter_layers=2, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, t in pm.named_parameters():
            if n.endswith("adaption_gate"):
                t.copy_(torch.randn(t.shape, generator=g))
    pm.eval().save_pretrained(tmp_path)
    with torch.no_grad():
        ref = pm(**fam.torch_inputs).logits.numpy()
    method, p = peft_io.import_peft(tmp_path, fam.params)
    assert isinstance(method, LlamaAdapter) and not method.tanh_gate and method.adapter_len == 4
    assert method.targets == ("model/layers_1/self_attn", "model/layers_2/self_attn")
    assert jax.tree.structure(p) == jax.tree.structure(method.init(jax.random.key(0), fam.params))
    assert float(np.abs(p["model"]["layers_2"]["self_attn"]["adaption_gate"]).min()) > 0
    ours = fam.run([(method, p)])
    diff = record("llama LLaMA-Adapter peft->import", ours, ref)
    print(f"LLaMA-Adapter peft->ours: max |Δlogits| = {diff:.2e}")
    assert diff <= 1e-5 and np.max(np.abs(ours - fam.run())) > 1e-3


def test_llama_adapter_peft_export_refusals(families, tmp_path):

    import peft

    from vlpeft_jax.hf import peft_io

    llama, gpt2 = families("llama"), families("gpt2")
    method = LlamaAdapter(adapter_len=2, adapter_layers=1)
    p = method.init(jax.random.key(0), llama.params)
    with pytest.raises(peft_io.UnsupportedAdapterError, match="GPT-2 adaption prompt adds the prompt attention"):
        peft_io.peft_state(method, method.init(jax.random.key(0), gpt2.params), gpt2.dir)
    with pytest.raises(peft_io.UnsupportedAdapterError, match="needs the model's config"):
        peft_io.peft_state(method, p, "llama")  # only the family known: the layer count is unknown
    biased = dataclasses.replace(llama.module.config, attention_bias=True, o_proj_bias=True)
    with pytest.raises(peft_io.UnsupportedAdapterError, match="o_proj bias"):
        peft_io.peft_state(method, p, biased)
    low = LlamaAdapter(targets=("model/layers_0/self_attn",), adapter_len=2)
    with pytest.raises(peft_io.UnsupportedAdapterError, match=r"adapts layers \[0\].*top 1 of 3 layers \(\[2\]\)"):
        peft_io.peft_state(low, low.init(jax.random.key(0), llama.params), llama.dir)
    # a peft GPT-2 adaption prompt differs from ours (no c_proj on the prompt attention): refused on import
    base = transformers.GPT2LMHeadModel.from_pretrained(gpt2.dir)
    pm = peft.get_peft_model(base, peft.AdaptionPromptConfig(adapter_len=2, adapter_layers=1, task_type="CAUSAL_LM"))
    pm.save_pretrained(tmp_path)
    with pytest.raises(peft_io.UnsupportedAdapterError, match="is GPT-2 attention"):
        peft_io.import_peft(tmp_path, gpt2.params)
    config, state = peft_io.read_peft_dir(tmp_path)
    with pytest.raises(peft_io.AdapterTargetError, match="not an attention module"):
        peft_io.import_peft_state(config, state, llama.params)


def test_llama_adapter_bad_inputs(families):
    params = families("llama").params
    with pytest.raises(ConfigError, match="adapter_len=0"):
        LlamaAdapter(adapter_len=0)
    with pytest.raises(ConfigError, match="adapter_layers=0"):
        LlamaAdapter(adapter_layers=0)
    with pytest.raises(ConfigError, match="adapter_layers=4 but model has 3 matching attention layers"):
        LlamaAdapter(adapter_layers=4).init(jax.random.key(0), params)
    with pytest.raises(ConfigError, match="matches no attention module.*available: model/layers_0/self_attn"):
        LlamaAdapter(targets=("attention/self",)).init(jax.random.key(0), params)
    method = LlamaAdapter(adapter_layers=1)
    p = method.init(jax.random.key(0), params)
    with pytest.raises(ConfigError, match="adapter is not mergeable"):
        method.merge(params, p)
    built = build_methods({"llama_adapter": {"adapter_len": 2, "adapter_layers": 1}})["llama_adapter"]
    hash(built)
    assert built.num_params(built.init(jax.random.key(0), params)) == 2 * 32 + 1


# --------------------------------------------------------------------------------------------------
# BitFit and presets


def test_bitfit_rules_select_exactly_the_biases(families):
    fam = families("gpt2")
    run_tree = {"base": fam.params, "peft": {"bitfit": {}}}
    bitfit = build_methods({"bitfit": {}})["bitfit"]
    assert isinstance(bitfit, BitFit) and bitfit.init(jax.random.key(0), fam.params) == {}
    labels = labels_lib.make_labels(run_tree, bitfit.trainable_rules())
    trained = {p for p, label in zip(leaf_paths(run_tree), jax.tree.leaves(labels), strict=True)
               if label != labels_lib.FROZEN}
    biases = {"base/" + p for p in leaf_paths(fam.params) if p.rsplit("/", 1)[-1] == "bias"}
    assert trained == biases and any("/ln_1/" in p for p in trained)  # linear and LayerNorm biases
    assert labels_lib.count_params(run_tree, labels)["trainable"] == bitfit.num_trainable(fam.params)
    one_layer = BitFit(targets=("transformer/h_1/.*",))
    assert labels_lib.count_params(run_tree, labels_lib.make_labels(run_tree, one_layer.trainable_rules()))[
        "bitfit"] == one_layer.num_trainable(fam.params) == sum(
        int(np.prod(v.shape)) for k, v in _leaves(fam.params).items() if k.startswith("transformer/h_1/")
        and k.endswith("/bias"))
    np.testing.assert_array_equal(fam.run([(bitfit, {})]), fam.run())  # adds nothing to the forward pass
    assert bitfit.merge(fam.params, {}) is fam.params
    with pytest.raises(ConfigError, match="no bias parameter.*this model has no biases"):
        bitfit.init(jax.random.key(0), families("llama").params)


def _leaves(tree) -> dict:
    return dict(zip(leaf_paths(tree), jax.tree.leaves(tree), strict=True))


def test_presets_on_the_run_tree(families):
    fam = families("gpt2")
    lora = build_method("lora", {"targets": ["c_attn"], "rank": 2})
    run_tree = {"base": fam.params, "peft": {"lora": lora.init(jax.random.key(0), fam.params)}}

    def trained(rules):
        labels = labels_lib.make_labels(run_tree, rules)
        return {p for p, label in _leaves(labels).items() if label != labels_lib.FROZEN}

    paths = set(_leaves(run_tree))
    assert trained(presets.method("lora")) == {p for p in paths if p.startswith("peft/lora/")}
    assert trained(presets.full_finetuning()) == {p for p in paths if p.startswith("base/")}
    assert trained(presets.last_k_layers(run_tree, 1)) == {p for p in paths if p.startswith("base/transformer/h_1/")}
    assert trained(presets.head([r"transformer/ln_f"])) == {"base/transformer/ln_f/scale", "base/transformer/ln_f/bias"}
    assert trained(presets.linear_probe("ln_f")) == {"base/transformer/ln_f/scale", "base/transformer/ln_f/bias"}
    assert trained(presets.bitfit()) == {p for p in paths if p.startswith("base/") and p.endswith("/bias")}
    both = presets.method("lora") + presets.last_k_layers(run_tree, 1)
    assert trained(both) == trained(presets.method("lora")) | trained(presets.last_k_layers(run_tree, 1))
    with pytest.raises(ConfigError, match="matches no parameter path"):
        trained(presets.head())  # GPT-2's head is tied: there is no lm_head parameter


# --------------------------------------------------------------------------------------------------
# Stage checks


def _stage(name, trainable, methods):
    return {"name": name, "steps": 2, "trainable": [list(r) for r in trainable], "methods": list(methods)}


@pytest.mark.parametrize("with_params", [False, True])
def test_stage_training_an_inactive_method_fails(families, with_params):
    fam = families("llama")
    methods = build_methods({"prefixish": {"method": "llama_adapter", "adapter_layers": 1},
                             "adapter": {"placement": "parallel", "bottleneck_size": 4}})
    params = ({"base": fam.params, "peft": {n: m.init(jax.random.key(0), fam.params) for n, m in methods.items()}}
              if with_params else None)
    ok = [_stage("pt", presets.method("prefixish"), ["prefixish"]),
          _stage("ft", presets.method("adapter"), ["prefixish", "adapter"]),
          _stage("both", presets.method("adapter") + presets.method("prefixish"), ["prefixish", "adapter"]),
          _stage("full", presets.full_finetuning(), ["prefixish"]),
          _stage("carve", [("peft/adapter/.*", labels_lib.FROZEN), (".*", "all")], ["prefixish"])]
    presets.check_stage_methods(ok, methods, params)
    with pytest.raises(ConfigError, match="stage 'ft' trains method 'prefixish'.*not active in it \\(active: adapter"):
        presets.check_stage_methods([_stage("ft", presets.method("prefixish") + presets.method("adapter"),
                                            ["adapter"])], methods, params)
    with pytest.raises(ConfigError, match="stage 'all' trains method 'adapter' \\(rule '\\.\\*'"):
        presets.check_stage_methods([_stage("all", [(".*", "all")], ["prefixish"])], methods, params)
    narrow = [("peft/adapter/model/layers_0/.*", "adapter")]
    with pytest.raises(ConfigError, match="stage 'narrow' trains method 'adapter'"):
        presets.check_stage_methods([_stage("narrow", narrow, [])], methods, params)
    with pytest.raises(ConfigError, match="stage 'x' activates method\\(s\\) 'lora' not defined in config.peft"):
        presets.check_stage_methods([_stage("x", presets.method("adapter"), ["adapter", "lora"])], methods, params)
    if params is not None:  # the plan itself accepts the good stages
        plans = plan_stages(params, [Stage.from_dict(s) for s in ok])
        assert plans[1].counts["trainable"] == sum(int(np.prod(v.shape)) for v in jax.tree.leaves(
            params["peft"]["adapter"]))


# --------------------------------------------------------------------------------------------------
# The staged-training configs of seed 002 (configs/shapes_ptpeft.py, configs/shapes_compare_002.py)

PTPEFT_VARIANTS = ["lora", "s_adapter", "p_adapter", "full", "reverse", "parallel", "alternate", "prefix",
                   "only_lora", "only_full", "reverse_p_adapter", "parallel_lora", "alternate_s_adapter,rounds=2",
                   "lora,train_prefix", "full,train_prefix,eval=noise", "p_adapter,smoke"]


@pytest.fixture(scope="module")
def load_and_plan(tmp_path_factory):
    """Loads a config variant and plans its stages against its abstract parameters (rules, groups, methods)."""
    from vlpeft_jax.cli.config import load_config_file
    from vlpeft_jax.cli.params import abstract_params

    cache = tmp_path_factory.mktemp("shapes")
    computed: dict[str, dict] = {}  # many variants share the model and methods

    def run(path: str):
        cfg = load_config_file(path)
        cfg.data.cache_dir = str(cache)  # a small world: only its tokenizer is needed here
        cfg.data.update(num_train=16, num_val=4, num_test=4, num_ood=4)
        key = cfg.model.to_json(sort_keys=True) + cfg.peft.to_json(sort_keys=True)
        params = computed[key] = computed.get(key) or abstract_params(cfg)
        stages = [Stage.from_dict(s, f"stages[{i}]") for i, s in enumerate(cfg.stages)]
        presets.check_stage_methods(stages, build_methods(cfg.peft), params)
        return cfg, params, plan_stages(params, stages)

    return run


def _count(params, prefix: str) -> int:
    return sum(int(np.prod(v.shape)) for k, v in _leaves(params).items() if k.startswith(prefix))


@pytest.mark.parametrize("variant", PTPEFT_VARIANTS)
def test_ptpeft_configs_plan(load_and_plan, variant):
    cfg, params, plans = load_and_plan(f"configs/shapes_ptpeft.py:{variant}")
    mode = variant.split(",")[0]
    total = sum(p.stage.steps for p in plans)
    assert total == (4 * len(plans) if "smoke" in variant else 400)
    prefix_count = _count(params, "peft/prefix/")
    if mode in ("lora", "s_adapter", "p_adapter", "full"):  # PT-PEFT: prefix first, then X with the prefix on
        first, second = plans
        assert first.stage.methods == ("prefix",) and first.counts["trainable"] == prefix_count
        assert second.stage.methods == (("prefix", mode) if mode != "full" else ("prefix",))
        x_count = (_count(params, "base/") - _count(params, "base/language_model/model/embed_tokens/")
                   if mode == "full" else _count(params, f"peft/{mode}/"))
        trains_prefix = "train_prefix" in variant
        assert second.counts["trainable"] == x_count + (prefix_count if trains_prefix else 0)
    if mode == "reverse":
        assert [p.stage.methods for p in plans] == [("lora",), ("lora", "prefix")]
        assert plans[1].counts["trainable"] == prefix_count
    if mode == "parallel":
        (plan,) = plans
        assert set(plan.counts) - {"frozen", "total", "trainable"} == {"prefix", "full"}
        lrs = plan.optimizer.learning_rates(100)  # each method keeps its own learning rate
        assert lrs["prefix"] > lrs["full"] > 0
    if mode == "alternate":
        assert [p.stage.name for p in plans] == [f"{k}_{r}" for r in range(1, 5) for k in ("prefix", "full")]
    if "eval=noise" in variant:
        assert cfg.peft.prefix.eval_replacement == "noise"


def test_ptpeft_bad_variants_and_sweeps(load_and_plan):
    from vlpeft_jax.cli.config import load_config_file

    for bad, match in (("lora2", "unknown mode 'lora2'"), ("reverse_dora", "unknown mode 'reverse_dora'"),
                       ("lora,pt=0", "bad option 'pt=0'"), ("full,eval=blur", "bad option 'eval=blur'"),
                       ("alternate,rounds=300", "pt and ft must be >= rounds")):
        with pytest.raises(ConfigError, match=match):
            load_config_file(f"configs/shapes_ptpeft.py:{bad}")
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_002", "configs/shapes_compare_002.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    names = set()
    assert "full" in module.SWEEPS["table2"] and "full" in module.SWEEPS["table5"]  # one run serves both tables
    for table, variants in module.SWEEPS.items():
        for v in variants:
            cfg, _, plans = load_and_plan(f"configs/shapes_compare_002.py:{v}")
            names.add(cfg.name)
            if table in ("table6", "table9"):
                assert sum(p.stage.steps for p in plans) == (400 if table == "table6" else 200 * len(plans) // 2)
    assert len(names) == len({v for vs in module.SWEEPS.values() for v in vs})  # each distinct run has its name
