"""Image-level classification heads on a vision tower or on a VLM's visual tokens (``vision_classifier``).

:class:`VisionClassifier` = a feature source -> pooling -> one linear head per label task:

- the feature source is a vision tower (ViT, CLIP vision; its :class:`~vlpeft_jax.models.outputs.EncoderOutput`),
  or a prefix VLM's image path: the tower, then the VLM's Mapping Layer (the visual tokens ``H_I`` a
  :class:`~vlpeft_jax.models.vlm.PrefixVLM` feeds its LM; the LM itself is not part of the classifier);
- ``pool`` picks one vector per image: ``cls`` the class token of ``last_hidden_state`` (Hugging Face's
  ``ViTForImageClassification``), ``mean`` the mean of the patch tokens (``CLIPForImageClassification``;
  on VLM features the mean of all visual tokens), ``pooled`` the tower's own pooled output (ViT's tanh
  pooler, CLIP's post-LN class token; towers only);
- ``heads/<name>`` is a ``layers.Linear`` per task producing that task's logits (``num_classes`` wide);
  a head named in ``patch_heads`` is *dense*: it reads every patch token (the tokens after the class token) and
  gives ``[b, num_patches, num_classes]`` logits (the per-patch tasks of multi-task learning). The
  model knows nothing of single- vs multi-label: that is the loss, which the task owns
  (:mod:`vlpeft_jax.tasks.classification`).

Parameter paths: the tower's tree sits unchanged under ``vision_tower`` (and the Mapping Layer under
``multi_modal_projector``), the names a :class:`~vlpeft_jax.models.vlm.PrefixVLM` gives them, so PEFT target
patterns and trainable rules read the same on both, and a VLM's tower (or a converted Hugging Face tower)
drops in as ``params["vision_tower"]``. The heads are ``heads/<name>/{kernel, bias}``; kernels start as
``normal(0.02)``, biases at zero (Hugging Face's classifier initialisation; not zeros, so that task
gradients reach the tower from the first step, which gradient-based selection needs).

Hook points are the tower's own (and the Mapping Layer's); the heads are ``linear`` hook points too.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from vlpeft_jax.models import layers
    >>> from vlpeft_jax.models.vit import ViTConfig, ViTModel
    >>> tower = ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    ...                            intermediate_size=32, image_size=16, patch_size=8, add_pooling_layer=False))
    >>> model = VisionClassifier(tower, num_classes=(("count", 4), ("shape_presence", 5)), pool="mean")
    >>> x = jnp.zeros((2, 16, 16, 3))
    >>> params = layers.unbox(model.init(jax.random.key(0), x))["params"]
    >>> sorted(params), sorted(params["heads"]), params["heads"]["count"]["kernel"].shape
    (['heads', 'vision_tower'], ['count', 'shape_presence'], (16, 4))
    >>> out = model.apply({"params": params}, x)
    >>> {k: v.shape for k, v in out.logits.items()}, out.features.shape
    ({'count': (2, 4), 'shape_presence': (2, 5)}, (2, 16))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.models import layers
from vlpeft_jax.models.vlm import ConnectorConfig, MappingLayer, select_vision_features

Array = jax.Array

POOLS = ("cls", "mean", "pooled")


def check_heads(heads: Mapping[str, int] | Sequence[tuple[str, int]], where: str = "model.heads"
                ) -> tuple[tuple[str, int], ...]:
    """``{name: num_classes}`` (or pairs) as a tuple of pairs, in the given order; raises ConfigError on an
    empty set, a name that cannot be a module name, or a size below 1.

    Example:
        >>> check_heads({"count": 4, "shape_presence": 5})
        (('count', 4), ('shape_presence', 5))
    """
    pairs = tuple(heads.items()) if isinstance(heads, Mapping) else tuple(tuple(p) for p in heads)
    if not pairs:
        raise ConfigError(f"{where} is empty; a classifier needs at least one head ({{name: num_classes}})")
    for name, n in pairs:
        if not isinstance(name, str) or not name or "/" in name:
            raise ConfigError(f"{where}: head name {name!r} must be a non-empty string without '/'")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"{where}[{name!r}]={n!r}: the number of classes must be an integer >= 1")
    return pairs


@flax.struct.dataclass
class ClassifierOutput:
    """Classifier result.

    Attributes:
      logits: ``{head name: [b, num_classes]}`` (float32); ``[b, num_patches, num_classes]`` for patch heads.
      features: ``[b, d]``, the pooled vector the heads read.
      tokens: ``[b, t, d]``, the token features pooling read (tower tokens or visual tokens), e.g. for
        patch-level heads or analysis.
    """

    logits: dict[str, Array]
    features: Array
    tokens: Array


class ClassifierHeads(nn.Module):
    """One ``layers.Linear`` per head, named by the head (``heads/<name>/{kernel, bias}``); a head in
    ``patch_heads`` reads the patch tokens, every other the pooled features."""

    num_classes: tuple[tuple[str, int], ...]
    patch_heads: tuple[str, ...] = ()

    @nn.compact
    def __call__(self, features: Array, patches: Array | None = None) -> dict[str, Array]:
        return {name: layers.Linear(n, axes=("embed", None), name=name)(
                    patches if name in self.patch_heads else features).astype(jnp.float32)
                for name, n in self.num_classes}


class VisionClassifier(nn.Module):
    """Vision tower [-> Mapping Layer] -> pool -> heads (see the module docstring).

    Attributes:
      vision_tower: a vision encoder returning :class:`EncoderOutput` from NHWC ``pixel_values``.
      num_classes: ``((head name, number of classes), ...)``; logits come in this order.
      pool: ``cls``, ``mean`` or ``pooled``.
      connector: the Mapping Layer settings of the VLM whose visual tokens are classified; None to classify
        the tower's own tokens.
      connector_width: the Mapping Layer's output width (the VLM's LM width).
      patch_heads: names of heads applied to every patch token instead of the pooled vector.
    """

    vision_tower: nn.Module
    num_classes: tuple[tuple[str, int], ...]
    pool: str = "cls"
    connector: ConnectorConfig | None = None
    connector_width: int = 0
    patch_heads: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_heads(self.num_classes, "num_classes")
        names = [n for n, _ in self.num_classes]
        unknown = [h for h in self.patch_heads if h not in names]
        if unknown:
            raise ConfigError(f"model.patch_heads: {', '.join(map(repr, unknown))} not among the heads "
                              f"({', '.join(names)})")
        if self.pool not in POOLS:
            raise ConfigError(f"model.pool={self.pool!r}; valid: {', '.join(POOLS)}")
        if self.connector is not None:
            if self.pool == "pooled":
                raise ConfigError("model.pool='pooled' reads the tower's pooled output; on a VLM's visual tokens "
                                  "use 'mean' or 'cls'")
            if self.pool == "cls" and self.connector.feature == "patches":
                raise ConfigError("model.pool='cls' on a VLM whose connector.feature='patches': its visual tokens "
                                  "hold no class token; use pool='mean'")
            if self.connector_width < 1:
                raise ConfigError(f"connector_width={self.connector_width}: must be >= 1 (the VLM's LM width)")
        super().__post_init__()

    @property
    def config(self) -> Any:
        """The tower's config (image size and channels: what :func:`registry.example_inputs` reads)."""
        return self.vision_tower.config

    @nn.compact
    def __call__(self, pixel_values: Array) -> ClassifierOutput:
        out = self.vision_tower(pixel_values)
        if self.connector is not None:
            c = self.connector
            feats = select_vision_features(out, c.feature, c.vision_layer)
            tokens = MappingLayer(c, self.connector_width, name="multi_modal_projector")(feats)
            features = tokens[:, 0] if self.pool == "cls" else tokens.mean(axis=1)
        else:
            tokens = out.last_hidden_state
            if self.pool == "cls":
                features = tokens[:, 0]
            elif self.pool == "mean":
                features = tokens[:, 1:].mean(axis=1)
            else:
                if out.pooled is None:
                    raise ConfigError("model.pool='pooled' but the tower has no pooled output (ViT: "
                                      "add_pooling_layer=False); use 'cls' or 'mean'")
                features = out.pooled
        # patch tokens: everything after the class token (a connector over patch features has none)
        has_cls = self.connector is None or self.connector.feature != "patches"
        patches = tokens[:, 1:] if has_cls else tokens
        logits = ClassifierHeads(self.num_classes, self.patch_heads, name="heads")(features, patches)
        return ClassifierOutput(logits=logits, features=features, tokens=tokens)
