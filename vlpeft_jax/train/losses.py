"""Causal language-modelling loss shared by the experiments and the benchmarks.

Labels follow the Hugging Face convention (``labels[:, t]`` is the token at position ``t``; ``-100`` is
ignored). The loss shifts the *labels* by one (:func:`shift_labels`) instead of slicing the logits
(``logits[:, :-1]``), which would copy the largest activation of a step; with the decoders'
``logits_to_keep`` the LM head runs only on the positions the loss reads.

Example:
    >>> import jax.numpy as jnp
    >>> logits = jnp.zeros((1, 3, 4))  # uniform predictions
    >>> loss, metrics = causal_lm_loss(logits, jnp.array([[1, 2, 3]]))
    >>> round(float(loss), 4)  # log(4): two predicted tokens, the last position has no target
    1.3863
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from vlpeft_jax.data.batching import IGNORE_INDEX
from vlpeft_jax.peft import base as pb

__all__ = ["IGNORE_INDEX", "causal_lm_loss", "lm_loss", "seq2seq_lm_loss", "shift_labels", "token_cross_entropy"]


def shift_labels(labels: jax.Array, ignore: int = IGNORE_INDEX) -> jax.Array:
    """``labels[:, 1:]`` with ``ignore`` appended: the target of every position of a causal LM's logits."""
    return jnp.pad(labels[:, 1:], ((0, 0), (0, 1)), constant_values=ignore)


def causal_lm_loss(logits: jax.Array, labels: jax.Array, ignore: int = IGNORE_INDEX
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean next-token cross-entropy (float32) over the labelled positions, and the token accuracy.

    Args:
      logits: ``[b, t, vocab]``, position ``i`` predicting token ``i + 1``.
      labels: ``[b, t]`` token ids, ``ignore`` where there is no target (prompt, padding).

    Returns:
      ``(loss, {"token_accuracy": ...})``; both are 0 when nothing is labelled.
    """
    return token_cross_entropy(logits, shift_labels(labels, ignore), ignore)


def seq2seq_lm_loss(logits: jax.Array, labels: jax.Array, ignore: int = IGNORE_INDEX
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """An encoder-decoder's loss: the decoder's logits at position ``i`` predict ``labels[:, i]`` (the decoder
    inputs are the labels shifted right behind the start token, so nothing is shifted here); otherwise as
    :func:`causal_lm_loss`."""
    return token_cross_entropy(logits, labels, ignore)


def token_cross_entropy(logits: jax.Array, targets: jax.Array, ignore: int = IGNORE_INDEX
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy (float32) of ``logits [b, t, vocab]`` against ``targets [b, t]`` where they are not
    ``ignore``, and the token accuracy; both 0 when nothing is labelled."""
    valid = targets != ignore
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, targets, 0))
    n = jnp.maximum(valid.sum(), 1)
    loss = jnp.where(valid, ce, 0.0).sum() / n
    acc = jnp.where(valid, logits.argmax(-1) == targets, False).sum() / n
    return loss, {"token_accuracy": acc}


def lm_loss(module: Any, methods: Sequence[tuple[str, Any]]) -> Callable[..., tuple[jax.Array, dict]]:
    """A text-only loss function ``(params, batch, rng) -> (loss, {})`` for the benchmarks: causal-LM
    cross-entropy (mean over the ``t - 1`` predicted tokens of ``batch["input_ids"]``) with ``methods``
    (``(name, method)`` pairs, ``params["peft"][name]``) active over ``params["base"]``.

    Positions a method adds in front of the sequence (prompt tuning) get no logits (``logits_to_keep``), as
    peft's labels of -100 ignore them.
    """

    def loss_fn(params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
        ids = batch["input_ids"]
        active = [(m, params["peft"][n]) for n, m in methods]
        out = pb.apply_with(module.apply, active, {"params": params["base"]}, ids, batch["attention_mask"],
                            rng=rng, train=True, logits_to_keep=ids.shape[1])
        return causal_lm_loss(out.logits, ids)[0], {}

    return loss_fn
