"""Training: labels pytree, per-group optimizers, jitted steps, stages, sharding, checkpoints, the loop.

The pieces, in the order data flows through them:

- :mod:`~vlpeft_jax.train.labels`: rules -> a labels pytree (group label or ``"frozen"`` per leaf);
  split/merge of trainable and frozen parameters; rule builders (full, head, last-k layers, linear probe).
- :mod:`~vlpeft_jax.train.presets`: those rules placed on a run tree ``{"base", "peft"}`` (plus a PEFT
  method's and BitFit's rules), and the check that stages train only methods they activate.
- :mod:`~vlpeft_jax.train.optim`: per-group optimizers via ``optax.partition``, schedules, decay masks.
- :mod:`~vlpeft_jax.train.state`: :class:`TrainState`.
- :mod:`~vlpeft_jax.train.step`: jitted train step (gradients of trainable leaves only, accumulation,
  non-finite detection) and eval step.
- :mod:`~vlpeft_jax.train.stages`: stages as data.
- :mod:`~vlpeft_jax.train.sharding`: (data, fsdp, tensor) mesh and logical axis rules.
- :mod:`~vlpeft_jax.train.checkpoint`: orbax checkpoints with corrupt-checkpoint fallback.
- :mod:`~vlpeft_jax.train.logging`: metrics JSONL, TensorBoard, progress bar.
- :mod:`~vlpeft_jax.train.loop`: :func:`train`.
"""

from typing import Any

from vlpeft_jax.train.labels import FROZEN, count_params, make_labels, merge, split
from vlpeft_jax.train.optim import GroupOptimizer, OptimizerConfig, build_optimizer
from vlpeft_jax.train.stages import Stage, plan_stages
from vlpeft_jax.train.state import TrainState
from vlpeft_jax.train.step import make_eval_step, make_train_step

_LOOP_NAMES = ("TrainResult", "TrainingDivergedError", "train")


def __getattr__(name: str) -> Any:
    # the loop imports orbax (slow to import); load it only when used, so labels/optim stay light
    if name in _LOOP_NAMES:
        from vlpeft_jax.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "FROZEN", "GroupOptimizer", "OptimizerConfig", "Stage", "TrainResult", "TrainState", "TrainingDivergedError",
    "build_optimizer", "count_params", "make_eval_step", "make_labels", "make_train_step", "merge", "plan_stages",
    "split", "train",
]
