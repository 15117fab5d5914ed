"""``run.py bench mtl``: what multi-task gradient manipulation costs over Joint Train's plain train step.

One model, one batch, one process: the shapes-world multi-task classifier of ``configs/shapes_mtl.py`` (a
4-layer ViT of width 96 shared by four task heads, ``count``, ``dominant_color``, ``position`` and the patch-level
``patch_shape``; random initial weights; batch 32 of the training split; float32; Adam 1e-3). Three measurements
(thesis ``004_21d0d480fe4006f4.txt`` ch. 6; spec ``../shared/specs/sparse_mtl.md`` §2.0, §2.8):

1. **Train steps**: the full jitted multi-task step (:func:`vlpeft_jax.mtl.step.make_mtl_train_step`, state
   donated: one forward pass, the ``[T, P]`` Jacobian of the task losses, the method's combination, Adam) of each
   GM method (``--methods``: ``ls`` = Joint Train through the Jacobian and the mean, ``pcgrad``, ``cagrad``,
   ``graddrop``, ``mgda``, ``imtlg``, ``nashmtl``, ``famo``; the FAMO codebase's clipping preset, as
   ``configs/shapes_mtl.py``), each divided by **plain**: :func:`vlpeft_jax.train.step.make_train_step` on the
   summed task loss (one backward pass, what a user pays without any manipulation). With ``--sparse on`` (or
   ``both``, the default) each step also runs with sparse training: the PSN mask (per-neuron top-``k`` ``|w|``,
   :func:`vlpeft_jax.mtl.psn.psn_mask`, ``k`` from :func:`~vlpeft_jax.mtl.psn.k_for_fraction` for 30% of all
   parameters trainable, thesis Sec. 6.4.4), ``mask_mode="pre"``, Adam masked (:func:`~vlpeft_jax.mtl.transform.
   sparse_chain`); the plain step then has a sparse twin (``plain+st``: the summed loss, Adam masked by
   :func:`vlpeft_jax.peft.gps.masked`), and each sparse step is divided by both plain steps.
2. **Per-task-gradient strategies** (:func:`vlpeft_jax.mtl.gradients.per_task_grads`: ``vjp``, ``jacrev``,
   ``loop``) on the same task-loss function over the same trainable leaves: time per jitted call (returning the
   losses and the Jacobian), divided by ``vjp``'s.
3. **Memory**: XLA's own accounting of each compiled program (``compiled.memory_analysis()``: peak = argument +
   output - donated aliases + temporaries, and the temporaries alone), divided by the plain step's; None where
   the backend gives no analysis. The same measure on CPU, GPU and TPU, and deterministic.

Timing: all programs are compiled first, then run round-robin (:func:`vlpeft_jax.benchmarks.sparse.
time_round_robin`: one call of each per round, ``--steps`` rounds after ``--warmup``), so load changes on a
shared machine hit every variant alike. Reported: the median time and its interquartile range, the median of
the per-round ratios ``variant / plain`` of the same round (the headline ratio) with its interquartile range,
and the ratio of the medians. The load average (``os.getloadavg``) is printed before and after; a warning says
when it exceeds the cores, as the ratios are then noisier.

Cost: compilation dominates (21 programs by default; XLA compiles ``usable_cores()`` of them at a time). The default
run took 5.7-6.7 min wall (about 4.5 min of CPU time) on a 2-core machine at load average 8; expect roughly
half on an idle one.

Example (not run by the doctests: it compiles seven programs, about 50 s on a loaded 2-core machine at
``--tiny``; tests/benchmarks/test_bench_mtl.py runs it):
    >>> out = run(["--tiny", "--steps", "2", "--methods", "ls", "--sparse", "off"])  # doctest: +SKIP
    >>> out["ratios"]["steps"]["ls"]["time"] > 0  # doctest: +SKIP
    True
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import importlib.metadata as md
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlpeft_jax import tasks
from vlpeft_jax.benchmarks import timing
from vlpeft_jax.benchmarks.sparse import Setup, mb, time_round_robin
from vlpeft_jax.benchmarks.timing import load_average, paired_ratio, time_summary, usable_cores
from vlpeft_jax.benchmarks.train import device_name, fmt_or_na, parse_methods, safe_ratio
from vlpeft_jax.config import load_config_file
from vlpeft_jax.errors import ConfigError
from vlpeft_jax.experiments.runner import init_base
from vlpeft_jax.models import registry as model_registry
from vlpeft_jax.mtl import psn
from vlpeft_jax.mtl import registry as mtl_registry
from vlpeft_jax.mtl.gradients import STRATEGIES, per_task_grads
from vlpeft_jax.mtl.step import make_mtl_train_step
from vlpeft_jax.mtl.transform import gradient_manipulation, sparse_chain
from vlpeft_jax.peft import gps
from vlpeft_jax.train import labels as labels_lib
from vlpeft_jax.train.state import TrainState
from vlpeft_jax.train.step import jit_train_step, make_train_step

CONFIG = "configs/shapes_mtl.py"
METHODS = ("ls", "pcgrad", "cagrad", "graddrop", "mgda", "imtlg", "nashmtl", "famo")  # the thesis' Table 6.1 set
SPARSE_FRACTION = 0.3  # PSN: 30% of all parameters trainable (thesis Sec. 6.4.4, pretrained-tower budget)
LEARNING_RATE = 1e-3  # configs/shapes_mtl.py's Adam
TINY_VISION = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
TINY_DATA = dict(num_train=8, num_val=2, num_test=2, num_ood=2)
TINY_BATCH = 4
MEMORY_NOTE = ("peak: compiled.memory_analysis() argument + output - alias (donated) + temp bytes of the program; "
               "temp: its temporaries alone (activations, the per-task Jacobian, the method's work)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run.py bench mtl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="timed rounds (one call of every program per round)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds after compilation")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"training batch (default: the config's, 32; --tiny: {TINY_BATCH})")
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   help=f"GM methods (space or comma separated); default {', '.join(METHODS)}; any of "
                        f"{', '.join(mtl_registry.names())}")
    p.add_argument("--sparse", choices=("both", "off", "on"), default="both",
                   help="the train steps without (off), with (on) or both without and with PSN sparse training")
    p.add_argument("--fraction", type=float, default=SPARSE_FRACTION,
                   help="PSN trainable fraction of all parameters (k from mtl.psn.k_for_fraction)")
    p.add_argument("--no-strategies", action="store_true", help="skip the vjp/jacrev/loop comparison")
    p.add_argument("--tiny", action="store_true",
                   help="a 1-layer width-32 tower, batch 4, a tiny shapes world in a temporary folder (tests)")
    return p


def _check(args: argparse.Namespace) -> None:
    for option, value, low in (("steps", args.steps, 1), ("warmup", args.warmup, 0)):
        if value < low:
            raise ConfigError(f"bench mtl --{option}={value}; must be >= {low}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"bench mtl --batch-size={args.batch_size}; must be >= 1")
    if not 0.0 < args.fraction <= 1.0:
        raise ConfigError(f"bench mtl --fraction={args.fraction}; must be in (0, 1]")


# --------------------------------------------------------------------------------------------------
# The model, the batch, the loss functions


@contextlib.contextmanager
def _world_dir(tiny: bool) -> Iterator[str | None]:
    """A temporary cache folder for the tiny world (None: the config's own cache, as training uses)."""
    if not tiny:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="vlpeft_bench_mtl_") as d:
        yield d


def _build_problem(tiny: bool, batch_size: int | None, cache_dir: str | None = None) -> dict[str, Any]:
    """The task, the classifier, its random base parameters and one training batch (``configs/shapes_mtl.py``'s
    ``ls`` variant; ``tiny`` shrinks the tower, the world and the batch)."""
    cfg = load_config_file(CONFIG, "ls")
    if tiny:
        cfg.model.vision.update(TINY_VISION)
        cfg.data.update(TINY_DATA)
        cfg.train.batch_size = TINY_BATCH
    if cache_dir is not None:
        cfg.data.cache_dir = cache_dir
    if batch_size is not None:
        cfg.train.batch_size = batch_size
    task = tasks.build(cfg)
    module, inputs = model_registry.build_model(task.model_config())
    base = init_base(module, inputs, 0)
    raw = task.train_batches(0).batch(0)
    batch = {"pixel_values": jnp.asarray(raw["pixel_values"]), "labels": jax.tree.map(jnp.asarray, raw["labels"])}
    return {"cfg": cfg, "task": task, "module": module, "base": base, "batch": batch, "heads": list(task.groups)}


def _memory(compiled: Any) -> dict[str, int | None]:
    mem = compiled.memory_analysis()
    if mem is None:
        return {"peak_bytes": None, "temp_bytes": None, "argument_bytes": None, "output_bytes": None,
                "alias_bytes": None}
    return {"peak_bytes": int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                              + mem.temp_size_in_bytes),
            "temp_bytes": int(mem.temp_size_in_bytes), "argument_bytes": int(mem.argument_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes), "alias_bytes": int(mem.alias_size_in_bytes)}


@dataclasses.dataclass
class _Pending:
    """A traced (lowered) program waiting for XLA's compilation, with its first argument and its record."""

    name: str
    lowered: Any
    state: Any
    record: dict[str, Any]


def _lower(name: str, jitted: Any, state: Any, batch: Any, **record: Any) -> _Pending:
    t0 = time.perf_counter()
    lowered = jitted.lower(state, batch)
    return _Pending(name, lowered, state, {"name": name, "lower_s": time.perf_counter() - t0, **record})


def _compile_all(pending: Sequence[_Pending], workers: int) -> list[Setup]:
    """Compiles the programs, ``workers`` at a time (XLA compiles outside the GIL, so a second core halves the
    wait), into :class:`~vlpeft_jax.benchmarks.sparse.Setup` s with XLA's memory analysis in their records.
    ``compile_s`` of each is its own wall time, longer when compilations overlap."""

    def one(p: _Pending) -> Setup:
        t0 = time.perf_counter()
        compiled = p.lowered.compile()
        return Setup(p.name, compiled, p.state, {**p.record, "compile_s": time.perf_counter() - t0,
                                                 **_memory(compiled)})

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, pending))


def _step_setup(name: str, step_fn: Callable[..., Any], params: Any, labels: Any, tx: optax.GradientTransformation,
                batch: Any, **record: Any) -> _Pending:
    """A train step jitted with the state donated (:func:`~vlpeft_jax.train.step.jit_train_step`), lowered,
    with its initial state."""
    state = jax.jit(lambda p: TrainState.create(p, labels, tx, jax.random.PRNGKey(0)))(params)
    return _lower(name, jit_train_step(step_fn), state, batch, **record)


def _strategy_setup(strategy: str, losses_of: Callable[[Any, Any], tuple[jax.Array, Any]], trainable: Any,
                    batch: Any) -> _Pending:
    """One jitted :func:`per_task_grads` call (``(trainable, batch) -> (trainable, {loss, jacobian})``, nothing
    donated, so the parameters are reused every call), lowered, in the form :func:`time_round_robin` runs."""

    def call(t: Any, b: Any) -> tuple[Any, dict[str, Any]]:
        losses, _, jac = per_task_grads(lambda p: losses_of(p, b), t, strategy=strategy)
        return t, {"loss": losses.sum(), "jacobian": jac}

    return _lower(strategy, jax.jit(call), trainable, batch, strategy=strategy)


# --------------------------------------------------------------------------------------------------
# Ratios


def compare(record: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """``record`` over ``reference``: ``time`` = the median of the per-round ratios (same round, so the same
    load), its quartiles, ``time_of_medians``, and the XLA ``peak_bytes`` / ``temp_bytes`` ratios (None when
    either is unknown).

    Example (two rounds; round ratios 2 and 4):
        >>> a = {"times_s": [2.0, 8.0], "median_s": 5.0, "peak_bytes": 30, "temp_bytes": None}
        >>> b = {"times_s": [1.0, 2.0], "median_s": 1.5, "peak_bytes": 10, "temp_bytes": 5}
        >>> r = compare(a, b)
        >>> r["time"], r["time_q1"], r["time_q3"], r["peak_bytes"], r["temp_bytes"]
        (3.0, 2.5, 3.5, 3.0, None)
    """
    pr = paired_ratio(record["times_s"], reference["times_s"])
    return {"time": pr["median"], "time_q1": pr["q1"], "time_q3": pr["q3"],
            "time_of_medians": safe_ratio(record["median_s"], reference["median_s"]),
            "peak_bytes": safe_ratio(record["peak_bytes"], reference["peak_bytes"]),
            "temp_bytes": safe_ratio(record["temp_bytes"], reference["temp_bytes"])}


def _finish(setups: list[Setup]) -> dict[str, dict[str, Any]]:
    out = {}
    for s in setups:
        r = {k: v for k, v in s.record.items() if k not in ("step_s", "step_median_s")}  # the min, the median
        out[s.name] = {**r, **time_summary(s.times)}
    return out


def _warn_if_busy(load: Sequence[float], when: str) -> str | None:
    if load[0] > usable_cores():
        msg = (f"warning: load average {load[0]:.2f} {when} on {usable_cores()} cores: other processes compete for the "
               f"CPUs, so times are inflated and ratios noisier (the round-robin pairing limits the bias)")
        print(msg)
        return msg
    return None


def _versions() -> dict[str, str | None]:
    out = {}
    for pkg in ("jax", "jaxlib", "optax", "flax"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


# --------------------------------------------------------------------------------------------------


def run(argv: list[str]) -> dict[str, Any]:
    """Runs the benchmark; prints the tables; returns the measurements and the ratios (module docstring)."""
    args = _parser().parse_args(argv)
    _check(args)
    names = parse_methods(args.methods, mtl_registry.names(), "bench mtl")
    load_before = load_average()
    warnings = [w for w in [_warn_if_busy(load_before, "before")] if w]

    with _world_dir(args.tiny) as cache_dir:
        prob = _build_problem(args.tiny, args.batch_size, cache_dir)
    task, module, base, batch, heads = prob["task"], prob["module"], prob["base"], prob["batch"], prob["heads"]
    num_tasks = len(heads)
    skipped = [n for n in names if mtl_registry.get(n).min_tasks > num_tasks]  # more tasks than the model has
    names = [n for n in names if n not in skipped]
    params = {"base": base, "peft": {}}
    labels = labels_lib.make_labels(params, [("base/.*", "all")])
    total = int(sum(np.size(x) for x in jax.tree.leaves(base)))
    vision = prob["cfg"].model.vision
    batch_size = int(batch["pixel_values"].shape[0])
    print(f"bench mtl: {CONFIG} classifier (ViT {vision.num_hidden_layers} layers, width {vision.hidden_size}, "
          f"{total:,} parameters, random init), {num_tasks} tasks ({', '.join(heads)}), batch {batch_size}, float32, "
          f"Adam; {args.steps} timed rounds after {args.warmup} warm-up; JAX on {device_name()}, XLA's default "
          f"thread pool ({usable_cores()} of {os.cpu_count()} cores usable, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r});"
          f" load average {', '.join(f'{x:.2f}' for x in load_before)}")
    if skipped:
        print(f"needs more tasks than the model has (skipped): {', '.join(skipped)}")

    sparse_modes = {"both": (False, True), "off": (False,), "on": (True,)}[args.sparse]
    task_losses = task.task_losses_fn(module, [], {})
    summed = task.loss_fn(module, [], {})  # the sum of the heads' losses: Joint Train's single backward pass
    adam = optax.adam(LEARNING_RATE)
    sparse_info: dict[str, Any] | None = None
    mask = None
    if True in sparse_modes:
        k = psn.k_for_fraction(base, args.fraction)
        mask = {"base": psn.psn_mask(base, k)}
        sparse_info = {"k": k, "target_fraction": args.fraction,
                       "trainable_fraction": psn.trainable_fraction(base, mask["base"]), "mask_mode": "pre"}
        print(f"sparse training: PSN k={k} trains {100 * sparse_info['trainable_fraction']:.2f}% of all parameters "
              f"(target {100 * args.fraction:.0f}%), mask_mode pre")

    t0 = time.perf_counter()
    setups = [_step_setup("plain", make_train_step(summed, adam), params, labels, adam, batch, method="plain",
                         sparse=False)]
    if True in sparse_modes:
        tx = gps.masked(adam, mask)
        setups.append(_step_setup("plain+st", make_train_step(summed, tx), params, labels, tx, batch,
                                 method="plain", sparse=True))
    for name in names:
        for sparse in sparse_modes:
            gm = gradient_manipulation(name, num_tasks=num_tasks, clip="famo_codebase",
                                       mask=mask if sparse else None, mask_mode="pre")
            tx = sparse_chain(gm, adam, mask if sparse else None)
            step = make_mtl_train_step(task_losses, tx, method=name)
            setups.append(_step_setup(name + ("+st" if sparse else ""), step, params, labels, tx, batch,
                                     method=name, sparse=sparse))
    strategy_setups = []
    if not args.no_strategies:
        trainable, frozen = labels_lib.split(params, labels)
        rng = jax.random.PRNGKey(0)

        def losses_of(t: Any, b: Any) -> tuple[jax.Array, Any]:
            return task_losses(labels_lib.merge(t, frozen), b, rng)

        strategy_setups = [_strategy_setup(s, losses_of, trainable, batch) for s in STRATEGIES]
    compiled = _compile_all(setups + strategy_setups, usable_cores())
    setups, strategy_setups = compiled[:len(setups)], compiled[len(setups):]
    compile_s = time.perf_counter() - t0
    print(f"traced and compiled {len(compiled)} programs in {compile_s:.0f} s ({usable_cores()} at a time)", flush=True)

    time_round_robin(setups + strategy_setups, batch, args.steps, args.warmup)
    load_after = load_average()
    warnings += [w for w in [_warn_if_busy(load_after, "after")] if w]
    steps = _finish(setups)
    strategies = _finish(strategy_setups)
    del setups, strategy_setups

    plain = steps["plain"]
    step_ratios = {}
    for name, r in steps.items():
        step_ratios[name] = {**compare(r, plain), "method": r["method"], "sparse": r["sparse"]}
        if r["sparse"]:
            step_ratios[name]["vs_plain_st"] = compare(r, steps["plain+st"])
    strategy_ratios = {s: {"vs_vjp": compare(r, strategies["vjp"]), "vs_plain": compare(r, plain)}
                       for s, r in strategies.items()}

    print()
    print("Train steps (ratio = the median over rounds of variant / plain in the same round; IQR in brackets):")
    sparse_cols = True in sparse_modes
    print("| step | sparse | ms (median) | / plain | [IQR] | / plain (medians) |"
          + (" / plain+st |" if sparse_cols else "")
          + " peak MiB | peak / plain | temp MiB | temp / plain | compile s |")
    print("|---|---|---:|---:|---|---:|" + ("---:|" if sparse_cols else "") + "---:|---:|---:|---:|---:|")
    for name, r in steps.items():
        q = step_ratios[name]
        st = q.get("vs_plain_st", {}).get("time")
        print(f"| {name} | {'PSN' if r['sparse'] else 'dense'} | {1000 * r['median_s']:.1f} | {q['time']:.2f} | "
              f"[{q['time_q1']:.2f}, {q['time_q3']:.2f}] | {fmt_or_na(q['time_of_medians'])} |"
              + (f" {fmt_or_na(st)} |" if sparse_cols else "")
              + f" {mb(r['peak_bytes'])} | {fmt_or_na(q['peak_bytes'])} | {mb(r['temp_bytes'])} | "
              f"{fmt_or_na(q['temp_bytes'])} | {r['compile_s']:.0f} |")
    if strategies:
        print()
        print("Per-task gradients (one jitted per_task_grads call: losses + Jacobian):")
        print("| strategy | ms (median) | / vjp | [IQR] | / plain step | peak MiB | peak / vjp | temp MiB | "
              "temp / vjp | temp / plain step |")
        print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
        for s, r in strategies.items():
            v, p = strategy_ratios[s]["vs_vjp"], strategy_ratios[s]["vs_plain"]
            print(f"| {s} | {1000 * r['median_s']:.1f} | {v['time']:.2f} | [{v['time_q1']:.2f}, {v['time_q3']:.2f}] "
                  f"| {p['time']:.2f} | {mb(r['peak_bytes'])} | {fmt_or_na(v['peak_bytes'])} | {mb(r['temp_bytes'])} | "
                  f"{fmt_or_na(v['temp_bytes'])} | {fmt_or_na(p['temp_bytes'])} |")
    print()
    print(f"Memory: {MEMORY_NOTE}.")
    print(f"load average before {', '.join(f'{x:.2f}' for x in load_before)}, after "
          f"{', '.join(f'{x:.2f}' for x in load_after)} (1, 5, 15 min; {os.cpu_count()} cores, "
          f"{usable_cores()} usable)")
    return {
        "settings": {"config": CONFIG, "steps": args.steps, "warmup": args.warmup, "batch_size": batch_size,
                     "methods": names, "sparse": args.sparse, "tiny": args.tiny, "strategies": not args.no_strategies,
                     "learning_rate": LEARNING_RATE, "optimizer": "adam", "clip": "famo_codebase", "dtype": "float32"},
        "model": {"parameters": total, "tasks": heads, "vision": vision.to_dict()},
        "sparse_training": sparse_info,
        "environment": {"backend": jax.default_backend(), "device": device_name(), "cpu_count": os.cpu_count(),
                        "cores_usable": usable_cores(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
                        "versions": _versions(), "load_average_before": list(load_before),
                        "load_average_after": list(load_after), "warnings": warnings,
                        "threads": timing.thread_settings()},
        "compile_s": compile_s,
        "skipped": skipped,
        "results": {"steps": steps, "strategies": strategies},
        "ratios": {"steps": step_ratios, "strategies": strategy_ratios},
        "memory_note": MEMORY_NOTE,
    }
