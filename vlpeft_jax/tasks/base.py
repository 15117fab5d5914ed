"""The task protocol: what the runner asks of a task, and the pieces tasks share.

A task owns its data (batches for training and selection, deterministic by seed and step), its loss for a
model under the active PEFT methods, its evaluation (decode or predict, then its metrics) and the rows of the
report (DESIGN §2.2). The runner (:mod:`vlpeft_jax.experiments.runner`) picks one by name from
``config.task`` (:func:`vlpeft_jax.tasks.build`) and never looks inside it; methods and tasks are orthogonal.

Results of :meth:`Task.evaluate` follow one shape so that reports and sweeps read every task alike::

    {<group>: {"metrics": {name: value in [0, 1]}, "unavailable": {name: why}},  # groups: task.groups
     "samples": [{"id": ..., "output": ..., ...}, ...],                          # a few, for the report
     "outputs": {id: text}}                                                     # every prediction

Loss terms recorded by methods (``ctx.record("loss/<term>", value)``, :mod:`vlpeft_jax.peft.base`) are added
to the task loss by :func:`add_loss_terms`, each weighted by ``config.loss_weights[<term>]`` (default 1.0) and
logged as the metric ``loss/<term>``.

Example (the loss-term arithmetic):
    >>> import jax.numpy as jnp
    >>> from vlpeft_jax.peft.base import Records
    >>> loss, metrics = add_loss_terms(jnp.float32(2.0), {}, Records({"loss/ib": (1.0, 3.0)}), {"ib": 0.5})
    >>> float(loss), float(metrics["loss/ib"]), float(metrics["task_loss"])
    (4.0, 4.0, 2.0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.eval import decode
from vlpeft_jax.peft import base as peft_base

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict[str, Any]]]
Methods = Sequence[tuple[str, Any]]
"""``(instance name, method)`` pairs; a method's parameters are ``params["peft"][name]``."""


class Batches(Protocol):
    """Training batches in a fixed order: ``iterate(start, num)`` yields those of global steps
    ``start .. start + num - 1`` (host arrays, leading axis = batch)."""

    def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[dict[str, np.ndarray]]: ...


@dataclasses.dataclass
class Sample:
    """One row of the report's ``samples.png``: an image and the lines printed under it."""

    image: np.ndarray
    lines: list[str]


class Task(Protocol):
    """What the runner needs from a task (see the module docstring).

    Attributes:
      name: the registered name (``config.task``).
      groups: the result groups of :meth:`evaluate` in report order (caption domains, question sets, heads).
      group_label: what a group is, the report table's column name (``domain``, ``questions``, ``head``).
      group_note: one sentence for the report saying what the groups are.
      report_metrics: the metric names of the report table, in order.
      primary_metric: the metric sweeps plot by default.
    """

    name: str
    groups: tuple[str, ...]
    group_label: str
    group_note: str
    report_metrics: tuple[str, ...]
    primary_metric: str

    @classmethod
    def groups_for(cls, cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
        """The result groups a run of ``cfg`` reports (without loading data; sweeps use it)."""

    def outputs_file(self, outputs: Mapping[str, Any]) -> tuple[str, list[dict[str, Any]]]:
        """``(file stem, rows)``: every prediction of one evaluation in the task's standard results format."""

    def model_config(self) -> dict[str, Any]:
        """``config.model`` with the sizes the data decide (e.g. the vocabulary) filled in."""

    def shared_data(self) -> dict[str, Any]:
        """Loaded data another task over the same data may reuse (``tasks.build(cfg, **shared)``), e.g. for
        pretraining the base with another config."""

    def save_assets(self, run_dir: Any) -> None:
        """Writes what reading the run back needs beside the parameters (e.g. the tokenizer)."""

    def train_batches(self, seed: int) -> Batches:
        """The training batches of the run (``config.train``), ordered by ``seed``."""

    def selection_batches(self, settings: Mapping[str, Any], seed: int) -> Iterable[dict[str, Any]]:
        """The batches gradient-based selection reads (``config.selection``; see the runner)."""

    def loss_fn(self, module: Any, methods: Methods, loss_weights: Mapping[str, float]) -> LossFn:
        """``(params, batch, rng) -> (loss, metrics)`` under ``methods`` (``params = {"base", "peft"}``)."""

    def evaluate(self, module: Any, params: Any, methods: Methods) -> dict[str, Any]:
        """Predictions on the evaluation split and their metrics, in the shape of the module docstring."""

    def samples(self, results: Mapping[str, Mapping[str, Any]], n: int) -> list[Sample]:
        """``n`` report samples: the image, each result's output (``results``: label -> evaluate() result)
        and one reference."""


# ------------------------------------------------------------------------------------- shared pieces


def add_loss_terms(loss: jax.Array, metrics: Mapping[str, Any], records: peft_base.Records,
                   weights: Mapping[str, float]) -> tuple[jax.Array, dict[str, Any]]:
    """``loss + Σ weights[term] · term`` over the recorded ``loss/<term>`` values; each term is logged as
    ``loss/<term>`` and the task's own loss as ``task_loss`` (only when a term was recorded)."""
    terms = records.loss_terms()
    if not terms:
        return loss, dict(metrics)
    out = dict(metrics, task_loss=loss)
    for term, value in terms.items():
        loss = loss + float(weights.get(term, 1.0)) * value
        out[f"loss/{term}"] = value
    return loss, out


def lm_loss(module: Any, methods: Methods, params: Any, inputs: Mapping[str, Any], labels: jax.Array,
            rng: jax.Array, loss_weights: Mapping[str, float], *, encoder_decoder: bool = False,
            side_inputs: Mapping[str, Any] | None = None) -> tuple[jax.Array, dict[str, Any]]:
    """The LM tasks' training loss under ``methods``: cross-entropy on the labelled tokens plus every recorded
    ``loss/<term>`` (weighted by ``loss_weights``), the terms of the methods' extra passes included.

    ``inputs`` are the model's keyword arguments; a decoder-only model's head runs on the last
    ``labels.shape[1]`` positions (visual tokens a model prepends get no logits) and predicts the next token
    (:func:`~vlpeft_jax.train.losses.causal_lm_loss`); an encoder-decoder's decoder logits predict ``labels`` as
    they are (:func:`~vlpeft_jax.train.losses.seq2seq_lm_loss`). Hooks see the side input ``target_ids``: the
    token each head position is trained to predict (-100 where none), so methods that need the targets
    (KLAFT's TCM posterior) read them without any task code of their own.
    """
    from vlpeft_jax.train.losses import causal_lm_loss, seq2seq_lm_loss, shift_labels

    kwargs = dict(inputs)
    if not encoder_decoder:
        kwargs["logits_to_keep"] = labels.shape[1]
    side = {**dict(side_inputs or {}), "target_ids": labels if encoder_decoder else shift_labels(labels)}
    active = active_methods(methods, params)
    variables = {"params": params["base"]}
    out, records = peft_base.apply_with(module.apply, active, variables, rng=rng, train=True, side_inputs=side,
                                        record=True, **kwargs)
    extra = peft_base.extra_pass_records(module.apply, active, variables, rng=rng, side_inputs=side, **kwargs)
    if extra:
        records = peft_base.Records({k: tuple(records.get(k, ())) + tuple(extra.get(k, ()))
                                     for k in {*records, *extra}})
    loss, metrics = (seq2seq_lm_loss if encoder_decoder else causal_lm_loss)(out.logits, labels)
    return add_loss_terms(loss, metrics, records, loss_weights)


def active_methods(methods: Methods, params: Mapping[str, Any]) -> list[tuple[Any, Any]]:
    """``(method, its parameters)`` pairs for :func:`vlpeft_jax.peft.base.apply_with`."""
    return [(m, params["peft"][n]) for n, m in methods]


@dataclasses.dataclass
class WithImageIds:
    """Training batches with the side input ``image_ids`` (each row's example index, -1 on padding rows): the
    image a caption belongs to, so that in-batch contrastive terms (KLAFT's ITM) do not take another caption of
    the same image as a negative."""

    batches: Batches

    def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        for b in self.batches.iterate(start_step, num_steps):
            side = dict(b.get("side_inputs") or {})
            side["image_ids"] = np.asarray(b["example_index"], np.int32)
            yield {**b, "side_inputs": side}


@dataclasses.dataclass(frozen=True)
class PeftApply:
    """A decoding step function (:mod:`vlpeft_jax.eval.decode`): the model under the given PEFT methods,
    over params ``{"base", "peft"}``."""

    module: Any
    methods: tuple[tuple[str, Any], ...] = ()

    def __call__(self, params: Any, inputs: Any, attention_mask: jax.Array, cache: Any, decode: bool) -> Any:
        return peft_base.apply_with(_module_apply(self.module), active_methods(self.methods, params), params["base"],
                                    inputs, attention_mask, cache, decode)

    def init_cache(self, batch: int, max_len: int) -> Any:
        return _module_apply(self.module).init_cache(batch, max_len)


def _module_apply(module: Any) -> decode.ModuleApply:
    # a function, since PeftApply.__call__'s ``decode`` flag shadows the decode module there
    return decode.ModuleApply(module)


def check_settings(section: str, given: Mapping[str, Any], valid: Iterable[str]) -> None:
    """Raises :class:`ConfigError` naming the unknown keys of ``config.<section>`` and the valid ones."""
    valid = sorted(valid)
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ConfigError(f"{section}: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(valid)}")


def check_numbers(settings: Any, minimum: Mapping[str, int], positive: Iterable[str] = ("learning_rate",)) -> None:
    """Validates a settings dataclass: each field of ``minimum`` an integer (not a bool) >= its minimum, each of
    ``positive`` a number > 0; raises :class:`ConfigError` naming ``<Class>.<field>=<value>``.

    Example:
        >>> @dataclasses.dataclass
        ... class S:
        ...     steps: int = -1
        ...     learning_rate: float = 0.1
        >>> check_numbers(S(), {"steps": 0})
        Traceback (most recent call last):
        ...
        vlpeft_jax.errors.ConfigError: S.steps=-1 must be an integer >= 0
    """
    name = type(settings).__name__
    for key, low in minimum.items():
        v = getattr(settings, key)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise ConfigError(f"{name}.{key}={v!r} must be an integer >= {low}")
    for key in positive:
        v = getattr(settings, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ConfigError(f"{name}.{key}={v!r} must be > 0")


def eval_count(cfg: ml_collections.ConfigDict, available: int) -> int:
    """How many evaluation examples to use: ``config.eval.max_examples`` (0 = all)."""
    n = cfg.eval.get("max_examples", 0) or available
    return min(n, available)
