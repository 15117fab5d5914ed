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
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from vlpeft_jax.errors import CheckpointError, InputError, OfflineError

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


def load_state_dict(model_dir: str | os.PathLike, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory as numpy arrays, by Hugging Face key (read eagerly).

    Reads ``model.safetensors``, a sharded ``model.safetensors.index.json``, or (with torch installed)
    ``pytorch_model.bin`` / its sharded index, in that order of preference. Floating tensors are cast to
    ``dtype`` one at a time (float32 by default, as before; ``None`` keeps the stored dtype, bfloat16 as
    ``ml_dtypes.bfloat16``); integer tensors keep theirs. This holds the whole checkpoint in host memory: to
    build parameters, prefer :func:`lazy_state_dict` with :func:`convert`, which reads one tensor (or the slice
    a device holds) at a time.

    Example:
        >>> import tempfile
        >>> from safetensors.numpy import save_file
        >>> d = tempfile.mkdtemp()
        >>> save_file({"w": np.ones((2, 3), np.float16)}, f"{d}/model.safetensors")
        >>> load_state_dict(d)["w"].dtype, load_state_dict(d, dtype=None)["w"].dtype
        (dtype('float32'), dtype('float16'))
    """
    lazy = lazy_state_dict(model_dir)
    return {k: t.read(dtype) for k, t in lazy.items()}


# --------------------------------------------------------------------------------------------------
# Lazy reading

# safetensors dtype names -> numpy dtypes (little-endian, as the format stores them)
_ST_DTYPES: dict[str, Any] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}


_ML_FLOATS = {np.dtype(getattr(ml_dtypes, n)) for n in ("bfloat16", "float8_e4m3fn", "float8_e5m2")}


def _is_float(dtype: Any) -> bool:
    """Floating, counting ml_dtypes' bfloat16 / float8 (which numpy's ``issubdtype`` does not)."""
    dtype = np.dtype(dtype)
    return np.issubdtype(dtype, np.floating) or dtype in _ML_FLOATS


def _cast(a: np.ndarray, dtype: Any) -> np.ndarray:
    """Floating ``a`` as ``dtype`` (``None``: unchanged); other dtypes unchanged."""
    if dtype is None or not _is_float(a.dtype):
        return a
    return a.astype(dtype, copy=False)


class LazyTensor:
    """One stored tensor of a checkpoint, read only when asked for: whole (:meth:`read`, ``np.asarray``) or a
    slice (``t[0:2, :]``, which reads only those elements of a safetensors file).

    ``shape`` and ``dtype`` (the stored dtype) are known without reading; ``bytes_read`` counts the bytes
    handed out so far (what a test checks to see that only slices were read).

    Example:
        >>> t = LazyTensor("w", (2, 3), np.float32, lambda idx: np.arange(6, dtype=np.float32).reshape(2, 3)[idx])
        >>> t[1:, :].tolist(), t.bytes_read
        ([[3.0, 4.0, 5.0]], 12)
    """

    def __init__(self, key: str, shape: tuple[int, ...], dtype: Any, reader: Callable[[tuple], np.ndarray],
                 source: tuple[str, int] = ("", 0)) -> None:
        self.key = key
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.source = source  # (file, byte offset): convert reads in this order
        self.bytes_read = 0
        self._reader = reader

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        drop = tuple(n for n, i in enumerate(index) if isinstance(i, (int, np.integer)))
        for n in drop:
            if n >= self.ndim or not -self.shape[n] <= index[n] < self.shape[n]:
                raise IndexError(f"index {index[n]} is out of range for axis {n} of {self!r}")
        index = tuple(slice(int(i) % self.shape[n], int(i) % self.shape[n] + 1) if n in drop else i
                      for n, i in enumerate(index))
        out = self._reader(_full_index(index, self.shape))
        self.bytes_read += out.nbytes
        return out.squeeze(drop) if drop else out

    def read(self, dtype: Any = None) -> np.ndarray:
        """The whole tensor; floating values cast to ``dtype`` (``None``: the stored dtype)."""
        return _cast(self[()], dtype)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        a = self.read()
        return a if dtype is None else a.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"LazyTensor({self.key!r}, shape={self.shape}, dtype={self.dtype})"


def _full_index(index: Any, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Any basic index (slices, ints, Ellipsis, None from jax) -> one concrete slice per dimension.

    Only slices and ``()``/``None``/``Ellipsis`` are accepted (:meth:`LazyTensor.__getitem__` turns integers
    into length-1 slices first), which is all that placement needs.
    """
    if index is None or index is Ellipsis:
        index = ()
    if not isinstance(index, tuple):
        index = (index,)
    if any(i is Ellipsis for i in index):
        at = next(n for n, i in enumerate(index) if i is Ellipsis)
        index = index[:at] + (slice(None),) * (len(shape) - len(index) + 1) + index[at + 1:]
    if len(index) > len(shape) or not all(isinstance(i, slice) for i in index):
        raise InputError(f"a lazy tensor of shape {shape} takes slices only (one per dimension at most); "
                         f"got {index!r}")
    index = index + (slice(None),) * (len(shape) - len(index))
    if any(i.step is not None and i.step < 0 for i in index):
        raise InputError(f"a lazy tensor takes slices with positive steps; got {index!r}")
    return tuple(slice(*s.indices(n)) for s, n in zip(index, shape, strict=True))


class _SafetensorsFile:
    """The header of one ``.safetensors`` file; each read maps just the tensor's bytes and copies the slice."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as fh:
            (n,) = np.frombuffer(fh.read(8), "<u8")
            header = json.loads(fh.read(int(n)))
        self.data_start = 8 + int(n)
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            if meta["dtype"] not in _ST_DTYPES:
                raise CheckpointError(f"{path}: tensor {key!r} has dtype {meta['dtype']}, which this reader does "
                                      f"not know; known: {', '.join(_ST_DTYPES)}")
            self.entries[key] = (_ST_DTYPES[meta["dtype"]], tuple(meta["shape"]),
                                 self.data_start + int(meta["data_offsets"][0]))

    def tensor(self, key: str) -> LazyTensor:
        dtype, shape, offset = self.entries[key]

        def read(index: tuple[slice, ...]) -> np.ndarray:
            if 0 in shape or not shape:  # nothing to map, or a scalar
                if not shape:
                    with open(self.path, "rb") as fh:
                        fh.seek(offset)
                        return np.frombuffer(fh.read(dtype.itemsize), dtype).reshape(()).copy()
                return np.empty(shape, dtype)[index]
            mm = np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape)
            try:
                return np.array(mm[index])  # copies only the slice; the mapping goes when mm does
            finally:
                del mm

        return LazyTensor(key, shape, dtype, read, (str(self.path), offset))


class _TorchBinFiles:
    """``pytorch_model.bin`` shard files: pickles cannot be read in parts, so each file is loaded whole (with
    ``mmap`` where its format allows) and only the most recently used file is kept."""

    def __init__(self) -> None:
        self._path: Path | None = None
        self._state: dict[str, Any] = {}

    def load(self, path: Path) -> dict[str, Any]:
        if self._path != path:
            self._state = {}  # drop the previous file before reading the next
            self._state = _torch_load(path)
            self._path = path
        return self._state

    def tensors(self, path: Path) -> dict[str, LazyTensor]:
        out = {}
        for n, (key, t) in enumerate(self.load(path).items()):
            out[key] = LazyTensor(key, tuple(t.shape), _torch_dtype(t), self._reader(path, key), (str(path), n))
        return out

    def _reader(self, path: Path, key: str) -> Callable[[tuple], np.ndarray]:
        def read(index: tuple[slice, ...]) -> np.ndarray:
            return np.array(_torch_to_numpy(self.load(path)[key][index] if index else self.load(path)[key]))
        return read


def _torch_load(f: Path) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{f} is a PyTorch pickle; reading it needs torch (pip install torch==2.13.0), "
                              "or convert it to model.safetensors") from None
    try:
        return torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (non-zip) format cannot be mapped
        return torch.load(str(f), map_location="cpu", weights_only=True)


def _torch_dtype(t: Any) -> np.dtype:
    import torch

    if t.dtype == torch.bfloat16:
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(torch.empty((), dtype=t.dtype).numpy().dtype)


def _torch_to_numpy(t: Any) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


class LazyStateDict(Mapping[str, LazyTensor]):
    """The tensors of a checkpoint directory as :class:`LazyTensor` handles, by Hugging Face key: nothing is
    read until a value is (``np.asarray(state[k])`` reads one tensor; ``state[k][idx]`` one slice).

    Because values are handles, the key renaming the family loaders do (dict comprehensions,
    :func:`strip_prefix`, :meth:`rename`) stays lazy; :func:`convert` reads each tensor once, in file order,
    and casts or places it before reading the next.

    Example:
        >>> import tempfile
        >>> from safetensors.numpy import save_file
        >>> d = tempfile.mkdtemp()
        >>> save_file({"model.w": np.arange(6, dtype=np.float32).reshape(2, 3)}, f"{d}/model.safetensors")
        >>> state = lazy_state_dict(d).rename(lambda k: k.removeprefix("model."))
        >>> state["w"].shape, state["w"][:, 1].tolist(), state.bytes_read
        ((2, 3), [1.0, 4.0], 8)
    """

    def __init__(self, tensors: Mapping[str, LazyTensor]) -> None:
        self._tensors = dict(tensors)

    def __getitem__(self, key: str) -> LazyTensor:
        return self._tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        return f"LazyStateDict({len(self)} tensors)"

    def rename(self, fn: Callable[[str], str | None]) -> LazyStateDict:
        """A view with every key ``k`` renamed to ``fn(k)`` (dropped where ``fn`` returns ``None``)."""
        out = {}
        for k, t in self._tensors.items():
            new = fn(k)
            if new is not None:
                out[new] = t
        return LazyStateDict(out)

    @property
    def bytes_read(self) -> int:
        """Bytes read from the files so far, all tensors together."""
        return sum(t.bytes_read for t in self._tensors.values())


def lazy_state_dict(model_dir: str | os.PathLike) -> LazyStateDict:
    """The tensors of a checkpoint directory, read on demand (see :class:`LazyStateDict`).

    Only the safetensors headers are read here. ``pytorch_model.bin`` files cannot be read in parts: each is
    loaded whole when one of its tensors is first asked for (one shard file held at a time; listing the keys
    loads each file once, memory-mapped where torch allows).

    Example:
        >>> import tempfile
        >>> from safetensors.numpy import save_file
        >>> d = tempfile.mkdtemp()
        >>> save_file({"w": np.ones((4, 2), np.float32)}, f"{d}/model.safetensors")
        >>> lazy_state_dict(d)["w"]
        LazyTensor('w', shape=(4, 2), dtype=float32)
    """
    d = resolve_model_dir(model_dir)
    tensors: dict[str, LazyTensor] = {}
    if (d / "model.safetensors").is_file():
        files = [d / "model.safetensors"]
    elif (d / "model.safetensors.index.json").is_file():
        files = [d / s for s in _index_shards(d / "model.safetensors.index.json")]
    else:
        files = []
    for f in files:
        st = _SafetensorsFile(f)
        tensors.update({k: st.tensor(k) for k in st.entries})
    if files:
        return LazyStateDict(tensors)
    if (d / "pytorch_model.bin").is_file():
        bins = [d / "pytorch_model.bin"]
    elif (d / "pytorch_model.bin.index.json").is_file():
        bins = [d / s for s in _index_shards(d / "pytorch_model.bin.index.json")]
    else:
        raise CheckpointError(f"{d} holds no weights; expected one of: {', '.join(WEIGHT_FILES)}")
    reader = _TorchBinFiles()
    for f in bins:
        tensors.update(reader.tensors(f))
    return LazyStateDict(tensors)


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
    """Every tensor of one safetensors file, floating ones as float32."""
    st = _SafetensorsFile(Path(f))
    return {k: st.tensor(k).read(np.float32) for k in st.entries}


def _to_float32(a: np.ndarray) -> np.ndarray:
    return _cast(a, np.float32)


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


def convert(state: Mapping[str, Any], key_maps: Iterable[KeyMap], abstract_params: Mapping[str, Any],
            *, source: str = "checkpoint", allow_missing: Iterable[str] = (), param_dtype: Any = None,
            sharding: Any = None) -> dict[str, Any]:
    """Builds our parameter tree from a state dict through explicit key maps.

    Tensors are converted one at a time: with a :class:`LazyStateDict` (or any mapping whose values are
    :class:`LazyTensor` handles) each is read, cast and placed before the next is read, in file order, so host
    memory holds the result plus one tensor; with a ``sharding`` each device's slice is read on its own.

    Args:
      state: Hugging Face tensors by key: numpy arrays or :class:`LazyTensor` handles.
      key_maps: the family's map.
      abstract_params: our (unboxed) parameter tree with ``ShapeDtypeStruct`` or array leaves, e.g.
        from ``jax.eval_shape``; it fixes the expected shape (and, unless ``param_dtype`` says otherwise, the
        dtype) of every leaf.
      source: used in error messages (e.g. the directory).
      allow_missing: regexes of our paths that may stay uninitialised (they are taken from
        ``abstract_params`` if it holds arrays, e.g. Q-Former cross-attention initialised fresh).
      param_dtype: dtype of the floating parameters: ``None`` takes the abstract leaf's dtype (float32 for our
        models, as before), ``"stored"`` keeps the checkpoint's (bfloat16 stays bfloat16), or a dtype
        (``jnp.bfloat16``, ``np.float16``...). Integer leaves keep the abstract dtype.
      sharding: ``None`` returns host numpy arrays; otherwise a ``jax.sharding.Sharding`` for every leaf, a tree
        of them (``None`` leaves stay on the host) with the structure of ``abstract_params``, or a callable
        taking ``abstract_params`` and returning either. Each leaf is then built with
        ``jax.make_array_from_callback``, so a process reads only the slices its devices hold (a transposed
        kernel's slice is read as the transposed slice of the stored tensor).

    Returns:
      A nested dict of numpy arrays (or ``jax.Array`` where a sharding is given) with exactly the structure
      of ``abstract_params``.

    Raises:
      CheckpointError: naming a missing HF key, a shape mismatch (key, expected, found), or a
        parameter of ours that nothing in the map filled; all are checked before any tensor is read.

    Example:
        >>> import jax
        >>> state = {"fc.weight": np.arange(6, dtype=np.float32).reshape(3, 2)}
        >>> abstract = {"fc": {"kernel": jax.ShapeDtypeStruct((2, 3), np.float32)}}
        >>> out = convert(state, linear("fc", "fc", bias=False), abstract, param_dtype=np.float16)
        >>> out["fc"]["kernel"].dtype, out["fc"]["kernel"][1].tolist()
        (dtype('float16'), [1.0, 3.0, 5.0])
    """
    expected = flatten_tree(abstract_params)
    shardings = _flat_shardings(sharding, abstract_params)
    todo: list[KeyMap] = []
    for m in key_maps:
        if m.hf_key not in state:
            if m.optional:
                continue
            near = [k for k in state if k.split(".")[-1] == m.hf_key.split(".")[-1]][:5]
            raise CheckpointError(f"{source}: tensor {m.hf_key!r} is missing (needed for {m.path}); "
                                  f"keys with the same suffix: {near}")
        if m.path not in expected:
            raise CheckpointError(f"internal key map error: {m.path!r} is not a parameter of the model")
        value = state[m.hf_key]
        if isinstance(value, LazyTensor) and m.transform in (identity, transpose):
            _check_shape(value.shape if m.transform is identity else value.shape[::-1], m, expected, value, source)
        todo.append(m)
    allow = [re.compile(p) for p in allow_missing]
    filled = {m.path for m in todo}
    for path, leaf in expected.items():
        if path not in filled and not (any(a.fullmatch(path) for a in allow) and not _is_abstract(leaf)):
            raise CheckpointError(f"{source}: no tensor provides parameter {path} (shape {tuple(leaf.shape)})")
    # read in file order (sequential I/O; one pytorch_model.bin shard loaded at a time)
    todo.sort(key=lambda m: getattr(state[m.hf_key], "source", ("", 0)))
    out: dict[str, Any] = {}
    for m in todo:
        value = state[m.hf_key]
        leaf = expected[m.path]
        lazy = isinstance(value, LazyTensor) and m.transform in (identity, transpose)
        stored = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
        dtype = _target_dtype(stored, leaf.dtype, param_dtype)
        if lazy:
            out[m.path] = _place_lazy(value, m.transform is transpose, dtype, shardings.get(m.path))
            continue
        array = m.transform(np.asarray(value))
        _check_shape(tuple(array.shape), m, expected, value, source)
        out[m.path] = _place(np.asarray(array).astype(dtype, copy=False), shardings.get(m.path))
    for path, leaf in expected.items():
        if path not in out:
            out[path] = _place(np.asarray(leaf), shardings.get(path))
    return unflatten_tree(out)


def _check_shape(found: tuple[int, ...], m: KeyMap, expected: Mapping[str, Any], value: Any, source: str) -> None:
    want = tuple(expected[m.path].shape)
    if tuple(found) != want:
        raise CheckpointError(f"{source}: tensor {m.hf_key!r} has shape {tuple(value.shape)}; "
                              f"expected {want} (after transform) for {m.path}")


def _target_dtype(stored: Any, leaf: Any, param_dtype: Any) -> np.dtype:
    if param_dtype is None or not _is_float(leaf):
        return np.dtype(leaf)
    if isinstance(param_dtype, str) and param_dtype == "stored":
        return np.dtype(stored) if _is_float(stored) else np.dtype(leaf)
    try:
        dtype = np.dtype(param_dtype)
    except TypeError:
        raise InputError(f"param_dtype {param_dtype!r} is not a dtype; use None, 'stored', float32, bfloat16, "
                         "float16") from None
    if not _is_float(dtype):
        raise InputError(f"param_dtype {param_dtype!r} is not a floating dtype; use None, 'stored', float32, "
                         "bfloat16, float16")
    return dtype


def _flat_shardings(sharding: Any, abstract_params: Mapping[str, Any]) -> dict[str, Any]:
    """``{path: Sharding or None}`` from the ``sharding`` argument of :func:`convert`."""
    import jax

    if sharding is None:
        return {}
    if callable(sharding) and not isinstance(sharding, jax.sharding.Sharding):
        sharding = sharding(abstract_params)
    if sharding is None:
        return {}
    paths = flatten_tree(abstract_params)
    if isinstance(sharding, jax.sharding.Sharding):
        return dict.fromkeys(paths, sharding)
    if not isinstance(sharding, Mapping):
        raise InputError(f"sharding must be None, a jax.sharding.Sharding, a tree of them shaped like the "
                         f"parameters, or a callable returning one; got {type(sharding).__name__}")
    flat = flatten_tree(sharding)
    missing = sorted(set(paths) - set(flat))
    if missing:
        raise InputError(f"the sharding tree has no entry for parameter(s) {missing[:5]} "
                         f"({len(missing)} missing); it must have the structure of the parameters")
    for path, s in flat.items():
        if s is not None and not isinstance(s, jax.sharding.Sharding):
            raise InputError(f"sharding for {path} is a {type(s).__name__}, not a jax.sharding.Sharding or None")
    return flat


def _place(array: np.ndarray, sharding: Any) -> Any:
    if sharding is None:
        return array
    import jax

    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index if index else ()])


def _place_lazy(tensor: LazyTensor, transposed: bool, dtype: np.dtype, sharding: Any) -> Any:
    """One tensor, cast to ``dtype``: whole on the host, or each addressable device's slice read on its own."""
    if sharding is None:
        whole = tensor.read()
        return np.ascontiguousarray(whole.T if transposed else whole, dtype=dtype)
    import jax

    shape = tensor.shape[::-1] if transposed else tensor.shape
    parts: dict[tuple, np.ndarray] = {}  # replicated devices share one read

    def read(index: Any) -> np.ndarray:
        index = _full_index(index, shape)
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in parts:
            part = tensor[index[::-1]].T if transposed else tensor[index]
            parts[key] = np.ascontiguousarray(part, dtype=dtype)
        return parts[key]

    return jax.make_array_from_callback(shape, sharding, read)


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
