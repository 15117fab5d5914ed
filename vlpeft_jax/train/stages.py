"""Stages are data (DESIGN invariant 5).

A run is a list of :class:`Stage` s. Each names the methods active in it (the caller's
``build_loss_fn(methods)`` decides what they mean), the rules that pick its trainable groups, its
number of optimizer updates and its optimizer. Two-stage PT-PEFT, the reverse order, parallel training
and alternation are all lists of stages, not code paths.

The parameters carry over from one stage to the next; at every stage boundary they are re-split by the
new stage's labels and a fresh optimizer (with its own warm-up and schedule) is initialised over the new
trainable set. The global step counter and the base PRNG key carry over too.

:func:`plan_stages` computes every stage's labels and optimizer before training starts, so a typo in a
path pattern or an optimizer group fails at once, naming the stage (DESIGN invariant 8).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from vlpeft_jax.train import labels
    >>> params = {"base": {"layers_0": {"kernel": jnp.ones((2, 2))}, "head": {"kernel": jnp.ones((2, 1))}}}
    >>> stages = [Stage("probe", steps=10, trainable=labels.linear_probe_rules("head")),
    ...           Stage("full", steps=5, trainable=labels.full_finetuning_rules())]
    >>> [(p.stage.name, p.counts["trainable"]) for p in plan_stages(params, stages)]
    [('probe', 2), ('full', 6)]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import optax
from jax.sharding import Mesh

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.train import labels as labels_lib
from vlpeft_jax.train import sharding as sharding_lib
from vlpeft_jax.train.optim import Optimizer, OptimizerConfig, build_optimizer
from vlpeft_jax.train.state import TrainState

OptimizerWrapper = Callable[[optax.GradientTransformation], optax.GradientTransformation]


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training stage.

    Attributes:
      name: unique within the run (used in logs, checkpoints and error messages).
      steps: optimizer updates in this stage.
      trainable: ordered ``(regex, group label)`` rules over parameter paths (see
        :mod:`vlpeft_jax.train.labels`); unmatched leaves are frozen.
      optimizer: the stage's update rule (per-group optimizers, clipping, accumulation).
      methods: names of the methods active in this stage, passed to ``build_loss_fn``.
    """

    name: str
    steps: int
    trainable: tuple[tuple[str, str], ...]
    optimizer: OptimizerConfig = OptimizerConfig()
    methods: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "trainable", tuple(tuple(r) for r in self.trainable))
        object.__setattr__(self, "methods", tuple(self.methods))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "stage") -> Stage:
        """Builds from a mapping (``optimizer`` as in :meth:`OptimizerConfig.from_dict`); unknown keys fail.

        Example:
            >>> s = Stage.from_dict({"name": "head", "steps": 3, "trainable": [["(?:.*/)?lm_head/.*", "head"]],
            ...                      "optimizer": {"learning_rate": 0.01}})
            >>> s.trainable, s.optimizer.default.learning_rate
            ((('(?:.*/)?lm_head/.*', 'head'),), 0.01)
        """
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in valid]
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                              f"valid keys: {', '.join(valid)}")
        missing = [k for k in ("name", "steps", "trainable") if k not in d]
        if missing:
            raise ConfigError(f"{where}: missing key(s) {', '.join(missing)}")
        d = dict(d)
        opt = d.get("optimizer", {})
        name = d["name"]
        d["optimizer"] = opt if isinstance(opt, OptimizerConfig) else OptimizerConfig.from_dict(
            opt, f"{where}[{name}].optimizer")
        return cls(**d)

    def validate(self, where: str = "stage") -> None:
        """Raises :class:`ConfigError` naming the bad field."""
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"{where}.name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"{where}[{self.name}].steps must be an integer >= 1, got {self.steps!r}")
        if not self.trainable:
            raise ConfigError(f"{where}[{self.name}].trainable is empty: nothing would train")
        self.optimizer.validate(f"{where}[{self.name}].optimizer")


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """A stage resolved against the parameter tree: labels, optimizer and parameter counts."""

    index: int
    stage: Stage
    labels: Any
    optimizer: Optimizer
    counts: dict[str, int]


def plan_stages(params: Any, stages: Sequence[Stage],
                optimizer_wrappers: Mapping[str, OptimizerWrapper] | None = None) -> list[StagePlan]:
    """Validates ``stages`` against ``params`` (arrays or shapes) and resolves labels and optimizers.

    ``optimizer_wrappers`` maps a stage name to a function that wraps that stage's built optax
    transformation (e.g. GPS's gradient masks, :func:`vlpeft_jax.peft.gps.masked`); its state is part of
    the train state, so it is checkpointed and resumed with the moments.

    Raises:
      ConfigError: empty or duplicate stage names, a bad field, a rule matching no parameter, a stage with
        nothing trainable, or an optimizer group that does not exist; the message names the stage.
    """
    if not stages:
        raise ConfigError("a run needs at least one stage")
    names = [s.name for s in stages]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"stage names must be unique; repeated: {', '.join(duplicates)}")
    wrappers = dict(optimizer_wrappers or {})
    unknown = sorted(set(wrappers) - set(names))
    if unknown:
        raise ConfigError(f"optimizer wrappers for unknown stage(s) {', '.join(unknown)}; stages: {', '.join(names)}")
    plans = []
    for i, stage in enumerate(stages):
        stage.validate(f"stages[{i}]")
        try:
            labels = labels_lib.make_labels(params, stage.trainable)
            optimizer = build_optimizer(stage.optimizer, labels, stage.steps)
            if stage.name in wrappers:
                optimizer = dataclasses.replace(optimizer, tx=wrappers[stage.name](optimizer.tx))
        except ConfigError as e:
            raise ConfigError(f"stage {stage.name!r}: {e}") from None
        plans.append(StagePlan(i, stage, labels, optimizer, labels_lib.count_params(params, labels)))
    return plans


def steps_for_epochs(epochs: float, num_examples: int, batch_size: int) -> int:
    """Optimizer updates for ``epochs`` passes over ``num_examples`` with ``batch_size`` (rounded up).

    Example:
        >>> steps_for_epochs(2, 100, 32)
        7
    """
    if epochs <= 0 or num_examples < 1 or batch_size < 1:
        raise ConfigError(f"epochs ({epochs}), examples ({num_examples}) and batch size ({batch_size}) must be > 0")
    return math.ceil(epochs * num_examples / batch_size)


def _create(plan: StagePlan, step: int | jax.Array):
    def create(params: Any, rng: jax.Array) -> TrainState:
        return TrainState.create(params, plan.labels, plan.optimizer.tx, rng, step)

    return create


def stage_state_shardings(params: Any, plan: StagePlan, mesh: Mesh, param_shardings: Any) -> TrainState:
    """The shardings of the train state of ``plan`` (a :class:`TrainState` of ``NamedSharding``)."""
    abstract = jax.eval_shape(_create(plan, 0), params, jax.random.PRNGKey(0))
    return sharding_lib.state_shardings(abstract, param_shardings, mesh)


def abstract_stage_state(params: Any, plan: StagePlan, mesh: Mesh, param_shardings: Any) -> TrainState:
    """Shapes, dtypes and shardings of the train state of ``plan``: the target to restore a checkpoint into."""
    abstract = jax.eval_shape(_create(plan, 0), params, jax.random.PRNGKey(0))
    shardings = sharding_lib.state_shardings(abstract, param_shardings, mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def init_stage_state(params: Any, plan: StagePlan, *, step: int | jax.Array, rng: jax.Array,
                     state_shardings: TrainState | None = None, donate: bool = False) -> TrainState:
    """The state at the start of stage ``plan``: ``params`` split by its labels, a fresh optimizer state.

    Args:
      params: the full parameter tree (from the caller, or ``state.params`` of the previous stage).
      step: the global step so far.
      rng: the run's base key.
      state_shardings: from :func:`stage_state_shardings`; the state is created directly in that layout.
      donate: let the new state reuse ``params``' buffers (for stage transitions; the caller's own
        arrays must not be donated).
    """
    create = _create(plan, step)
    if state_shardings is None:
        return create(params, rng)
    return jax.jit(create, out_shardings=state_shardings, donate_argnums=(0,) if donate else ())(params, rng)


def next_stage_state(state: TrainState, plan: StagePlan, state_shardings: TrainState | None = None) -> TrainState:
    """Carries ``state`` into stage ``plan``: parameters, step and rng kept; re-split; fresh optimizer."""
    return init_stage_state(state.params, plan, step=state.step, rng=state.rng, state_shardings=state_shardings,
                            donate=True)
