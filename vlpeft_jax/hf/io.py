"""Reading Hugging Face checkpoint directories offline, and mapping their tensors onto our trees.

A converter for a model family is an explicit key map: a list of :class:`KeyMap` entries, each naming
the Hugging Face tensor, the path in our parameter tree and the transform between them (usually a
transpose for linear weights, since PyTorch stores ``[out, in]`` and we store ``[in, out]``).
:func:`convert` applies the map, checks every target shape against the model's abstract
initialisation, and fails with the key, the expected and the found shape.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vlpeft_jax.errors import CheckpointError, OfflineError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def resolve_model_dir(path_or_id: str | os.PathLike) -> Path:
    """Returns the local directory of a checkpoint; a hub id fails at once with an offline message."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    s = str(path_or_id)
    if re.fullmatch(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)?", s) and not s.startswith((".", "/")):
        raise OfflineError(
            f"{s!r} is not a local directory. It looks like a Hugging Face hub id, but this machine has no "
            "network access: download the model elsewhere (e.g. `huggingface-cli download "
            f"{s} --local-dir DIR`), copy it here and pass DIR instead.")
    raise CheckpointError(f"checkpoint directory {s!r} does not exist")


def load_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Reads ``config.json`` of a checkpoint directory."""
    d = resolve_model_dir(model_dir)
    f = d / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{d} has no config.json (needed to know the architecture)")
    with open(f) as fh:
        return json.load(fh)


def load_state_dict(model_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory as float32/int numpy arrays, by Hugging Face key.

    Reads ``model.safetensors``, a sharded ``model.safetensors.index.json``, or (with torch installed)
    ``pytorch_model.bin`` / its sharded index, in that order of preference.
    """
    d = resolve_model_dir(model_dir)
    if (d / "model.safetensors").is_file():
        return _read_safetensors(d / "model.safetensors")
    if (d / "model.safetensors.index.json").is_file():
        out: dict[str, np.ndarray] = {}
        for shard in _index_shards(d / "model.safetensors.index.json"):
            out.update(_read_safetensors(d / shard))
        return out
    if (d / "pytorch_model.bin").is_file():
        return _read_torch_bin(d / "pytorch_model.bin")
    if (d / "pytorch_model.bin.index.json").is_file():
        out = {}
        for shard in _index_shards(d / "pytorch_model.bin.index.json"):
            out.update(_read_torch_bin(d / shard))
        return out
    raise CheckpointError(f"{d} holds no weights; expected one of: {', '.join(WEIGHT_FILES)}")


def _index_shards(index_file: Path) -> list[str]:
    with open(index_file) as fh:
        weight_map = json.load(fh).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_file} has no 'weight_map'")
    shards = sorted(set(weight_map.values()))
    for s in shards:
        if not (index_file.parent / s).is_file():
            raise CheckpointError(f"{index_file} names shard {s!r}, which is missing from {index_file.parent}")
    return shards


def _read_safetensors(f: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out = {}
    try:
        with safe_open(str(f), framework="np") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    except TypeError:  # bfloat16 tensors cannot be read as numpy: go through torch
        import torch
        from safetensors.torch import load_file

        out = {k: v.to(torch.float32).numpy() if v.is_floating_point() else v.numpy()
               for k, v in load_file(str(f)).items()}
    return {k: _to_float32(v) for k, v in out.items()}


def _read_torch_bin(f: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{f} is a PyTorch pickle; reading it needs torch (pip install torch==2.13.0), "
                              "or convert it to model.safetensors") from None
    sd = torch.load(str(f), map_location="cpu", weights_only=True)
    return {k: (v.to(torch.float32) if v.is_floating_point() else v).numpy() for k, v in sd.items()}


def _to_float32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a


# --------------------------------------------------------------------------------------------------
# Key maps

Transform = Callable[[np.ndarray], np.ndarray]


def identity(a: np.ndarray) -> np.ndarray:
    return a


def transpose(a: np.ndarray) -> np.ndarray:
    """PyTorch ``nn.Linear`` weight ``[out, in]`` -> our kernel ``[in, out]``."""
    return np.ascontiguousarray(a.T)


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """One tensor: Hugging Face key -> our parameter path (``/``-joined), with a transform."""

    hf_key: str
    path: str
    transform: Transform = identity
    optional: bool = False


def linear(hf_prefix: str, path: str, bias: bool = True, transposed: bool = True) -> list[KeyMap]:
    """Key maps of a linear layer (``weight``/``bias`` -> ``kernel``/``bias``).

    ``transposed=False`` for GPT-2's ``Conv1D``, which already stores ``[in, out]``.
    """
    maps = [KeyMap(f"{hf_prefix}.weight", f"{path}/kernel", transpose if transposed else identity)]
    if bias:
        maps.append(KeyMap(f"{hf_prefix}.bias", f"{path}/bias"))
    return maps


def norm(hf_prefix: str, path: str, bias: bool = True, weight_name: str = "weight") -> list[KeyMap]:
    """Key maps of a LayerNorm/RMSNorm (``weight``/``bias`` -> ``scale``/``bias``)."""
    maps = [KeyMap(f"{hf_prefix}.{weight_name}", f"{path}/scale")]
    if bias:
        maps.append(KeyMap(f"{hf_prefix}.bias", f"{path}/bias"))
    return maps


def embedding(hf_key: str, path: str) -> KeyMap:
    return KeyMap(hf_key, f"{path}/embedding")


def strip_prefix(state: Mapping[str, np.ndarray], prefixes: Iterable[str]) -> dict[str, np.ndarray]:
    """Drops the first matching prefix from every key (e.g. ``"transformer."``, ``"model."``)."""
    prefixes = tuple(prefixes)
    out = {}
    for k, v in state.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


def flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a/b/c": leaf}``."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten_tree(v, key))
        else:
            out[key] = v
    return out


def unflatten_tree(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a/b/c": leaf}`` -> nested dict."""
    out: dict[str, Any] = {}
    for k, v in flat.items():
        node = out
        parts = k.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def convert(state: Mapping[str, np.ndarray], key_maps: Iterable[KeyMap], abstract_params: Mapping[str, Any],
            *, source: str = "checkpoint", allow_missing: Iterable[str] = ()) -> dict[str, Any]:
    """Builds our parameter tree from a state dict through explicit key maps.

    Args:
      state: Hugging Face tensors by key.
      key_maps: the family's map.
      abstract_params: our (unboxed) parameter tree with ``ShapeDtypeStruct`` or array leaves, e.g.
        from ``jax.eval_shape``; it fixes the expected shape and dtype of every leaf.
      source: used in error messages (e.g. the directory).
      allow_missing: regexes of our paths that may stay uninitialised (they are taken from
        ``abstract_params`` if it holds arrays, e.g. Q-Former cross-attention initialised fresh).

    Returns:
      A nested dict of numpy arrays with exactly the structure of ``abstract_params``.

    Raises:
      CheckpointError: naming a missing HF key, a shape mismatch (key, expected, found), or a
        parameter of ours that nothing in the map filled.
    """
    expected = flatten_tree(abstract_params)
    out: dict[str, Any] = {}
    for m in key_maps:
        if m.hf_key not in state:
            if m.optional:
                continue
            near = [k for k in state if k.split(".")[-1] == m.hf_key.split(".")[-1]][:5]
            raise CheckpointError(f"{source}: tensor {m.hf_key!r} is missing (needed for {m.path}); "
                                  f"keys with the same suffix: {near}")
        if m.path not in expected:
            raise CheckpointError(f"internal key map error: {m.path!r} is not a parameter of the model")
        value = m.transform(np.asarray(state[m.hf_key]))
        want = tuple(expected[m.path].shape)
        if tuple(value.shape) != want:
            raise CheckpointError(f"{source}: tensor {m.hf_key!r} has shape {tuple(state[m.hf_key].shape)}; "
                                  f"expected {want} (after transform) for {m.path}")
        out[m.path] = value.astype(expected[m.path].dtype)
    allow = [re.compile(p) for p in allow_missing]
    for path, leaf in expected.items():
        if path in out:
            continue
        if any(a.fullmatch(path) for a in allow) and not _is_abstract(leaf):
            out[path] = np.asarray(leaf)
            continue
        raise CheckpointError(f"{source}: no tensor provides parameter {path} (shape {tuple(leaf.shape)})")
    return unflatten_tree(out)


Transform = Callable[[np.ndarray], np.ndarray]


def export_state(params: Mapping[str, Any], key_maps: Iterable[KeyMap],
                 inverses: Mapping[Transform, Transform] | None = None, *, what: str = "model"
                 ) -> dict[str, np.ndarray]:
    """The inverse of :func:`convert`: our parameter tree -> Hugging Face tensors (float32 numpy) by key.

    ``identity`` and ``transpose`` are their own inverses; any other transform of the maps needs its inverse in
    ``inverses`` (e.g. a patch convolution's, which needs the patch size).

    Example:
        >>> export_state({"proj": {"kernel": np.ones((2, 3))}}, linear("fc", "proj", bias=False))["fc.weight"].shape
        (3, 2)
    """
    import jax

    flat = flatten_tree(params)
    inverses = dict(inverses or {})
    out = {}
    for m in key_maps:
        if m.path not in flat:
            raise CheckpointError(f"parameter {m.path} is missing from the {what} tree being exported")
        value = np.asarray(jax.device_get(flat[m.path]), dtype=np.float32)
        if m.transform in inverses:
            value = inverses[m.transform](value)
        elif m.transform in (identity, transpose):
            value = m.transform(value)
        else:
            raise CheckpointError(f"internal key map error: no inverse for the transform of {m.path}")
        out[m.hf_key] = np.ascontiguousarray(value)
    return out


def _is_abstract(leaf: Any) -> bool:
    import jax

    return isinstance(leaf, jax.ShapeDtypeStruct)
