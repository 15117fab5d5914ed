"""BitFit: train only the bias terms of the base model (Ben Zaken et al. 2022).

BitFit adds nothing to the forward pass: the trained parameters *are* the base model's biases (of linear
layers and of LayerNorms, as in the paper). So it is a method with no parameters and no hooks, plus the
trainable rule that selects the biases of the run tree's ``base`` (``base/<module>/bias``):

- in ``config.peft`` it may be listed (``{"bitfit": {"targets": ["language_model/.*"]}}``) so that the
  experiment runner builds it like any other method (``init`` checks that the targets hold biases);
- a stage trains it with :meth:`BitFit.trainable_rules`, e.g. ``[["base/.*/bias", "bitfit"]]`` in a config.

Because the biases are trained in place, :meth:`BitFit.merge` returns the base parameters unchanged: they
already are the merged model. Models without biases (LLaMA, whose projections have none and whose RMSNorm
has only a scale) have nothing to train: ``init`` raises :class:`ConfigError`.

Example:
    >>> import jax, jax.numpy as jnp
    >>> base = {"fc": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}, "ln": {"scale": jnp.ones(3)}}
    >>> bitfit = BitFit()
    >>> bitfit.init(jax.random.key(0), base), bitfit.trainable_rules(), bitfit.num_trainable(base)
    ({}, [('base/(?:.*)/bias', 'bitfit')], 3)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import numpy as np

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.models import hooks
from vlpeft_jax.peft import base as pb
from vlpeft_jax.tree import leaf_paths


@dataclasses.dataclass(frozen=True)
class BitFit(pb.Method):
    """BitFit settings.

    Attributes:
      targets: regular expressions over module paths (``/``-joined, relative to the base tree) whose
        ``bias`` trains; default: every module.
      root: the base model's key in the run's parameter tree.
    """

    targets: tuple[str, ...] = (".*",)
    root: str = "base"
    name: str = "bitfit"

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", (self.targets,) if isinstance(self.targets, str) else tuple(self.targets))
        if not self.targets:
            raise ConfigError(f"{self.name}.targets is empty; give at least one module pattern (e.g. '.*')")
        for pat in self.targets:
            try:
                re.compile(pat)
            except re.error as e:
                raise ConfigError(f"{self.name}.targets: invalid regular expression {pat!r}: {e}") from None

    @property
    def _module_regex(self) -> str:
        return "|".join(self.targets)

    def bias_paths(self, base_params: pb.Params) -> list[str]:
        """``/``-joined paths (relative to the base tree) of the biases that train."""
        rx = re.compile(f"(?:{self._module_regex})/bias")
        return [p for p in leaf_paths(base_params) if rx.fullmatch(p)]

    def trainable_rules(self, label: str | None = None) -> list[tuple[str, str]]:
        """The stage rule over the run tree ``{"base", "peft"}`` that trains exactly these biases."""
        return [(f"{re.escape(self.root)}/(?:{self._module_regex})/bias", label or self.name)]

    def init(self, rng: jax.Array, base_params: pb.Params) -> pb.Params:
        if not self.bias_paths(base_params):
            modules = sorted({p.rsplit("/", 1)[0] for p in leaf_paths(base_params) if p.endswith("/bias")})
            shown = ", ".join(modules[:12]) + (" ..." if len(modules) > 12 else "")
            raise ConfigError(f"{self.name}: no bias parameter in modules matching {list(self.targets)}; "
                              f"modules with a bias: {shown or 'none (this model has no biases)'}")
        return {}

    def hooks(self, peft_params: pb.Params, *, rng: jax.Array | None = None, train: bool = False
              ) -> list[hooks.Hook]:
        return []

    def merge(self, base_params: pb.Params, peft_params: pb.Params) -> pb.Params:
        return base_params

    def num_params(self, peft_params: pb.Params) -> int:
        return 0

    def num_trainable(self, base_params: Any) -> int:
        """Number of bias scalars that train."""
        chosen = set(self.bias_paths(base_params))
        leaves = zip(leaf_paths(base_params), jax.tree.leaves(base_params), strict=True)
        return sum(int(np.prod(x.shape)) for p, x in leaves if p in chosen)
