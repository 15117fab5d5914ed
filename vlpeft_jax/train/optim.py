"""Per-group optimizers over the trainable pytree (DESIGN invariant 3).

One stage's optimizer is ``clip_by_global_norm -> optax.partition({group: group optimizer})`` over the
trainable tree only (frozen leaves are ``None`` there, so they carry no optimizer state). Each group has
its own optimizer (``adamw``, ``adam`` or ``sgd``), learning-rate schedule (linear warm-up from 0, then
cosine or linear decay to ``final_lr_ratio * learning_rate``, or constant) and weight-decay mask (by
default no decay on biases, norm scales and embeddings).

Gradient accumulation is not an optax wrapper here: the train step scans over micro-batches inside one
jitted call and applies one update with the mean gradient (see :mod:`vlpeft_jax.train.step`). So one
*step* is always one optimizer update, schedules count updates, and a checkpoint never falls between
micro-batches. ``accumulation_steps`` lives in :class:`OptimizerConfig` because it belongs to the stage's
update rule.

Example:
    >>> import jax.numpy as jnp
    >>> params = {"head": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}}
    >>> labels = {"head": {"kernel": "head", "bias": "head"}}
    >>> sgd = GroupOptimizer("sgd", learning_rate=0.1, schedule="constant")
    >>> opt = build_optimizer(OptimizerConfig(sgd, clip_norm=None), labels, total_steps=10)
    >>> state = opt.tx.init(params)
    >>> grads = {"head": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    >>> updates, _ = opt.tx.update(grads, state, params)
    >>> round(float(updates["head"]["bias"][0]), 6), opt.learning_rates(0)
    (-0.1, {'head': 0.1})
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.train import labels as labels_lib
from vlpeft_jax.tree import path_str

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "linear", "constant")
DEFAULT_NO_DECAY = (r"(?:.*/)?(?:bias|scale|embedding)",)
"""Leaves whose path fully matches one of these get no weight decay: biases, norm scales, embeddings."""


def _check_keys(cls: type, d: Mapping[str, Any], where: str) -> None:
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in d if k not in valid]
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(valid)}")


@dataclasses.dataclass(frozen=True)
class GroupOptimizer:
    """The optimizer of one trainable group.

    Attributes:
      name: ``adamw`` (decoupled weight decay), ``adam`` (no weight decay) or ``sgd`` (weight decay added
        to the gradient, as ``torch.optim.SGD``).
      learning_rate: peak learning rate.
      weight_decay: decay coefficient, applied to leaves not matching ``no_decay``.
      schedule: ``cosine``, ``linear`` (decay after warm-up) or ``constant`` (after warm-up).
      warmup_steps: linear warm-up from 0 over this many updates.
      final_lr_ratio: learning rate at the end of the decay, as a fraction of ``learning_rate``.
      b1, b2, eps: Adam moments.
      momentum, nesterov: SGD momentum (0 = none).
      no_decay: regexes (full match on the ``/``-joined path) of leaves without weight decay.
    """

    name: str = "adamw"
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    final_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.0
    nesterov: bool = False
    no_decay: tuple[str, ...] = DEFAULT_NO_DECAY

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "optimizer") -> GroupOptimizer:
        """Builds from a plain mapping; unknown keys are a :class:`ConfigError`."""
        _check_keys(cls, d, where)
        d = dict(d)
        if "no_decay" in d:
            d["no_decay"] = tuple(d["no_decay"])
        out = cls(**d)
        out.validate(where)
        return out

    def validate(self, where: str = "optimizer") -> None:
        """Raises :class:`ConfigError` naming the bad field."""
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"{where}.name: unknown optimizer {self.name!r}; valid: {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"{where}.schedule: unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if not self.learning_rate >= 0:
            raise ConfigError(f"{where}.learning_rate must be >= 0, got {self.learning_rate!r}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"{where}.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.name == "adam" and self.weight_decay:
            raise ConfigError(f"{where}: optimizer 'adam' has no weight decay (got weight_decay="
                              f"{self.weight_decay}); use 'adamw'")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"{where}.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not 0 <= self.final_lr_ratio <= 1:
            raise ConfigError(f"{where}.final_lr_ratio must be in [0, 1], got {self.final_lr_ratio!r}")
        for p in self.no_decay:
            try:
                re.compile(p)
            except re.error as e:
                raise ConfigError(f"{where}.no_decay: invalid regular expression {p!r}: {e}") from None


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """A stage's update rule.

    Attributes:
      default: optimizer of every group not named in ``groups``.
      groups: per-group overrides, keyed by group label.
      clip_norm: global-norm gradient clipping over all trainable leaves (None: no clipping).
      accumulation_steps: micro-batches per update (the batch's leading dimension must be divisible).
    """

    default: GroupOptimizer = GroupOptimizer()
    groups: Mapping[str, GroupOptimizer] = dataclasses.field(default_factory=dict)
    clip_norm: float | None = 1.0
    accumulation_steps: int = 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "optimizer") -> OptimizerConfig:
        """Builds from a mapping: ``clip_norm``, ``accumulation_steps``, ``groups`` (label -> mapping) and
        the default group's fields at top level (``name``, ``learning_rate``, ...).

        Example:
            >>> cfg = OptimizerConfig.from_dict({"learning_rate": 1e-2, "groups": {"head": {"name": "sgd"}}})
            >>> cfg.default.learning_rate, cfg.groups["head"].name
            (0.01, 'sgd')
        """
        d = dict(d)
        top = {k: d.pop(k) for k in ("clip_norm", "accumulation_steps", "groups") if k in d}
        group_keys = [f.name for f in dataclasses.fields(GroupOptimizer)]
        unknown = [k for k in d if k not in group_keys]
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: "
                              f"clip_norm, accumulation_steps, groups, {', '.join(group_keys)}")
        default = GroupOptimizer.from_dict(d, where)
        groups = {label: GroupOptimizer.from_dict({**dataclasses.asdict(default), **dict(g)},
                                                   f"{where}.groups.{label}")
                  for label, g in dict(top.get("groups") or {}).items()}
        out = cls(default=default, groups=groups, clip_norm=top.get("clip_norm", 1.0),
                  accumulation_steps=top.get("accumulation_steps", 1))
        out.validate(where)
        return out

    def validate(self, where: str = "optimizer") -> None:
        """Raises :class:`ConfigError` naming the bad field."""
        self.default.validate(where)
        for label, g in self.groups.items():
            g.validate(f"{where}.groups.{label}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ConfigError(f"{where}.clip_norm must be > 0 or None, got {self.clip_norm!r}")
        if not isinstance(self.accumulation_steps, int) or self.accumulation_steps < 1:
            raise ConfigError(f"{where}.accumulation_steps must be an integer >= 1, got {self.accumulation_steps!r}")

    def for_group(self, label: str) -> GroupOptimizer:
        """The optimizer of group ``label``."""
        return self.groups.get(label, self.default)


def learning_rate_schedule(group: GroupOptimizer, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 over ``warmup_steps``, then ``group.schedule`` until ``total_steps``.

    Example:
        >>> s = learning_rate_schedule(GroupOptimizer(learning_rate=1.0, warmup_steps=2, schedule="linear"), 4)
        >>> [round(float(s(i)), 3) for i in range(5)]
        [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    lr = group.learning_rate
    decay_steps = max(total_steps - group.warmup_steps, 1)
    end = lr * group.final_lr_ratio
    if group.schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=group.final_lr_ratio)
    elif group.schedule == "linear":
        decay = optax.linear_schedule(lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(lr)
    if group.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, lr, group.warmup_steps)
    return optax.join_schedules([warmup, decay], [group.warmup_steps])


def decay_mask(no_decay: tuple[str, ...]) -> Callable[[Any], Any]:
    """A weight-decay mask function: True for leaves whose path matches none of ``no_decay``."""
    compiled = [re.compile(p) for p in no_decay]

    def mask(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: not any(c.fullmatch(path_str(path)) for c in compiled), params)

    return mask


def group_transform(group: GroupOptimizer, schedule: optax.Schedule) -> optax.GradientTransformation:
    """The optax transformation of one group (without clipping)."""
    mask = decay_mask(group.no_decay)
    if group.name == "adamw":
        return optax.adamw(schedule, b1=group.b1, b2=group.b2, eps=group.eps, weight_decay=group.weight_decay,
                           mask=mask)
    if group.name == "adam":
        return optax.adam(schedule, b1=group.b1, b2=group.b2, eps=group.eps)
    sgd = optax.sgd(schedule, momentum=group.momentum or None, nesterov=group.nesterov)
    if group.weight_decay:
        return optax.chain(optax.add_decayed_weights(group.weight_decay, mask), sgd)
    return sgd


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """A built stage optimizer: the optax transformation and each group's schedule (for logging)."""

    tx: optax.GradientTransformation
    schedules: Mapping[str, optax.Schedule]

    def learning_rates(self, update: int) -> dict[str, float]:
        """Each group's learning rate for update number ``update`` (0-based, within the stage)."""
        return {g: float(s(update)) for g, s in self.schedules.items()}


def build_optimizer(config: OptimizerConfig, labels: Any, total_steps: int) -> Optimizer:
    """The stage optimizer over the trainable leaves of ``labels``.

    Args:
      config: the stage's update rule.
      labels: the labels pytree (:mod:`vlpeft_jax.train.labels`); frozen leaves get no state.
      total_steps: optimizer updates in the stage (the schedules' horizon).

    Raises:
      ConfigError: a group override names a group that no leaf has, or there is nothing to train.
    """
    config.validate()
    names = labels_lib.groups(labels)
    if not names:
        raise ConfigError("no trainable parameters: every leaf is labelled frozen")
    unknown = [g for g in config.groups if g not in names]
    if unknown:
        raise ConfigError(f"optimizer.groups: {', '.join(map(repr, unknown))} is not a trainable group; "
                          f"groups: {', '.join(names)}")
    schedules = {g: learning_rate_schedule(config.for_group(g), total_steps) for g in names}
    transforms = {g: group_transform(config.for_group(g), schedules[g]) for g in names}
    parts = [optax.partition(transforms, labels_lib.group_labels(labels))]
    if config.clip_norm is not None:
        parts.insert(0, optax.clip_by_global_norm(config.clip_norm))
    return Optimizer(tx=optax.chain(*parts), schedules=schedules)
