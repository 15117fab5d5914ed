"""``run.py bench remat``: what per-layer rematerialisation costs in step time and saves in memory.

One GPT-2 with random weights (default: the ``bench train`` shapes, 6 layers, width 512, 8 heads, vocab 8192;
batch 8 x 128 tokens; float32; AdamW), built by :func:`vlpeft_jax.models.registry.build_model` once per ``remat``
policy (:data:`vlpeft_jax.models.layers.REMAT_POLICIES`: ``none``, ``full``, ``dots``, ``dots_no_batch``; the
parameter tree is the same for all, so every policy starts from the same weights). For each training method (full
fine-tuning and LoRA r=8 on ``c_attn``, as ``bench train`` defines them) and policy, the real train step
(:func:`~vlpeft_jax.train.step.make_train_step`, jitted with the state donated by
:func:`~vlpeft_jax.train.step.jit_train_step`) is compiled ahead of time, and the table gives:

- ``temp MiB``: ``compiled.memory_analysis().temp_size_in_bytes``, XLA's temporary buffers of one step: the
  activations kept for the backward pass and every other intermediate -- what remat trades for recomputation;
- ``XLA MiB``: argument + output - aliased + temporary bytes (adds parameters, optimizer state and batch);
- ``step ms``: the median (and interquartile range) of ``--repeats`` steps, the policies of one method timed
  round-robin (:func:`~vlpeft_jax.benchmarks.timing.alternate`, order reversed every round) after ``--warmup``
  steps, so a change of load hits every policy alike; ``x none`` is the median of the per-round ratios to the
  ``none`` policy;
- ``loss``: the loss before the first update, which must be the same for every policy (printed as a check).

Measured on the 2-core CPU this was written on (XLA:CPU, idle, default shapes): LoRA's temporary memory drops
from 333 to 285 MiB with any policy, ``full`` costing +16 % step time and ``dots``/``dots_no_batch`` about 0 %;
full fine-tuning's temporary memory does not change with the policy, although the recomputed products are in the
compiled program (``full`` costs +1-3 %); a plain ``jax.jit(jax.grad(loss))`` over every parameter behaves the same
on XLA:CPU, so it is XLA:CPU's scheduling of the recomputation, not the train step. Re-measure on an accelerator.

The load average before and after, the other processes' CPU share and the thread settings are printed and
returned (:class:`~vlpeft_jax.benchmarks.timing.Monitor`); times taken on a busy machine come with a warning.

Example (not run by the doctests: it compiles and times eight train steps; tests/benchmarks runs it):
    >>> out = run(["--layers", "1", "--width", "32", "--heads", "2", "--vocab", "64", "--batch", "2",
    ...            "--seq", "8", "--repeats", "2"])  # doctest: +SKIP
    >>> sorted(out["results"]["lora"])  # doctest: +SKIP
    ['dots', 'dots_no_batch', 'full', 'none']
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from vlpeft_jax.benchmarks import timing
from vlpeft_jax.benchmarks.train import OurStep, add_shape_arguments, check_shapes, parse_methods
from vlpeft_jax.errors import ConfigError
from vlpeft_jax.models import layers

METHODS = ("full", "lora")
POLICIES = tuple(layers.REMAT_POLICIES)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run.py bench remat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(p)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per policy (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per policy after compilation")
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   help=f"subset of {', '.join(METHODS)} (space or comma separated)")
    p.add_argument("--policies", nargs="+", default=list(POLICIES),
                   help=f"subset of {', '.join(POLICIES)} (space or comma separated; none is always included, "
                        "as the reference of the ratios)")
    return p


def policy_step(method_name: str, policy: str, shapes: dict[str, int], base: Any, total_steps: int) -> OurStep:
    """``bench train``'s compiled step of one method on the GPT-2 built with ``remat=policy`` (its own copy of
    ``base``, which the step donates)."""
    from vlpeft_jax.models.registry import build_model

    module, _ = build_model(model_config(shapes, policy))
    return OurStep(method_name, None, shapes, total_steps, model=(module, jax.tree.map(jnp.copy, base)))


def model_config(shapes: dict[str, int], policy: str) -> dict[str, Any]:
    """The registry config of the benchmarked GPT-2 with ``remat=policy``.

    Example:
        >>> model_config({"layers": 2, "width": 32, "heads": 2, "vocab": 64, "seq": 8}, "dots")["remat"]
        'dots'
    """
    return {"family": "gpt2", "vocab_size": shapes["vocab"], "max_position_embeddings": max(1024, shapes["seq"]),
            "hidden_size": shapes["width"], "num_hidden_layers": shapes["layers"],
            "num_attention_heads": shapes["heads"], "remat": policy}


def _mib(x: int | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:.1f}"


def measure_method(method_name: str, policies: Sequence[str], shapes: dict[str, int], base: Any, repeats: int,
                   warmup: int) -> dict[str, Any]:
    """Compiles every policy's step of one method, times them round-robin; the per-policy results."""
    steps = {p: policy_step(method_name, p, shapes, base, repeats + warmup) for p in policies}
    times, _ = timing.alternate({p: s.step for p, s in steps.items()}, rounds=repeats, warmup=warmup)
    out = {}
    for p, s in steps.items():
        out[p] = {**timing.time_summary(times[p]), "temp_bytes": s.xla_temp_bytes, "xla_bytes": s.xla_bytes,
                  "compile_s": s.compile_s, "trainable": s.trainable, "first_loss": s.losses[0],
                  "over_none": timing.paired_ratio(times[p], times["none"])}
    return out


def run(argv: list[str]) -> dict[str, Any]:
    """Parses ``argv`` (see the module docstring), measures, prints the table; returns the results."""
    args = _parser().parse_args(argv)
    shapes = {k: getattr(args, k) for k in ("layers", "width", "heads", "vocab", "batch", "seq")}
    check_shapes(shapes)
    for flag in ("repeats", "warmup"):
        if getattr(args, flag) < (1 if flag == "repeats" else 0):
            raise ConfigError(f"bench remat --{flag}={getattr(args, flag)}; must be >= "
                              f"{1 if flag == 'repeats' else 0}")
    methods = parse_methods(args.methods, METHODS, "bench remat")
    policies = parse_methods(args.policies, POLICIES, "bench remat")
    policies = ["none"] + [p for p in policies if p != "none"]
    from vlpeft_jax.models.registry import build_model

    module, _ = build_model(model_config(shapes, "none"))
    ids = jnp.zeros((1, 2), jnp.int32)
    base = layers.unbox(jax.jit(module.init)(jax.random.key(0), ids))["params"]
    monitor = timing.Monitor().start()
    results = {m: measure_method(m, policies, shapes, base, args.repeats, args.warmup) for m in methods}
    monitor.stop()
    print(f"bench remat: GPT-2 {shapes['layers']} layers, width {shapes['width']}, {shapes['heads']} heads, "
          f"vocab {shapes['vocab']}; batch {shapes['batch']} x {shapes['seq']}; float32; AdamW; "
          f"{args.repeats} timed steps per policy, round-robin; backend {jax.default_backend()}")
    header = (f"{'method':<7}{'remat':<15}{'temp MiB':>10}{'XLA MiB':>10}{'step ms':>10}{'IQR ms':>16}"
              f"{'x none':>8}{'compile s':>11}{'loss':>10}")
    print(header)
    for m, per_policy in results.items():
        for p, r in per_policy.items():
            iqr = f"{1e3 * r['q1_s']:.0f}-{1e3 * r['q3_s']:.0f}"
            print(f"{m:<7}{p:<15}{_mib(r['temp_bytes']):>10}{_mib(r['xla_bytes']):>10}{1e3 * r['median_s']:>10.1f}"
                  f"{iqr:>16}{r['over_none']['median']:>8.2f}{r['compile_s']:>11.1f}{r['first_loss']:>10.4f}")
    print(timing.describe(monitor))
    return {"settings": {**shapes, "repeats": args.repeats, "warmup": args.warmup, "methods": methods,
                         "policies": policies, "backend": jax.default_backend()},
            "environment": {"machine": monitor.record(), "threads": timing.thread_settings()},
            "results": results}
