"""Declared sharding (DESIGN invariant 7): a (data, fsdp, tensor) mesh and logical -> mesh axis rules.

Parameters carry logical axis names (``nn.with_logical_partitioning``; read them from an abstract init
with :func:`logical_specs`). :func:`tree_shardings` maps every leaf's logical names through the rules to
a ``NamedSharding``; a dimension whose size is not divisible by its mesh axes, a mesh axis already used
by an earlier dimension, and leaves without names fall back to replication (for that dimension / leaf).
Batches are sharded over ``("data", "fsdp")`` on their leading dimension. ``jax.jit`` with these in/out
shardings does the rest (see :func:`vlpeft_jax.train.step.jit_train_step`).

The same code runs on one device (the default 1x1x1 mesh: everything replicated), on 8 simulated CPU
devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``), or on a multi-process mesh
(``jax.distributed.initialize()`` first; batches are then assembled from each process's local part: the
rows :func:`process_rows` names, which on meshes from :func:`make_mesh` are process ``i``'s ``i``-th block
of the global batch when ``data * fsdp`` spans the processes, and the whole, identical batch when it does not).

Example:
    >>> import jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = make_mesh()
    >>> sh = tree_shardings({"w": jnp.ones((4, 8))}, mesh, {"w": P("embed", "mlp")})
    >>> sh["w"].spec  # one device: the size-1 mesh axes are dropped
    P(None, None)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vlpeft_jax.errors import ConfigError, InputError
from vlpeft_jax.train.state import TrainState
from vlpeft_jax.tree import path_str

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

MeshAxes = str | tuple[str, ...] | None
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("vocab", "tensor"),
    ("positions", None),
    ("channels", None),
    ("norm", None),
    ("queries", None),
)
"""Logical axis name -> mesh axes. Names not listed are replicated."""


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes ``("data", "fsdp", "tensor")``; one axis may be -1 (all remaining devices).

    Uses the first ``data * fsdp * tensor`` of ``devices`` (default ``jax.devices()``), so the default
    1x1x1 mesh is one device.

    Example:
        >>> make_mesh().shape
        OrderedDict([('data', 1), ('fsdp', 1), ('tensor', 1)])
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh sizes (data={data}, fsdp={fsdp}, tensor={tensor}) must be >= 1, one may be -1")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if len(devices) % known:
            raise ConfigError(f"mesh: {len(devices)} devices are not divisible by {known} (data={data}, "
                              f"fsdp={fsdp}, tensor={tensor})")
        sizes[sizes.index(-1)] = len(devices) // known
    n = math.prod(sizes)
    if n > len(devices):
        raise ConfigError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs {n} devices, "
                          f"only {len(devices)} available")
    return Mesh(np.asarray(devices[:n]).reshape(sizes), MESH_AXES)


def logical_specs(boxed: Any) -> Any:
    """The logical ``PartitionSpec`` of every leaf of a boxed tree (e.g. ``jax.eval_shape(model.init, ...)``);
    unboxed leaves get ``PartitionSpec()`` (replicated)."""
    return nn.get_partition_spec(boxed)


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_mesh(spec: PartitionSpec | None, shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES) -> PartitionSpec:
    """The mesh ``PartitionSpec`` of an array of ``shape`` whose dimensions have logical names ``spec``.

    Size-1 mesh axes are dropped; a dimension not divisible by its mesh axes' size, or whose mesh axis is
    already used by an earlier dimension, is replicated.

    Example:
        >>> mesh = make_mesh()
        >>> logical_to_mesh(PartitionSpec("embed", "mlp"), (4, 8), mesh)
        P(None, None)
    """
    table: Mapping[str, MeshAxes] = dict(rules)
    if spec is None or len(spec) == 0:
        return PartitionSpec()
    if len(spec) > len(shape):
        raise ConfigError(f"logical axes {spec} have more entries than the array's shape {tuple(shape)}")
    used: set[str] = set()
    out: list[MeshAxes] = []
    for dim, name in zip(shape, spec, strict=False):
        names = _as_tuple(name)
        axes = tuple(a for n in names for a in _as_tuple(table.get(n)) if mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in axes)
        if not axes or dim % size or used.intersection(axes):
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def tree_shardings(tree: Any, mesh: Mesh, specs: Any = None,
                   rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES) -> Any:
    """``NamedSharding`` for every leaf of ``tree`` (arrays or ``ShapeDtypeStruct``).

    Args:
      tree: the arrays (or their shapes).
      mesh: from :func:`make_mesh`.
      specs: a tree with ``tree``'s structure holding logical ``PartitionSpec`` leaves (see
        :func:`logical_specs`), or None (replicate everything).
      rules: logical -> mesh axis rules.
    """
    if specs is None:
        return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), tree)
    try:
        return jax.tree.map(lambda x, s: NamedSharding(mesh, logical_to_mesh(s, x.shape, mesh, rules)),
                            tree, specs)
    except ValueError as e:
        raise ConfigError(f"logical axis specs do not match the parameter tree: {e}") from None


def _trailing_dict_path(key_path: Sequence[Any]) -> tuple[str, ...]:
    out: list[str] = []
    for key in reversed(key_path):
        if not isinstance(key, jax.tree_util.DictKey):
            break
        out.append(str(key.key))
    return tuple(reversed(out))


def opt_state_shardings(opt_state: Any, trainable: Any, trainable_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optimizer state: a leaf that mirrors a parameter (same trailing dict path, e.g.
    ``...mu['base']['head']['kernel']``, and same shape) gets that parameter's sharding; others (counts,
    scalars) are replicated."""
    by_path: dict[tuple[str, ...], tuple[tuple[int, ...], Any]] = {}
    flat = jax.tree_util.tree_flatten_with_path(trainable)[0]
    for (path, x), sh in zip(flat, jax.tree.leaves(trainable_shardings), strict=True):
        by_path[tuple(path_str([k]) for k in path)] = (tuple(x.shape), sh)
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path: Sequence[Any], x: Any) -> NamedSharding:
        tail = _trailing_dict_path(path)
        for start in range(len(tail)):
            hit = by_path.get(tail[start:])
            if hit is not None and hit[0] == tuple(np.shape(x)):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def state_shardings(state: TrainState, param_shardings: Any, mesh: Mesh) -> TrainState:
    """A :class:`TrainState` of shardings for ``state`` (arrays or shapes), given the full params' shardings."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def masked(part: Any) -> Any:
        return jax.tree.map(lambda x, sh: None if x is None else sh, part, param_shardings,
                            is_leaf=lambda x: x is None)

    trainable_sh = masked(state.trainable)
    return TrainState(step=replicated, trainable=trainable_sh, frozen=masked(state.frozen),
                      opt_state=opt_state_shardings(state.opt_state, state.trainable, trainable_sh, mesh),
                      rng=replicated)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Sharding of a batch array: leading dimension over ``("data", "fsdp")``, the rest replicated."""
    if ndim == 0:
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shardings(batch: Any, mesh: Mesh) -> Any:
    """:func:`batch_sharding` for every leaf of ``batch``."""
    return jax.tree.map(lambda x: batch_sharding(mesh, np.ndim(x)), batch)


def _local_batch_blocks(mesh: Mesh) -> tuple[int, list[int]]:
    """(``data * fsdp``, the sorted indices of the batch blocks this process's devices hold)."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    index = batch_sharding(mesh, 1).addressable_devices_indices_map((n,))
    return n, sorted({sl[0].indices(n)[0] for sl in index.values()})


def process_rows(mesh: Mesh, global_batch_size: int) -> slice:
    """The rows of every global batch of ``global_batch_size`` that this process passes to :func:`put_batch`.

    With one process: all of them. With several (after ``jax.distributed.initialize``) and a mesh from
    :func:`make_mesh`: process ``i`` of ``P`` gets block ``i`` of ``P`` when ``data * fsdp`` is a multiple of
    ``P``; when the batch axes do not span the processes (e.g. a tensor-only mesh), every process passes the
    whole batch, and it must be the same batch in every process.

    Raises:
      InputError: ``global_batch_size`` is not divisible by ``data * fsdp``, or this process's devices hold
        batch blocks that are not contiguous (a mesh built from a custom device order).

    Example:
        >>> process_rows(make_mesh(), 8)
        slice(0, 8, None)
    """
    n, blocks = _local_batch_blocks(mesh)
    if global_batch_size % n:
        raise InputError(f"global batch size {global_batch_size} is not divisible by the mesh's data x fsdp = {n} "
                         f"devices")
    if blocks != list(range(blocks[0], blocks[-1] + 1)):
        raise InputError(f"process {jax.process_index()} holds batch blocks {blocks} of {n}, not one contiguous "
                         f"range; build the mesh with make_mesh (devices in process order)")
    size = global_batch_size // n
    return slice(blocks[0] * size, (blocks[-1] + 1) * size)


def put_batch(batch: Any, mesh: Mesh) -> Any:
    """Places a host batch on the mesh, sharded over ``("data", "fsdp")``.

    With several processes each passes its local part (the rows :func:`process_rows` names) and the global
    batch is assembled.

    Raises:
      InputError: the (global) batch size is not divisible by ``data * fsdp`` (with several processes: a
        local part whose rows do not split evenly over the batch blocks this process's devices hold).
    """
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    multi = jax.process_count() > 1
    local_blocks = len(_local_batch_blocks(mesh)[1]) if multi else 1

    def put(path: Sequence[Any], x: Any) -> jax.Array:
        x = np.asarray(x)
        sh = batch_sharding(mesh, x.ndim)
        if multi:
            if x.ndim and x.shape[0] % local_blocks:
                raise InputError(f"batch array {jax.tree_util.keystr(path)} has {x.shape[0]} rows in process "
                                 f"{jax.process_index()}, whose devices hold {local_blocks} of the mesh's data x "
                                 f"fsdp = {n} batch blocks: pass a multiple of {local_blocks} rows (the rows "
                                 f"sharding.process_rows names)")
            return jax.make_array_from_process_local_data(sh, x)
        if x.ndim and x.shape[0] % n:
            raise InputError(f"batch array {jax.tree_util.keystr(path)} has leading dimension {x.shape[0]}, "
                             f"not divisible by the mesh's data x fsdp = {n} devices")
        return jax.device_put(x, sh)

    return jax.tree_util.tree_map_with_path(put, batch)
