"""``run.py bench remat`` at toy shapes: the result structure, every policy's step, the same first loss (same
weights, same batch) and ratios derived from the measured times. No wall-clock assertions."""

from __future__ import annotations

import pytest

from vlpeft_jax.benchmarks import remat as bench_remat
from vlpeft_jax.errors import ConfigError

TINY = ["--layers", "2", "--width", "32", "--heads", "2", "--vocab", "64", "--batch", "2", "--seq", "8",
        "--repeats", "2", "--warmup", "1"]


def test_bench_remat_toy_shapes(capsys):
    out = bench_remat.run(TINY + ["--methods", "lora", "--policies", "dots_no_batch"])  # two compiles
    printed = capsys.readouterr().out
    assert "temp MiB" in printed and "machine: load average" in printed
    assert out["settings"]["policies"] == ["none", "dots_no_batch"]  # none is always the reference
    assert len(out["environment"]["machine"]["load_average_before"]) == 3
    assert out["environment"]["threads"]["cores"] >= 1
    assert sorted(out["results"]) == ["lora"]
    lora = out["results"]["lora"]
    for per_policy in (lora,):
        assert sorted(per_policy) == ["dots_no_batch", "none"]
        ref = per_policy["none"]
        for policy, r in per_policy.items():
            assert len(r["times_s"]) == 2 and r["median_s"] > 0 and r["temp_bytes"] > 0
            assert r["xla_bytes"] > r["temp_bytes"]
            assert r["first_loss"] == pytest.approx(ref["first_loss"], rel=1e-5), policy  # remat changes no value
            pairs = sorted(a / b for a, b in zip(r["times_s"], ref["times_s"], strict=True))
            assert r["over_none"]["median"] == pytest.approx(sum(pairs) / 2)
        assert per_policy["none"]["over_none"]["median"] == pytest.approx(1.0)
    # LoRA r=8 on c_attn [32, 96] in two layers
    assert lora["none"]["trainable"] == lora["dots_no_batch"]["trainable"] == 2 * (32 * 8 + 8 * 96)


def test_bench_remat_rejects_bad_flags():
    with pytest.raises(ConfigError, match="bogus"):
        bench_remat.run(TINY + ["--policies", "bogus"])
    with pytest.raises(ConfigError, match="--repeats=0"):
        bench_remat.run(TINY[:-4] + ["--repeats", "0"])
