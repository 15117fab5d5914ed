"""``run.py plan --config X --mesh data=D,fsdp=F,tensor=T [--device-memory 16GiB] [--batch B --seq S]``.

Compiles one stage's train step ahead of time on abstract shapes (nothing is allocated) for a mesh and prints
what one device holds: parameters, optimizer state, gradients and temporaries, arguments and outputs, a peak
estimate, and whether it fits in ``--device-memory`` (see :mod:`vlpeft_jax.train.memory`).

The mesh needs ``D * F * T`` devices. When this process has fewer, the command runs itself again in a
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=N JAX_PLATFORMS=cpu``: the devices are
simulated CPU devices and the numbers are the CPU compiler's (sharding is exact; temporaries are an
estimate of what a GPU/TPU compile would need).

Parameters are sharded by their logical axis names (``train.sharding.DEFAULT_RULES``: ``embed`` over fsdp,
``mlp``/``heads``/``vocab`` over tensor); PEFT parameters follow a method's ``logical_specs`` where it has
one (NeuroAda, LoRA) and are replicated otherwise. The loss is next-token cross-entropy over
``[batch, seq]`` int32 tokens for a config without a task (a language model, e.g.
``configs/llama_plan.py``); ``--batch`` is the global batch, sharded over ``(data, fsdp)``, by default one
sequence per batch shard (``data * fsdp``), and ``--seq`` defaults to 512. A config with a task is planned
with the task's loss when the task can describe its batch on abstract shapes (``abstract_batch(batch, seq)``).
The first stage is planned unless ``--stage NAME`` picks another.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec

from vlpeft_jax.cli.config import split_config_args
from vlpeft_jax.errors import ConfigError, VLPeftError
from vlpeft_jax.experiments import runner
from vlpeft_jax.models import layers
from vlpeft_jax.train import memory, sharding
from vlpeft_jax.train import stages as stages_lib

CHILD_ENV = "VLPEFT_PLAN_SIMULATED_DEVICES"
DEFAULT_SEQ = 512


def param_specs(setup: runner.Setup, params: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Logical ``PartitionSpec`` s for ``{"base", "peft"}`` and notes on what is replicated."""
    notes = []
    if setup.inputs:
        boxed = jax.eval_shape(setup.module.init, jax.random.key(0), **setup.inputs)["params"]
        base_specs = layers.logical_axes(boxed)
    else:  # a checkpoint's model (no init inputs): no logical names here
        base_specs = jax.tree.map(lambda _: PartitionSpec(), params["base"])
        notes.append("base parameters replicated (the model has no logical axis names here)")
    peft_specs = {}
    for name, p in params["peft"].items():
        method = setup.methods[name]
        if hasattr(method, "logical_specs"):
            peft_specs[name] = method.logical_specs(p, base_specs)
        else:
            peft_specs[name] = jax.tree.map(lambda _: PartitionSpec(), p)
            if jax.tree.leaves(p):
                notes.append(f"{name} parameters replicated ({type(method).__name__} declares no logical axes)")
    return {"base": base_specs, "peft": peft_specs}, notes


def lm_loss_fn(setup: runner.Setup, active: tuple[str, ...]) -> Any:
    """Next-token cross-entropy of the task-less language model over ``batch["input_ids"]``, methods active."""
    from vlpeft_jax.tasks.base import lm_loss

    methods = setup.active(active)

    def loss_fn(params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
        ids = batch["input_ids"]
        return lm_loss(setup.module, methods, params, {"input_ids": ids}, ids, rng, {})

    return loss_fn


def build_plan(cfg: ml_collections.ConfigDict, mesh_sizes: dict[str, int], *, stage: str | None = None,
               batch: int | None = None, seq: int = DEFAULT_SEQ, device_memory: int | None = None
               ) -> tuple[memory.MemoryPlan, dict[str, Any]]:
    """The memory plan of ``cfg``'s stage on a mesh of the first ``prod(mesh_sizes)`` devices, and details
    (batch shape, trainable count, notes)."""
    from vlpeft_jax.cli.params import abstract_setup

    if seq < 2:
        raise ConfigError(f"--seq {seq}: must be >= 2 (next-token prediction)")
    mesh = sharding.make_mesh(**mesh_sizes)
    shards = mesh_sizes["data"] * mesh_sizes["fsdp"]
    batch = shards if batch is None else batch
    if batch < 1 or batch % shards:
        raise ConfigError(f"--batch {batch}: the global batch must be a positive multiple of data x fsdp = {shards}")
    setup, params = abstract_setup(cfg)
    stage_list, wrappers = runner.plan_stages(setup, params["peft"])
    names = [s.name for s in stage_list]
    if stage is not None and stage not in names:
        raise ConfigError(f"--stage {stage!r}: no such stage; stages: {', '.join(names)}")
    plans = stages_lib.plan_stages(params, stage_list, wrappers)
    plan = plans[names.index(stage) if stage is not None else 0]
    if setup.task is None:
        loss_fn = lm_loss_fn(setup, plan.stage.methods)
        abstract_batch: Any = {"input_ids": jax.ShapeDtypeStruct((batch, seq), jnp.int32)}
    elif hasattr(setup.task, "abstract_batch"):
        loss_fn = setup.task.loss_fn(setup.module, setup.active(plan.stage.methods),
                                     dict(cfg.get("loss_weights") or {}))
        abstract_batch = setup.task.abstract_batch(batch, seq)
    else:
        raise ConfigError(f"task {cfg.task!r} ({type(setup.task).__name__}) cannot describe its batch on abstract "
                          "shapes (no abstract_batch); plan a config without a task (a language model, e.g. "
                          "configs/llama_plan.py)")
    specs, notes = param_specs(setup, params)
    accumulation = int(plan.stage.optimizer.accumulation_steps)
    out = memory.plan_memory(params, specs, plan, loss_fn, abstract_batch, mesh, accumulation_steps=accumulation,
                             device_memory=device_memory)
    counts = runner.parameter_counts(params, setup, [plan.stage])
    details = {"config": cfg.get("name", ""), "batch": [batch, seq] if setup.task is None else None,
               "base_parameters": counts["base_total"],
               "trainable_parameters": counts["stages"][plan.stage.name]["trainable"],
               "accumulation_steps": accumulation, "notes": notes}
    return out, details


def _simulate(argv: list[str], n: int) -> int:
    """Runs this command again in a subprocess with ``n`` simulated CPU devices; returns its exit status."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={n}"])
    env["JAX_PLATFORMS"] = "cpu"
    env[CHILD_ENV] = str(n)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.getcwd(), env.get("PYTHONPATH", "")) if p)
    sys.stdout.flush()
    return subprocess.run([sys.executable, "-m", "vlpeft_jax.cli.plan", *argv], env=env, check=False).returncode


def main(argv: list[str]) -> int:
    cfg, rest = split_config_args(argv, default="configs/llama_plan.py")
    parser = argparse.ArgumentParser(prog="run.py plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mesh", default="data=1", help="AXIS=SIZE,... over data, fsdp, tensor (default data=1)")
    parser.add_argument("--device-memory", default=None, help="per-device memory, e.g. 16GiB, 80GB, 1.5TiB")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: data x fsdp)")
    parser.add_argument("--seq", type=int, default=DEFAULT_SEQ, help=f"tokens per sequence (default {DEFAULT_SEQ})")
    parser.add_argument("--stage", default=None, help="the stage to plan (default: the first)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(rest)
    sizes = memory.parse_mesh(args.mesh)
    budget = memory.parse_bytes(args.device_memory) if args.device_memory is not None else None
    n = math.prod(sizes.values())
    if jax.device_count() < n:
        if os.environ.get(CHILD_ENV):
            raise ConfigError(f"mesh {args.mesh!r} needs {n} devices; only {jax.device_count()} available")
        print(f"simulating {n} CPU devices: running again with XLA_FLAGS=--xla_force_host_platform_device_count={n} "
              "JAX_PLATFORMS=cpu", file=sys.stderr if args.json else sys.stdout)
        return _simulate(argv, n)
    out, details = build_plan(cfg, sizes, stage=args.stage, batch=args.batch, seq=args.seq, device_memory=budget)
    if args.json:
        print(json.dumps({**out.to_dict(), **details}, indent=2))
        return 0
    simulated = os.environ.get(CHILD_ENV)
    where = f"{n} simulated CPU devices" if simulated else f"{n} {out.platform} device(s)"
    print(f"config {details['config']}   stage {out.stage}   mesh {memory.mesh_string(out.mesh)} ({where})")
    batch = f"batch {details['batch'][0]} x {details['batch'][1]} tokens (global)   " if details["batch"] else ""
    print(f"{batch}base parameters {details['base_parameters']:,}   "
          f"trainable {details['trainable_parameters']:,}")
    for note in details["notes"]:
        print(f"note: {note}")
    print(memory.table(out))
    print(f"compile time (host): {out.compile_seconds:.1f} s")
    return 0


if __name__ == "__main__":  # the simulated-devices subprocess
    try:
        sys.exit(main(sys.argv[1:]))
    except VLPeftError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
