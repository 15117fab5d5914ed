"""``run.py bench mtl`` at tiny shapes: the result structure, and ratios that are positive finite numbers computed
from the measured times and XLA's memory analysis. No wall-clock assertions (the machine is shared)."""

from __future__ import annotations

import math
import statistics

import pytest

from vlpeft_jax.benchmarks import mtl as bench_mtl
from vlpeft_jax.cli.bench import BENCHMARKS
from vlpeft_jax.errors import ConfigError

RATIO_KEYS = ("time", "time_q1", "time_q3", "time_of_medians", "peak_bytes", "temp_bytes")


def _check_ratios(r: dict) -> None:
    for key in RATIO_KEYS:
        value = r[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    assert r["time_q1"] <= r["time"] <= r["time_q3"]


def test_registered_in_cli():
    assert BENCHMARKS["mtl"] == "vlpeft_jax.benchmarks.mtl"


def test_compare_and_summary_by_hand():
    a = {"times_s": [2.0, 6.0, 3.0], "median_s": 3.0, "peak_bytes": 300, "temp_bytes": None}
    b = {"times_s": [1.0, 2.0, 3.0], "median_s": 2.0, "peak_bytes": 100, "temp_bytes": 50}
    r = bench_mtl.compare(a, b)
    assert r["time"] == 2.0 and r["time_q1"] == 1.5 and r["time_q3"] == 2.5  # pairs 2, 3, 1
    assert r["time_of_medians"] == 1.5 and r["peak_bytes"] == 3.0 and r["temp_bytes"] is None
    s = bench_mtl.time_summary([4.0, 1.0, 2.0, 3.0])
    assert (s["median_s"], s["min_s"], s["q1_s"], s["q3_s"]) == (2.5, 1.0, 1.75, 3.25)


def test_bench_mtl_tiny():
    out = bench_mtl.run(["--tiny", "--steps", "2", "--warmup", "1", "--methods", "ls", "--sparse", "both"])
    assert set(out) >= {"settings", "model", "sparse_training", "environment", "results", "ratios", "skipped",
                        "memory_note", "compile_s"}
    assert out["settings"]["methods"] == ["ls"] and out["settings"]["batch_size"] == bench_mtl.TINY_BATCH
    assert out["model"]["tasks"] == ["count", "dominant_color", "position", "patch_shape"]
    env = out["environment"]
    assert len(env["load_average_before"]) == 3 and len(env["load_average_after"]) == 3
    assert env["threads"]["cores"] >= 1 and "XLA_FLAGS" in env["threads"]["environment"]
    assert env["backend"] == "cpu" and env["cores_usable"] >= 1
    st = out["sparse_training"]
    assert st["mask_mode"] == "pre" and st["k"] >= 1 and 0.2 < st["trainable_fraction"] < 0.4

    steps, strategies = out["results"]["steps"], out["results"]["strategies"]
    assert list(steps) == ["plain", "plain+st", "ls", "ls+st"]
    assert list(strategies) == ["vjp", "jacrev", "loop"]
    for r in (*steps.values(), *strategies.values()):
        assert len(r["times_s"]) == 2 and r["median_s"] == statistics.median(r["times_s"])
        assert r["peak_bytes"] > 0 and r["temp_bytes"] >= 0 and math.isfinite(r["final_loss"])
    assert [steps[n]["sparse"] for n in steps] == [False, True, False, True]

    ratios = out["ratios"]
    for name, r in ratios["steps"].items():
        _check_ratios(r)
        pairs = [a / b for a, b in zip(steps[name]["times_s"], steps["plain"]["times_s"], strict=True)]
        assert r["time"] == pytest.approx(statistics.median(pairs))
        assert r["peak_bytes"] == pytest.approx(steps[name]["peak_bytes"] / steps["plain"]["peak_bytes"])
        assert ("vs_plain_st" in r) == steps[name]["sparse"]
        if steps[name]["sparse"]:
            _check_ratios(r["vs_plain_st"])
    assert ratios["steps"]["plain"]["time"] == 1.0 and ratios["steps"]["plain"]["peak_bytes"] == 1.0
    for r in ratios["strategies"].values():
        _check_ratios(r["vs_vjp"])
        _check_ratios(r["vs_plain"])
    assert ratios["strategies"]["vjp"]["vs_vjp"]["time"] == 1.0
    # the MTL step holds the [T, P] Jacobian: more temporary memory than the plain step's single gradient
    assert ratios["steps"]["ls"]["temp_bytes"] > 1.0


def test_bench_mtl_bad_options():
    with pytest.raises(ConfigError, match="unknown 'pcgrd'"):
        bench_mtl.run(["--methods", "pcgrd"])
    with pytest.raises(ConfigError, match="--steps=0"):
        bench_mtl.run(["--steps", "0"])
    with pytest.raises(ConfigError, match="--fraction=1.5"):
        bench_mtl.run(["--fraction", "1.5"])
