"""Memory plans: per-device memory of a sharded train step, from an ahead-of-time compile on abstract shapes.

:func:`plan_memory` builds the train state of one stage as ``ShapeDtypeStruct`` leaves carrying their mesh
shardings (nothing is allocated), lowers and compiles :func:`~vlpeft_jax.train.step.make_train_step` with
those shardings (state donated, as in training) and reads the compiled executable's
``memory_analysis()``. Beside the compiler's numbers it counts the sharded state itself: each leaf's shard
shape (``sharding.shard_shape``) times its item size, summed per device, for the parameters (trainable and
frozen), the optimizer state and the rest (step, rng).

The peak estimate is ``arguments + outputs - aliased + temporaries``: the donated state's outputs reuse
its buffers (``alias``), and ``temp`` holds the gradients, activations kept for the backward pass and
everything else the step allocates while it runs. The numbers are the compiler's for the platform it
compiled for: on simulated CPU devices (``--xla_force_host_platform_device_count``) they are the CPU
compiler's, whose fusion and scheduling differ from GPU/TPU ones, so treat temporaries as an estimate.

:func:`parse_bytes` and :func:`parse_mesh` read the command line's ``--device-memory`` and ``--mesh``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from vlpeft_jax.train import stages, sharding
    >>> params = {"w": jnp.zeros((8, 4))}
    >>> plan = stages.plan_stages(params, [stages.Stage("all", 1, [(".*", "all")])])[0]
    >>> def loss_fn(p, batch, rng):
    ...     return jnp.mean((batch["x"] @ p["w"]) ** 2), {}
    >>> batch = {"x": jax.ShapeDtypeStruct((2, 8), jnp.float32)}
    >>> mp = plan_memory(params, None, plan, loss_fn, batch, sharding.make_mesh(), device_memory=parse_bytes("1MiB"))
    >>> mp.params_bytes, mp.opt_state_bytes, mp.fits  # 32 float32; adamw: mu, nu and two int32 step counts
    (128, 264, True)
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.train import sharding as sharding_lib
from vlpeft_jax.train.stages import StagePlan, abstract_stage_state, stage_state_shardings
from vlpeft_jax.train.step import LossFn, jit_train_step, make_train_step

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
BYTE_FORMS = "a number of bytes with an optional unit B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB " \
             "(powers of 1024), e.g. 16GiB, 80GB, 1.5TiB"


def parse_bytes(text: str) -> int:
    """``"16GiB"``, ``"80GB"``, ``"1.5TiB"``, ``"512"`` -> bytes (units case-insensitive).

    Example:
        >>> parse_bytes("16GiB"), parse_bytes("80GB"), parse_bytes("1.5 TiB"), parse_bytes("100")
        (17179869184, 80000000000, 1649267441664, 100)

    Raises:
      ConfigError: not a positive number with a known unit; the message names the value and the valid forms.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ConfigError(f"device memory {text!r} is not understood; valid: {BYTE_FORMS}")
    return int(round(float(m.group(1)) * _UNITS[unit]))


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4, "tensor": 1}`` (axes not named have size 1).

    Example:
        >>> parse_mesh("fsdp=8")
        {'data': 1, 'fsdp': 8, 'tensor': 1}

    Raises:
      ConfigError: an unknown or repeated axis, a size that is not a positive integer, or a malformed entry;
        the message names the entry and the valid axes.
    """
    sizes = dict.fromkeys(sharding_lib.MESH_AXES, 1)
    seen: set[str] = set()
    valid = f"valid: comma-separated AXIS=SIZE with AXIS one of {', '.join(sharding_lib.MESH_AXES)} and SIZE >= 1"
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise ConfigError(f"mesh {text!r} is empty; {valid}")
    for part in parts:
        axis, eq, size = (s.strip() for s in part.partition("="))
        if not eq or axis not in sizes:
            raise ConfigError(f"mesh {text!r}: entry {part!r} does not name a mesh axis; {valid}")
        if axis in seen:
            raise ConfigError(f"mesh {text!r}: axis {axis!r} given twice; {valid}")
        if not re.fullmatch(r"[0-9]+", size) or int(size) < 1:
            raise ConfigError(f"mesh {text!r}: size {size!r} of axis {axis!r} is not a positive integer; {valid}")
        seen.add(axis)
        sizes[axis] = int(size)
    return sizes


def format_bytes(n: float) -> str:
    """Bytes in binary units, three significant digits.

    Example:
        >>> format_bytes(512), format_bytes(3 * 2**30 // 2)
        ('512 B', '1.50 GiB')
    """
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def sharded_bytes(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of ``tree`` (arrays or ``ShapeDtypeStruct``) laid out by ``shardings``
    (a matching tree of ``jax.sharding.Sharding``): each leaf's shard shape times its item size.

    Example:
        >>> import jax.numpy as jnp
        >>> from vlpeft_jax.train import sharding
        >>> x = {"w": jnp.zeros((4, 8))}
        >>> sharded_bytes(x, sharding.tree_shardings(x, sharding.make_mesh()))
        128
    """
    leaves = jax.tree.leaves(tree)
    shards = jax.tree.leaves(shardings)
    if len(leaves) != len(shards):
        raise ValueError(f"sharded_bytes: {len(leaves)} leaves but {len(shards)} shardings")
    return sum(math.prod(sh.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize
               for x, sh in zip(leaves, shards, strict=True))


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device memory of one stage's train step on a mesh (bytes; see the module docstring).

    Attributes:
      mesh: axis name -> size.
      stage: the stage planned.
      trainable_bytes, frozen_bytes: the sharded parameters one device holds (their sum: ``params_bytes``).
      opt_state_bytes: the sharded optimizer state one device holds.
      other_state_bytes: the rest of the train state (step counter, rng).
      batch_bytes: one device's shard of the batch.
      argument_bytes, output_bytes, alias_bytes, temp_bytes, code_bytes: the compiled executable's
        ``memory_analysis()`` (arguments = state + batch; outputs = new state + metrics; alias = outputs
        written into donated arguments; temp = gradients, saved activations and other temporaries).
      compile_seconds: host time of ``lower(...).compile()``.
      platform: the platform compiled for (``cpu`` for simulated devices).
      device_memory: the budget compared against, or None.
    """

    mesh: dict[str, int]
    stage: str
    trainable_bytes: int
    frozen_bytes: int
    opt_state_bytes: int
    other_state_bytes: int
    batch_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    compile_seconds: float
    platform: str
    device_memory: int | None = None

    @property
    def num_devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def params_bytes(self) -> int:
        return self.trainable_bytes + self.frozen_bytes

    @property
    def state_bytes(self) -> int:
        return self.params_bytes + self.opt_state_bytes + self.other_state_bytes

    @property
    def total_bytes(self) -> int:
        """Peak estimate: arguments + outputs - aliased outputs + temporaries (+ generated code)."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.total_bytes <= self.device_memory

    def to_dict(self) -> dict[str, Any]:
        """Every field plus the derived ``params_bytes``, ``state_bytes``, ``total_bytes``, ``num_devices``,
        ``fits``."""
        return {**dataclasses.asdict(self), "num_devices": self.num_devices, "params_bytes": self.params_bytes,
                "state_bytes": self.state_bytes, "total_bytes": self.total_bytes, "fits": self.fits}


def _stat(stats: Any, name: str) -> int:
    return int(getattr(stats, name, 0) or 0) if stats is not None else 0


def plan_memory(params: Any, param_specs: Any, plan: StagePlan, loss_fn: LossFn, batch: Any, mesh: Mesh, *,
                rules: Sequence[tuple[str, Any]] = sharding_lib.DEFAULT_RULES, accumulation_steps: int = 1,
                device_memory: int | None = None) -> MemoryPlan:
    """Compiles ``plan``'s train step for ``mesh`` on abstract shapes and measures its per-device memory.

    Args:
      params: the full parameter tree (``{"base": ..., "peft": ...}``), arrays or ``ShapeDtypeStruct``.
      param_specs: logical ``PartitionSpec`` per leaf of ``params`` (see
        :func:`vlpeft_jax.train.sharding.logical_specs`), or None (everything replicated).
      plan: the stage (from :func:`vlpeft_jax.train.stages.plan_stages`).
      loss_fn: ``(params, batch, rng) -> (loss, metrics)``.
      batch: the global batch (``ShapeDtypeStruct`` or arrays); sharded over ``("data", "fsdp")``.
      mesh: from :func:`vlpeft_jax.train.sharding.make_mesh`.
      rules: logical -> mesh axis rules.
      accumulation_steps: micro-batches per step (as in training).
      device_memory: bytes per device to compare against (``MemoryPlan.fits``), or None.

    Raises:
      ConfigError: the batch's leading dimension is not divisible by the mesh's ``data * fsdp``.
    """
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    for path, x in jax.tree_util.tree_leaves_with_path(batch):
        if np.ndim(x) and x.shape[0] % n:
            raise ConfigError(f"batch array {jax.tree_util.keystr(path)} has leading dimension {x.shape[0]}, not "
                              f"divisible by the mesh's data x fsdp = {n}; give a batch that is a multiple of {n}")
    param_shardings = sharding_lib.tree_shardings(params, mesh, param_specs, rules)
    state_sh = stage_state_shardings(params, plan, mesh, param_shardings)
    state = abstract_stage_state(params, plan, mesh, param_shardings)
    batch_sh = sharding_lib.batch_shardings(batch, mesh)
    abstract_batch = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), batch, batch_sh)
    step = jit_train_step(make_train_step(loss_fn, plan.optimizer.tx, accumulation_steps=accumulation_steps),
                          state_sharding=state_sh, batch_sharding=batch_sh)
    start = time.perf_counter()
    compiled = step.lower(state, abstract_batch).compile()
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()

    def part_bytes(tree: Any, shardings: Any) -> int:
        return sharded_bytes(tree, shardings) if jax.tree.leaves(tree) else 0

    return MemoryPlan(
        mesh={k: int(v) for k, v in mesh.shape.items()}, stage=plan.stage.name,
        trainable_bytes=part_bytes(state.trainable, state_sh.trainable),
        frozen_bytes=part_bytes(state.frozen, state_sh.frozen),
        opt_state_bytes=part_bytes(state.opt_state, state_sh.opt_state),
        other_state_bytes=part_bytes((state.step, state.rng), (state_sh.step, state_sh.rng)),
        batch_bytes=part_bytes(abstract_batch, batch_sh),
        argument_bytes=_stat(stats, "argument_size_in_bytes"), output_bytes=_stat(stats, "output_size_in_bytes"),
        alias_bytes=_stat(stats, "alias_size_in_bytes"), temp_bytes=_stat(stats, "temp_size_in_bytes"),
        code_bytes=_stat(stats, "generated_code_size_in_bytes"), compile_seconds=seconds,
        platform=mesh.devices.flat[0].platform, device_memory=device_memory)


def table(plan: MemoryPlan) -> str:
    """A Markdown table of ``plan`` (per device), then the verdict line.

    Example:
        >>> mp = MemoryPlan({"data": 1, "fsdp": 2, "tensor": 1}, "s", 8, 0, 16, 4, 4, 32, 28, 28, 100, 0, 0.5,
        ...                 "cpu", 2**20)
        >>> print(table(mp).splitlines()[-1])
        FITS: 132 B per device (peak estimate) <= 1.00 MiB device memory
    """
    rows = [
        ("parameters (trainable)", plan.trainable_bytes),
        ("parameters (frozen)", plan.frozen_bytes),
        ("parameters (all)", plan.params_bytes),
        ("optimizer state", plan.opt_state_bytes),
        ("step + rng", plan.other_state_bytes),
        ("batch shard", plan.batch_bytes),
        ("gradients + temporaries (temp)", plan.temp_bytes),
        ("arguments (state + batch)", plan.argument_bytes),
        ("outputs (new state + metrics)", plan.output_bytes),
        ("outputs aliased to donated arguments", plan.alias_bytes),
        ("generated code", plan.code_bytes),
        ("total (peak estimate)", plan.total_bytes),
    ]
    lines = ["| per device | bytes | |", "|---|---:|---:|"]
    lines += [f"| {name} | {value:,} | {format_bytes(value)} |" for name, value in rows]
    if plan.device_memory is None:
        verdict = f"total {format_bytes(plan.total_bytes)} per device (no --device-memory given)"
    elif plan.fits:
        verdict = (f"FITS: {format_bytes(plan.total_bytes)} per device (peak estimate) <= "
                   f"{format_bytes(plan.device_memory)} device memory")
    else:
        verdict = (f"DOES NOT FIT: {format_bytes(plan.total_bytes)} per device (peak estimate) > "
                   f"{format_bytes(plan.device_memory)} device memory")
    return "\n".join([*lines, "", verdict])


def mesh_string(mesh: Mapping[str, int]) -> str:
    """``data=2,fsdp=4,tensor=1``.

    Example:
        >>> mesh_string({"data": 2, "fsdp": 4, "tensor": 1})
        'data=2,fsdp=4,tensor=1'
    """
    return ",".join(f"{k}={v}" for k, v in mesh.items())
