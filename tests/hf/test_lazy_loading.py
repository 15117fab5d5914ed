"""Lazy, dtype-keeping, sharded loading of Hugging Face checkpoints (hf/io.py lazy_state_dict + convert).

A tiny LLaMA written by transformers in bfloat16 as 3 safetensors shards is the reference: our parameters must
equal its tensors (transposed where PyTorch stores ``[out, in]``) in bfloat16 and float32; placed on a 2x2 mesh
of simulated CPU devices, every device must hold its slice and the reader must have been asked for slices only.
A ~200 MB four-shard checkpoint checks the peak host memory of loading in a clean subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from vlpeft_jax.errors import CheckpointError, InputError
from vlpeft_jax.hf import decoders, io

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny bfloat16 LlamaForCausalLM saved by transformers in 3+ shards, with its tensors (torch, float32)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    d = tmp_path_factory.mktemp("llama_bf16")
    model.save_pretrained(d, max_shard_size="20KB")
    reference = {k: v.float().numpy() for k, v in model.state_dict().items()}
    return d, reference


def _expected(reference, config):
    """Our path -> the reference tensor in our layout (kernels are the transposed PyTorch weights)."""
    return {m.path: (reference[m.hf_key].T if m.transform is io.transpose else reference[m.hf_key])
            for m in decoders.llama_key_maps(config)}


def test_checkpoint_is_sharded(llama_dir):
    d, _ = llama_dir
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    assert not (d / "model.safetensors").exists()


@pytest.mark.parametrize("param_dtype, want", [("bf16", ml_dtypes.bfloat16), (None, np.float32),
                                               ("stored", ml_dtypes.bfloat16)])
def test_llama_parity_keeps_or_casts_dtype(llama_dir, param_dtype, want):
    d, reference = llama_dir
    requested = ml_dtypes.bfloat16 if param_dtype == "bf16" else param_dtype
    model, params = decoders.load_llama(d, param_dtype=requested)
    flat = io.flatten_tree(params)
    expected = _expected(reference, model.config)
    assert set(flat) == set(expected)
    for path, ref in expected.items():
        assert isinstance(flat[path], np.ndarray) and flat[path].dtype == np.dtype(want), path
        assert flat[path].flags.c_contiguous, path
        np.testing.assert_array_equal(flat[path].astype(np.float32), ref, err_msg=path)


def test_lazy_state_dict_reads_nothing_until_asked(llama_dir):
    d, reference = llama_dir
    state = io.lazy_state_dict(d)
    assert set(state) == set(reference) and state.bytes_read == 0
    t = state["model.layers.1.mlp.down_proj.weight"]
    assert t.dtype == np.dtype(ml_dtypes.bfloat16) and t.shape == (32, 64)
    part = t[2:5, 10:20]
    assert state.bytes_read == part.nbytes == 3 * 10 * 2
    np.testing.assert_array_equal(part.astype(np.float32), reference[t.key][2:5, 10:20])
    np.testing.assert_array_equal(t[-1].astype(np.float32), reference[t.key][-1])
    # the key renaming loaders do keeps the handles (nothing read)
    before = state.bytes_read
    stripped = io.strip_prefix(state, ["model."])
    renamed = state.rename(lambda k: None if k.startswith("lm_head") else k.upper())
    assert "layers.0.self_attn.q_proj.weight" in stripped and "LM_HEAD.WEIGHT" not in renamed
    assert state.bytes_read == before
    # the eager reader still gives float32 (or the stored dtype on request)
    eager = io.load_state_dict(d)
    assert eager[t.key].dtype == np.float32
    np.testing.assert_array_equal(eager[t.key], reference[t.key])
    assert io.load_state_dict(d, dtype=None)[t.key].dtype == np.dtype(ml_dtypes.bfloat16)


def test_errors_are_named_before_reading(llama_dir, tmp_path):
    d, _ = llama_dir
    state = io.lazy_state_dict(d)
    config = decoders.LlamaConfig.from_hf(io.load_config(d))
    abstract = decoders.abstract_params(decoders.LlamaForCausalLM(config))
    maps = decoders.llama_key_maps(config)
    bad = dict(state)
    bad["model.layers.0.self_attn.k_proj.weight"] = bad["model.layers.0.self_attn.q_proj.weight"]  # (32, 32)
    with pytest.raises(CheckpointError, match=r"k_proj\.weight.*\(32, 32\).*\(32, 16\)"):
        io.convert(bad, maps, abstract)
    with pytest.raises(InputError, match="not a floating dtype"):
        io.convert(state, maps, abstract, param_dtype=np.int32)
    with pytest.raises(InputError, match="no entry for parameter"):
        io.convert(state, maps, abstract, sharding={"model": {}})
    assert state.bytes_read == 0


def test_pytorch_bin_still_loads(llama_dir, tmp_path):
    torch = pytest.importorskip("torch")
    d, reference = llama_dir
    from safetensors.torch import load_file

    shards = sorted(d.glob("model-*.safetensors"))
    weight_map = {}
    for n, f in enumerate(shards):  # one .bin per safetensors shard, bfloat16 kept
        name = f"pytorch_model-{n:05d}.bin"
        tensors = load_file(str(f))
        torch.save(tensors, tmp_path / name)
        weight_map.update(dict.fromkeys(tensors, name))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    model, params = decoders.load_llama(tmp_path, param_dtype="stored")
    flat = io.flatten_tree(params)
    for path, ref in _expected(reference, model.config).items():
        assert flat[path].dtype == np.dtype(ml_dtypes.bfloat16), path
        np.testing.assert_array_equal(flat[path].astype(np.float32), ref, err_msg=path)


_SHARDED = """
import collections, json, sys
import jax, numpy as np, ml_dtypes
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from vlpeft_jax.hf import decoders, io

d, ref_file = sys.argv[1], sys.argv[2]
assert len(jax.devices()) == 4
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("a", "b"))
reads = collections.defaultdict(list)
orig = io.LazyTensor.__getitem__
def counting(self, index):
    out = orig(self, index)
    reads[self.key].append(out.nbytes)
    return out
io.LazyTensor.__getitem__ = counting

def shard(abstract):
    return jax.tree.map(lambda s: NamedSharding(mesh, P("a", "b") if len(s.shape) == 2 else P()), abstract)

config = decoders.LlamaConfig.from_hf(io.load_config(d))
abstract = decoders.abstract_params(decoders.LlamaForCausalLM(config))
state = io.lazy_state_dict(d)
params = io.convert(state, decoders.llama_key_maps(config), abstract, param_dtype=ml_dtypes.bfloat16, sharding=shard)
ref = dict(np.load(ref_file))  # the transformers model's tensors, float32
flat = io.flatten_tree(params)
checked = 0
for m in decoders.llama_key_maps(config):
    want = ref[m.hf_key].T if m.transform is io.transpose else ref[m.hf_key]
    arr = flat[m.path]
    assert isinstance(arr, jax.Array) and arr.dtype == jax.numpy.bfloat16, m.path
    assert arr.sharding.spec == (P("a", "b") if want.ndim == 2 else P()), m.path
    shards = arr.addressable_shards
    assert len(shards) == 4
    for s in shards:
        np.testing.assert_array_equal(np.asarray(s.data, np.float32), want[s.index], err_msg=m.path)
        checked += 1
    nbytes = want.size * 2
    if want.ndim == 2:  # four distinct quarters, each read once and nothing more
        assert sorted(reads[m.hf_key]) == [nbytes // 4] * 4, (m.hf_key, reads[m.hf_key], nbytes)
    else:  # replicated: one whole read shared by the four devices
        assert reads[m.hf_key] == [nbytes], (m.hf_key, reads[m.hf_key])
assert state.bytes_read == sum(v.size * 2 for v in ref.values()), state.bytes_read
print("OK", checked)
"""


def _run(script: str, *args: str, devices: int = 1) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_sharded_placement_reads_only_slices(llama_dir, tmp_path):
    d, reference = llama_dir
    np.savez(tmp_path / "ref.npz", **reference)
    out = _run(_SHARDED, str(d), str(tmp_path / "ref.npz"), devices=4).split()
    n_leaves = len(decoders.llama_key_maps(decoders.LlamaConfig.from_hf(io.load_config(d))))
    assert out[-2:] == ["OK", str(4 * n_leaves)], out


_MEMORY = """
import re, sys
import jax, numpy as np
from vlpeft_jax.hf import io

def status(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

d, mode, n_tensors, rows = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
maps, abstract = [], {}
for i in range(n_tensors):
    transposed = i % 2 == 0
    maps += io.linear(f"w{i}", f"w{i}", bias=False, transposed=transposed)
    abstract[f"w{i}"] = {"kernel": jax.ShapeDtypeStruct((rows, rows), np.float32)}
base = status("VmRSS")
try:
    open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current RSS
except OSError:
    pass
state = io.lazy_state_dict(d) if mode == "lazy" else io.load_state_dict(d)
params = io.convert(state, maps, abstract)
peak = status("VmHWM")
model = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
k = params["w0"]["kernel"]
assert k[0, 1] == 1 * rows and k[1, 0] == 1, (k[0, 1], k[1, 0])  # transposed: stored [1, 0] = rows
print(model, peak - base)
"""


def test_peak_host_memory_is_model_plus_under_one_and_a_half_shards(tmp_path):
    """~200 MB of float32 in 4 shards of ~50 MB: loading may grow the process by the model plus <= 1.5 shards
    (the eager path, state dict + converted copy, is about twice the model)."""
    from safetensors.numpy import save_file

    rows, per_shard, n_shards = 1792, 4, 4  # 4 x 12.25 MiB tensors per shard
    base = np.arange(rows * rows, dtype=np.float32).reshape(rows, rows)
    weight_map, shard_bytes = {}, 0
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        tensors = {f"w{s * per_shard + j}.weight": base for j in range(per_shard)}
        save_file(tensors, str(tmp_path / name))
        shard_bytes = max(shard_bytes, (tmp_path / name).stat().st_size)
        weight_map.update(dict.fromkeys(tensors, name))
    del base
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    try:
        model, growth = map(int, _run(_MEMORY, str(tmp_path), "lazy", str(n_shards * per_shard),
                                      str(rows)).split())
    finally:
        for f in tmp_path.iterdir():
            f.unlink()
    assert model == n_shards * per_shard * rows * rows * 4
    assert growth <= model + 1.5 * shard_bytes, (growth / 2**20, model / 2**20, shard_bytes / 2**20)
