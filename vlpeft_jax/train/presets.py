"""Trainable-rule presets for a run's parameter tree ``{"base": ..., "peft": {<instance>: ...}}``, and the
check that stages only train methods they activate.

The rule builders of :mod:`vlpeft_jax.train.labels` work on any tree; these place them under the run tree's
``base`` (so that, e.g., a head pattern never also catches a PEFT method's parameters) and add the rule that
trains one PEFT method instance (``peft/<instance>/...``). Configs call them to write their stages:

- :func:`method` — a PEFT method instance (LoRA, adapters, prefix, ...);
- :func:`full_finetuning`, :func:`head`, :func:`last_k_layers`, :func:`linear_probe` — the base model;
- :func:`bitfit` — the base model's biases (see :mod:`vlpeft_jax.peft.bitfit`).

Rules compose by concatenation (first match wins), e.g. PT-PEFT's second stage with a trainable prefix is
``method("lora") + method("prefix")``.

:func:`check_stage_methods` is the "a stage trains a method that is not active" check of issue 5: a stage
whose rules would train ``peft/<name>/...`` while ``<name>`` is not in the stage's ``methods`` gets zero
gradients there but would still be moved by weight decay, which is never what was meant.

Example:
    >>> method("lora") + head()
    [('peft/lora/.*', 'lora'), ('base/(?:(?:.*/)?lm_head)(?:/.*)?', 'head')]
    >>> stage = {"name": "s2", "steps": 1, "trainable": method("prefix"), "methods": ["lora"]}
    >>> try:
    ...     check_stage_methods([stage], ["prefix", "lora"])
    ... except ConfigError as e:
    ...     print(str(e)[:56])
    stage 's2' trains method 'prefix' (rule 'peft/prefix/.*'
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.peft.bitfit import BitFit
from vlpeft_jax.train import labels as labels_lib
from vlpeft_jax.train.stages import Stage
from vlpeft_jax.tree import leaf_paths

Rule = labels_lib.Rule
BASE = "base"
PEFT = "peft"


def _under(root: str, rules: Iterable[Rule]) -> list[Rule]:
    return [(re.escape(root) + "/" + pattern, label) for pattern, label in rules]


def method(name: str, label: str | None = None) -> list[Rule]:
    """Train every parameter of PEFT method instance ``name`` (group ``label``, default the name)."""
    return [(f"{PEFT}/{re.escape(name)}/.*", label or name)]


def full_finetuning(label: str = "full") -> list[Rule]:
    """Train every base parameter (the PEFT methods' parameters stay as their own rules say)."""
    return labels_lib.full_finetuning_rules(label, root=BASE)


def head(patterns: str | Sequence[str] = (r"(?:.*/)?lm_head",), label: str = "head") -> list[Rule]:
    """Train the base modules matching ``patterns`` (regexes over module paths; default: any ``lm_head``).

    A tied head has no ``lm_head`` parameters: name the embedding instead (e.g. ``.*/embed_tokens``).
    """
    return _under(BASE, labels_lib.head_rules(patterns, label))


def linear_probe(head_module: str, label: str = "probe") -> list[Rule]:
    """Linear probing: only the base module named ``head_module`` (a path suffix, e.g. ``classifier``) trains."""
    return _under(BASE, labels_lib.linear_probe_rules(head_module, label))


def last_k_layers(params: Mapping[str, Any], k: int, *, stack: str | None = None,
                  label: str = "last_layers") -> list[Rule]:
    """Train the ``k`` highest layers of one layer stack of the base model.

    Args:
      params: the run tree ``{"base", "peft"}`` (or just the base tree), arrays or abstract shapes.
      k: number of layers.
      stack: regex over the stack's container path relative to the base (e.g. ``language_model/model``);
        required when the base has several stacks (a vision tower and a decoder).

    Example:
        >>> import numpy as np
        >>> p = {"base": {"model": {f"layers_{i}": {"w": np.ones(1)} for i in range(3)}}, "peft": {}}
        >>> last_k_layers(p, 1)
        [('base/model/layers_2/.*', 'last_layers')]
    """
    base = params[BASE] if BASE in params else params
    return _under(BASE, labels_lib.last_k_layers_rules(base, k, stack=stack, label=label))


def bitfit(targets: str | Sequence[str] = (".*",), label: str = "bitfit") -> list[Rule]:
    """Train the base biases of modules matching ``targets`` (see :class:`vlpeft_jax.peft.bitfit.BitFit`)."""
    return BitFit(targets=targets, root=BASE).trainable_rules(label)


# ------------------------------------------------------------------------------------ stage checks

# Paths standing for "any parameter of a method" when no parameter tree is given.
_PROBES = ("x", "x/kernel", "x/y/kernel", "x_0/y/z/kernel")


def _first_label(compiled: Sequence[tuple[re.Pattern[str], str, str]], path: str) -> tuple[str, str] | None:
    for regex, pattern, label in compiled:
        if regex.fullmatch(path):
            return pattern, label
    return None


def methods_trained(trainable: Iterable[Rule], names: Iterable[str], params: Any = None) -> dict[str, str]:
    """Which of the method instances ``names`` the rules ``trainable`` would train, with the rule that does.

    With ``params`` (the run tree, arrays or abstract shapes) every leaf under ``peft/<name>/`` is checked;
    without, paths under ``peft/<name>/`` are probed, and a rule whose literal start is ``peft/<name>/``
    counts too.
    """
    compiled = [(re.compile(p), p, label) for p, label in trainable]
    found: dict[str, str] = {}
    if params is not None:
        for path in leaf_paths(params):
            parts = path.split("/", 2)
            if len(parts) < 3 or parts[0] != PEFT or parts[1] not in names or parts[1] in found:
                continue
            hit = _first_label(compiled, path)
            if hit and hit[1] != labels_lib.FROZEN:
                found[parts[1]] = hit[0]
        return found
    for name in names:
        literal = (f"{PEFT}/{name}/", re.escape(f"{PEFT}/{name}") + "/")
        for probe in _PROBES:
            hit = _first_label(compiled, f"{PEFT}/{name}/{probe}")
            if hit and hit[1] != labels_lib.FROZEN:
                found[name] = hit[0]
                break
        else:
            for _, pattern, label in compiled:
                if label != labels_lib.FROZEN and pattern.startswith(literal):
                    found[name] = pattern
                    break
    return found


def check_stage_methods(stages: Sequence[Stage | Mapping[str, Any]], methods: Iterable[str] | Mapping[str, Any],
                        params: Any = None) -> None:
    """Raises :class:`ConfigError` if a stage activates an undefined method or trains an inactive one.

    Args:
      stages: the run's stages (:class:`Stage` or config mappings).
      methods: the method instances defined in ``config.peft`` (names, or a name -> method mapping).
      params: optionally the run tree ``{"base", "peft"}`` (arrays or ``jax.eval_shape`` shapes), for an
        exact leaf-by-leaf check; without it, rules are probed (see :func:`methods_trained`).
    """
    defined = list(methods)
    for i, s in enumerate(stages):
        stage = s if isinstance(s, Stage) else Stage.from_dict(s, f"stages[{i}]")
        active = set(stage.methods)
        undefined = [m for m in stage.methods if m not in defined]
        if undefined:
            raise ConfigError(f"stage {stage.name!r} activates method(s) {', '.join(map(repr, undefined))} not defined "
                              f"in config.peft (defined: {', '.join(defined) or 'none'})")
        for name, pattern in methods_trained(stage.trainable, defined, params).items():
            if name not in active:
                raise ConfigError(f"stage {stage.name!r} trains method {name!r} (rule {pattern!r} matches "
                                  f"{PEFT}/{name}/...) but {name!r} is not active in it (active: "
                                  f"{', '.join(stage.methods) or 'none'}); add {name!r} to the stage's methods "
                                  "or narrow the rule")
