"""McNemar's test on paired predictions (CK-Transformer App. A.8 / App. Table 2).

The thesis (``shared/seeds/004_21d0d480fe4006f4.txt`` App. A.8) compares the paired predictions of a model
before and after adding facts with McNemar's test at alpha = 0.05 but does not say which variant. We follow
the spec's choice (``shared/specs/ckt.md`` §10 B14): with the discordant counts

    b = #(A correct, B wrong),   c = #(A wrong, B correct),

the p-value is the exact two-sided binomial test on the ``b + c`` discordant pairs when ``b + c < 25``,

    p = min(1, 2 * sum_{k <= min(b, c)} C(b + c, k) / 2^(b + c)),

else the chi-square test (1 degree of freedom) with continuity correction,

    chi2 = (|b - c| - 1)^2 / (b + c),   p = P(X^2_1 >= chi2) = erfc(sqrt(chi2 / 2)).

No discordant pair (identical correctness vectors) gives ``p = 1``.

Example:
    >>> import numpy as np
    >>> a = np.array([1] * 10 + [0] * 2 + [1] * 5, bool); b = np.array([0] * 10 + [1] * 2 + [1] * 5, bool)
    >>> r = mcnemar(a, b)
    >>> r["b"], r["c"], r["method"], round(r["p"], 4)
    (10, 2, 'exact', 0.0386)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from vlpeft_jax.errors import InputError

EXACT_BELOW = 25
"""Discordant-pair count below which the exact binomial test is used (spec B14)."""


def mcnemar_from_counts(b: int, c: int, exact_below: int = EXACT_BELOW) -> dict[str, Any]:
    """McNemar's test from the discordant counts ``b`` and ``c``.

    Returns:
      ``{"b", "c", "p", "method", "statistic"}``: ``method`` is ``"exact"`` (two-sided binomial; ``statistic``
      is ``min(b, c)``), ``"chi2"`` (continuity-corrected; ``statistic`` is the chi-square value) or ``"none"``
      when ``b + c == 0`` (``p = 1``).

    Example:
        >>> r = mcnemar_from_counts(30, 10)
        >>> r["method"], r["statistic"], round(r["p"], 5)
        ('chi2', 9.025, 0.00266)
    """
    for name, v in (("b", b), ("c", c)):
        if int(v) != v or v < 0:
            raise InputError(f"McNemar count {name}={v!r} must be a non-negative integer")
    b, c = int(b), int(c)
    n = b + c
    if n == 0:
        return {"b": b, "c": c, "p": 1.0, "method": "none", "statistic": 0.0}
    if n < exact_below:
        k = min(b, c)
        tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
        return {"b": b, "c": c, "p": min(1.0, 2.0 * tail), "method": "exact", "statistic": float(k)}
    stat = (abs(b - c) - 1.0) ** 2 / n
    return {"b": b, "c": c, "p": float(math.erfc(math.sqrt(stat / 2.0))), "method": "chi2", "statistic": stat}


def mcnemar(correct_a: np.ndarray | Sequence[bool], correct_b: np.ndarray | Sequence[bool],
            exact_below: int = EXACT_BELOW) -> dict[str, Any]:
    """McNemar's test of two models' per-example correctness on the same examples.

    Args:
      correct_a, correct_b: ``[n]`` booleans (or 0/1), whether model A / B got example i right.
      exact_below: use the exact binomial test when ``b + c`` is below this (spec B14: 25).

    Returns:
      ``{"b": #(A right, B wrong), "c": #(A wrong, B right), "p", "method", "statistic"}``, see
      :func:`mcnemar_from_counts`.

    Example:
        >>> mcnemar([True, False, True], [True, False, True])["p"]
        1.0
    """
    a = np.asarray(correct_a)
    bb = np.asarray(correct_b)
    if a.ndim != 1 or bb.shape != a.shape:
        raise InputError(f"McNemar needs two 1-D correctness vectors of the same length; got shapes {a.shape} "
                         f"and {bb.shape}")
    for name, v in (("correct_a", a), ("correct_b", bb)):
        if v.dtype != bool and not np.isin(v, (0, 1)).all():
            raise InputError(f"{name} must hold booleans or 0/1; got values {np.unique(v)[:5].tolist()}")
    a, bb = a.astype(bool), bb.astype(bool)
    return mcnemar_from_counts(int(np.sum(a & ~bb)), int(np.sum(~a & bb)), exact_below)
