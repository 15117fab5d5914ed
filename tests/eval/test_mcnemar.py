"""McNemar's test (spec ckt.md §10 B14, §12 test 12) against hand computations and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vlpeft_jax.errors import InputError
from vlpeft_jax.eval.mcnemar import mcnemar, mcnemar_from_counts


def _vectors(b: int, c: int, both: int = 3, neither: int = 4) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([1] * b + [0] * c + [1] * both + [0] * neither, bool)
    bb = np.array([0] * b + [1] * c + [1] * both + [0] * neither, bool)
    return a, bb


def test_exact_by_hand():
    r = mcnemar(*_vectors(10, 2))
    assert (r["b"], r["c"], r["method"]) == (10, 2, "exact")
    # 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 * 79 / 4096
    assert r["p"] == pytest.approx(2 * 79 / 4096)
    assert round(r["p"], 4) == 0.0386
    # symmetric in the two models
    r2 = mcnemar(*_vectors(10, 2)[::-1])
    assert (r2["b"], r2["c"]) == (2, 10) and r2["p"] == pytest.approx(r["p"])
    # balanced discordance: the two-sided tail exceeds 1 and is clipped
    assert mcnemar_from_counts(3, 3)["p"] == 1.0


def test_exact_against_scipy_binomtest():
    stats = pytest.importorskip("scipy.stats")
    for b, c in [(0, 5), (7, 1), (12, 12), (20, 4)]:
        r = mcnemar_from_counts(b, c)
        assert r["method"] == "exact"
        assert r["p"] == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_chi2_branch_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    for b, c in [(30, 10), (13, 12), (100, 70), (5, 40)]:
        r = mcnemar(*_vectors(b, c))
        assert r["method"] == "chi2"
        stat = (abs(b - c) - 1) ** 2 / (b + c)
        assert r["statistic"] == pytest.approx(stat)
        assert r["p"] == pytest.approx(stats.chi2.sf(stat, 1), rel=1e-9)
    # the threshold: b + c = 24 is exact, 25 is chi-square
    assert mcnemar_from_counts(20, 4)["method"] == "exact"
    assert mcnemar_from_counts(20, 5)["method"] == "chi2"
    assert mcnemar_from_counts(20, 5)["p"] == pytest.approx(math.erfc(math.sqrt((14**2 / 25) / 2)))


def test_identical_vectors_give_one():
    a = np.array([1, 0, 1, 1, 0], bool)
    r = mcnemar(a, a.copy())
    assert (r["b"], r["c"], r["p"]) == (0, 0, 1.0)
    assert mcnemar([1, 1, 0], [1, 1, 0])["p"] == 1.0


def test_bad_input():
    with pytest.raises(InputError, match="same length"):
        mcnemar([1, 0, 1], [1, 0])
    with pytest.raises(InputError, match="0/1"):
        mcnemar([1, 2, 1], [1, 0, 1])
    with pytest.raises(InputError, match="non-negative"):
        mcnemar_from_counts(-1, 3)
