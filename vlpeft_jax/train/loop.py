"""The training loop: stages, logging, checkpoints, resume, divergence stop, periodic evaluation.

:func:`train` drives a list of stages over a parameter tree ``{"base": ..., "peft": ...}`` with a task
given as a loss function (or a ``build_loss_fn(active_methods) -> loss_fn`` callback, so the caller
decides what the stage's methods mean). In the run directory it writes ``checkpoints/``,
``metrics.jsonl`` and ``tb/``; the caller writes the config snapshot and the report.

Resuming is exact: a checkpoint records the stage index and the number of updates done in it, the data
come from ``data_factory(stage_index, start_step)`` (which must yield the batches of that stage from
``start_step`` on, deterministically), and the step's random key is ``fold_in(seed key, global step)``.
So a run killed at any point and restarted with the same arguments ends with the same parameters as an
uninterrupted run.

A non-finite loss or gradient stops the run with :class:`TrainingDivergedError`; the diverged update is
not applied and the checkpoints written so far are kept.

Example:
    >>> import tempfile, numpy as np, jax.numpy as jnp
    >>> from vlpeft_jax.train import labels, optim
    >>> def loss_fn(params, batch, rng):
    ...     pred = batch["x"] @ params["base"]["head"]["kernel"]
    ...     return jnp.mean((pred - batch["y"]) ** 2), {}
    >>> params = {"base": {"head": {"kernel": jnp.zeros((2, 1))}}, "peft": {}}
    >>> def data(stage_index, start_step):
    ...     rng = np.random.default_rng(0)
    ...     for _ in range(start_step, 20):
    ...         x = rng.normal(size=(8, 2)).astype(np.float32)
    ...         yield {"x": x, "y": x @ np.array([[1.0], [-2.0]], np.float32)}
    >>> stage = Stage("head", steps=20, trainable=labels.head_rules(["base/head"]),
    ...               optimizer=optim.OptimizerConfig(optim.GroupOptimizer(learning_rate=0.1)))
    >>> result = train(params, [stage], data, tempfile.mkdtemp(), loss_fn=loss_fn, progress=False, verbose=False)
    >>> result.history[-1]["loss"] < result.history[0]["loss"]
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from vlpeft_jax.errors import ConfigError, InputError, VLPeftError
from vlpeft_jax.train import sharding as sharding_lib
from vlpeft_jax.train.checkpoint import Checkpointer
from vlpeft_jax.train.logging import MetricsLogger, ProgressBar, to_python
from vlpeft_jax.train.stages import (
    OptimizerWrapper,
    Stage,
    StagePlan,
    abstract_stage_state,
    init_stage_state,
    next_stage_state,
    plan_stages,
    stage_state_shardings,
)
from vlpeft_jax.train.state import TrainState
from vlpeft_jax.train.step import LossFn, jit_train_step, make_train_step

DataFactory = Callable[[int, int], Iterable[Any]]
"""``(stage_index, start_step) -> batches`` of that stage from update ``start_step`` on (deterministic)."""
EvalFn = Callable[[Any, int], Mapping[str, Any]]
"""``(params, global_step) -> metrics``, called every ``eval_every`` steps."""
StepFactory = Callable[..., Callable[[TrainState, Any], tuple[TrainState, dict[str, Any]]]]
"""``(loss_fn, tx, accumulation_steps=n) -> (state, batch) -> (state, metrics)`` (un-jitted)."""


class TrainingDivergedError(VLPeftError):
    """The loss or the gradient became NaN or infinite; the run stopped, its checkpoints are kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) stopped training after the current update; a checkpoint of that update was written, so
    the same command resumes the run. ``run.py`` exits with status 130."""


class _InterruptFlag:
    """While training, SIGINT only sets a flag that the loop reads after each update (a KeyboardInterrupt raised
    inside a JAX or orbax callback could be swallowed there, and training would run on). A second SIGINT
    interrupts at once. Only the main thread of the main interpreter can install it; elsewhere it is a no-op."""

    def __init__(self) -> None:
        self.set = False
        self._previous: Any = None

    def __enter__(self) -> _InterruptFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.set:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.set = True
        print("\ninterrupt: stopping after this update (checkpoint first); press Ctrl-C again to stop now",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
      state: the final train state (split by the last stage's labels).
      params: the final full parameter tree.
      history: one dict per update done in this call: ``step``, ``stage``, ``loss``, ``grad_norm``,
        ``lr/<group>``, ``examples_per_s`` and the loss function's metrics.
      evals: one dict per evaluation: ``step`` and the eval function's metrics.
      run_dir: the run directory.
      resumed_from: the global step restored from a checkpoint, or None for a fresh run.
      last_checkpoint: the newest checkpoint's step.
    """

    state: TrainState
    params: Any
    history: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    run_dir: Path
    resumed_from: int | None
    last_checkpoint: int | None


def _batch_size(batch: Any) -> int:
    leaves = [x for x in jax.tree.leaves(batch) if np.ndim(x) > 0]
    return int(np.shape(leaves[0])[0]) if leaves else 0


def _describe(plan: StagePlan) -> str:
    c = plan.counts
    groups = ", ".join(f"{k}={v:,}" for k, v in c.items() if k not in ("frozen", "total", "trainable"))
    methods = f", methods {list(plan.stage.methods)}" if plan.stage.methods else ""
    return (f"stage {plan.index} {plan.stage.name!r}: {plan.stage.steps} steps, trainable {c['trainable']:,} of "
            f"{c['total']:,} ({100 * c['trainable'] / max(c['total'], 1):.3f}%) [{groups}]{methods}")


@dataclasses.dataclass
class _Run:
    """The per-run machinery shared by the stages: checkpoints, evaluation, the metrics collected so far."""

    checkpointer: Checkpointer
    mesh: Mesh
    seed: int
    checkpoint_every: int
    eval_fn: EvalFn | None
    eval_every: int
    is_main: bool
    stage_summary: list[list[Any]]
    last_saved: int | None
    interrupt: _InterruptFlag | None = None
    step_factory: StepFactory = make_train_step
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    evals: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def stage(self, state: TrainState, plan: StagePlan, task: LossFn, data_factory: DataFactory, first_step: int,
              offset: int, state_shardings: TrainState, log: MetricsLogger | None, bar: ProgressBar) -> TrainState:
        """Runs updates ``first_step .. steps-1`` of stage ``plan``; returns the state after the stage."""
        stage = plan.stage
        raw_step = self.step_factory(task, plan.optimizer.tx, accumulation_steps=stage.optimizer.accumulation_steps)
        step_fn = None
        batches = iter(data_factory(plan.index, first_step))
        for k in range(first_step, stage.steps):
            try:
                host_batch = next(batches)
            except StopIteration:
                raise InputError(f"the data of stage {stage.name!r} ended after {k - first_step} batches (from step "
                                 f"{first_step}); the stage needs {stage.steps}") from None
            batch = sharding_lib.put_batch(host_batch, self.mesh)
            if step_fn is None:  # jitted once per stage, with the batch layout known
                step_fn = jit_train_step(raw_step, state_sharding=state_shardings,
                                         batch_sharding=sharding_lib.batch_shardings(batch, self.mesh))
            lrs = plan.optimizer.learning_rates(k)
            state, metrics = step_fn(state, batch)
            metrics = jax.device_get(metrics)
            global_step = offset + k + 1
            if not bool(metrics["finite"]):
                raise self._diverged(stage, k, global_step, metrics)
            record = {"stage": stage.name, **{name: to_python(v) for name, v in metrics.items() if name != "finite"},
                      **{f"lr/{g}": lr for g, lr in lrs.items()}}
            record["examples_per_s"] = bar.update(1, loss=float(metrics["loss"]), lr=next(iter(lrs.values())),
                                                  examples=_batch_size(batch))  # global rows (all processes)
            if self.is_main:
                log.write(global_step, record)
            self.history.append({"step": global_step, **record})
            stop = self.interrupt is not None and self.interrupt.set
            if (self.checkpoint_every and global_step % self.checkpoint_every == 0) or k + 1 == stage.steps or stop:
                self.checkpointer.save(global_step, state, {
                    "stage_index": plan.index, "stage_name": stage.name, "step_in_stage": k + 1,
                    "stages": self.stage_summary, "seed": self.seed})
                self.last_saved = global_step
            if self.eval_fn is not None and self.eval_every and global_step % self.eval_every == 0:
                results = {name: to_python(v) for name, v in self.eval_fn(state.params, global_step).items()}
                if self.is_main:
                    log.write(global_step, {f"eval/{name}": v for name, v in results.items()})
                self.evals.append({"step": global_step, **results})
            if stop:
                self.checkpointer.wait_until_finished()
                raise TrainingInterrupted(f"interrupted at global step {global_step} (stage {stage.name!r}, update "
                                          f"{k + 1}/{stage.steps}); checkpoint written, the same command resumes")
        return state

    def _diverged(self, stage: Stage, k: int, global_step: int, metrics: dict[str, Any]) -> TrainingDivergedError:
        self.checkpointer.wait_until_finished()
        last = self.checkpointer.latest_step()
        kept = (f"the last good checkpoint is step {last} in {self.checkpointer.directory} (restarting resumes "
                f"from it)" if last is not None else "no checkpoint was written yet")
        return TrainingDivergedError(
            f"training diverged at global step {global_step} (stage {stage.name!r}, update {k + 1}/{stage.steps}): "
            f"loss={float(metrics['loss'])}, grad_norm={float(metrics['grad_norm'])}; the update was not applied "
            f"and {kept}. Lower the learning rate, enable clipping, or check the data.")


def train(params: Any, stages: Sequence[Stage | Mapping[str, Any]], data_factory: DataFactory,
          run_dir: str | Path, *, loss_fn: LossFn | None = None,
          build_loss_fn: Callable[[tuple[str, ...]], LossFn] | None = None, seed: int = 0,
          checkpoint_every: int = 100, keep_checkpoints: int = 3, async_checkpoints: bool = True,
          resume: bool = True, eval_fn: EvalFn | None = None, eval_every: int = 0, mesh: Mesh | None = None,
          param_specs: Any = None, rules: Sequence[tuple[str, Any]] = sharding_lib.DEFAULT_RULES,
          progress: bool = True, tensorboard: bool = True, verbose: bool = True,
          optimizer_wrappers: Mapping[str, OptimizerWrapper] | None = None,
          step_factory: StepFactory | None = None) -> TrainResult:
    """Trains ``params`` through ``stages``; resumes from ``run_dir/checkpoints`` when it holds a checkpoint.

    Args:
      params: the full parameter tree ``{"base": ..., "peft": ...}`` (plain arrays, not donated).
      stages: :class:`Stage` s (or mappings for :meth:`Stage.from_dict`), run in order.
      data_factory: ``(stage_index, start_step) -> iterable of batches`` (pytrees of host arrays whose
        leading dimension is the batch).
      run_dir: the run directory.
      loss_fn: the task ``(params, batch, rng) -> (loss, metrics)``; or
      build_loss_fn: ``methods -> loss_fn``, called once per stage with the stage's active methods.
      seed: the base PRNG seed (step ``s`` uses ``fold_in(PRNGKey(seed), s)``).
      checkpoint_every: save every this many global steps (0: only at the end of each stage); the end of
        every stage is always saved.
      keep_checkpoints: how many checkpoints to keep (>= 2 so that a corrupt newest one has a fallback).
      async_checkpoints: write checkpoints in the background.
      resume: continue from the newest checkpoint in ``run_dir``; if False, an existing checkpoint is an error.
      eval_fn: ``(params, global_step) -> metrics``, logged as ``eval/<name>`` every ``eval_every`` steps.
      mesh: the device mesh (default: one device); see :mod:`vlpeft_jax.train.sharding`.
      param_specs: logical ``PartitionSpec`` per parameter leaf (same structure as ``params``; see
        :func:`vlpeft_jax.train.sharding.logical_specs`); None replicates the parameters.
      rules: logical -> mesh axis rules.
      progress, tensorboard, verbose: show a progress bar / write TensorBoard events / print the run
        directory and each stage's parameter counts.
      optimizer_wrappers: stage name -> ``tx -> tx`` applied to that stage's optimizer (e.g. GPS masks);
        see :func:`vlpeft_jax.train.stages.plan_stages`.
      step_factory: ``(loss_fn, tx, accumulation_steps=...) -> train step`` (un-jitted); default
        :func:`~vlpeft_jax.train.step.make_train_step`. Multi-task training passes
        :func:`vlpeft_jax.mtl.step.make_mtl_train_step` (bound to its method) with a task-losses function.

    Raises:
      ConfigError: bad stages or arguments (before anything is trained), or checkpoints from another plan.
      InputError: a data iterator ended early or a batch does not fit the mesh.
      TrainingDivergedError: the loss or gradient became non-finite.
      CheckpointError: checkpoints exist but none can be read.
    """
    if (loss_fn is None) == (build_loss_fn is None):
        raise ConfigError("train() needs exactly one of loss_fn and build_loss_fn")
    if checkpoint_every < 0 or eval_every < 0:
        raise ConfigError(f"checkpoint_every ({checkpoint_every}) and eval_every ({eval_every}) must be >= 0")
    if keep_checkpoints < 1:
        raise ConfigError(f"keep_checkpoints must be >= 1, got {keep_checkpoints}")
    if eval_every and eval_fn is None:
        raise ConfigError("eval_every is set but no eval_fn was given")
    stages = [s if isinstance(s, Stage) else Stage.from_dict(s, f"stages[{i}]") for i, s in enumerate(stages)]
    plans = plan_stages(params, stages, optimizer_wrappers)
    run_dir = Path(run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    say = print if verbose and is_main else (lambda *a, **k: None)
    mesh = sharding_lib.make_mesh() if mesh is None else mesh
    param_shardings = sharding_lib.tree_shardings(params, mesh, param_specs, rules)
    offsets = [0, *itertools.accumulate(p.stage.steps for p in plans)]
    stage_summary = [[p.stage.name, p.stage.steps] for p in plans]

    say(f"run directory: {run_dir}")
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=keep_checkpoints, async_save=async_checkpoints)
    state: TrainState | None = None
    state_plan = -1  # index of the stage whose labels the state is split by
    start_stage, start_step, resumed_from = 0, 0, None
    try:
        if checkpointer.latest_step() is not None:
            if not resume:
                raise ConfigError(f"{run_dir} already has checkpoints (newest: step {checkpointer.latest_step()}); "
                                  f"pass resume=True to continue it or use a new run directory")

            def build_abstract(meta: dict[str, Any]) -> TrainState:
                si = meta.get("stage_index")
                if meta.get("stages") != stage_summary or not isinstance(si, int):
                    raise ConfigError(f"the checkpoints in {checkpointer.directory} were written for stages "
                                      f"{meta.get('stages')}, this run has {stage_summary}; use a new run directory")
                if meta.get("seed") != seed:
                    raise ConfigError(f"the checkpoints in {checkpointer.directory} were written with seed "
                                      f"{meta.get('seed')}, this run has seed {seed}; use the same seed or a new "
                                      f"run directory")
                return abstract_stage_state(params, plans[si], mesh, param_shardings)

            restored = checkpointer.restore_latest(build_abstract)
            if restored is not None:
                state, meta = restored
                state_plan, start_stage, start_step = meta["stage_index"], meta["stage_index"], meta["step_in_stage"]
                resumed_from = meta["step"]
                say(f"resuming from step {resumed_from} (stage {plans[start_stage].stage.name!r}, "
                    f"{start_step}/{plans[start_stage].stage.steps})")

        run = _Run(checkpointer=checkpointer, mesh=mesh, seed=seed, checkpoint_every=checkpoint_every,
                   eval_fn=eval_fn, eval_every=eval_every, is_main=is_main, stage_summary=stage_summary,
                   last_saved=resumed_from, interrupt=_InterruptFlag(), step_factory=step_factory or make_train_step)
        # only the main process writes metrics.jsonl (a resumed run rewrites it: two writers would lose lines)
        logger = (MetricsLogger(run_dir, start_step=resumed_from or 0, tensorboard=tensorboard) if is_main
                  else contextlib.nullcontext())
        with run.interrupt, logger as log:
            bar = ProgressBar(offsets[-1], initial=resumed_from or 0, enabled=progress and is_main)
            try:
                for plan in plans[start_stage:]:
                    first_step = start_step if plan.index == start_stage else 0
                    if first_step >= plan.stage.steps:
                        continue  # resumed at the very end of this stage
                    state_shardings = stage_state_shardings(params, plan, mesh, param_shardings)
                    if state is None:
                        state = init_stage_state(params, plan, step=0, rng=jax.random.PRNGKey(seed),
                                                 state_shardings=state_shardings)
                    elif state_plan != plan.index:
                        state = next_stage_state(state, plan, state_shardings)
                    state_plan = plan.index
                    say(_describe(plan))
                    bar.set_stage(plan.stage.name)
                    task = loss_fn if loss_fn is not None else build_loss_fn(plan.stage.methods)
                    state = run.stage(state, plan, task, data_factory, first_step, offsets[plan.index],
                                      state_shardings, log, bar)
            finally:
                bar.close()
    finally:
        checkpointer.close()
    say(f"finished: {offsets[-1]} steps; run directory: {run_dir}")
    return TrainResult(state=state, params=state.params, history=run.history, evals=run.evals, run_dir=run_dir,
                       resumed_from=resumed_from, last_checkpoint=run.last_saved)
