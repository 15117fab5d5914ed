"""``run.py bench train`` on a tiny GPT-2: the result structure and ratios computed from the measured times.

No wall-clock assertions (the machine is shared); the trainable-parameter counts of both sides, counted by
each library, must agree, which checks that the PyTorch side trains the same parameters as ours.
"""

from __future__ import annotations

import pytest

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.train import bench_train

TINY = ["--layers", "1", "--width", "32", "--heads", "2", "--vocab", "64", "--batch", "2", "--seq", "8",
        "--repeats", "2", "--warmup", "1"]


def test_bench_train_in_process_with_torch():
    out = bench_train.run(TINY + ["--methods", "lora,full", "--isolate", "none"])
    assert set(out) >= {"settings", "environment", "results", "memory_note", "skipped"}
    assert out["settings"]["width"] == 32 and out["settings"]["methods"] == ["lora", "full"]
    lora, full = out["results"]["lora"], out["results"]["full"]
    for r in (lora, full):
        ours, torch_side, ratios = r["ours"], r["torch"], r["ratios"]
        assert len(ours["times_s"]) == 2 and len(torch_side["times_s"]) == 2 and len(r["pair_ratios"]) == 2
        assert ours["step_s"] > 0 and ours["xla_bytes"] > 0 and ours["finite"]
        assert ours["rss_bytes"] is None and torch_side["rss_bytes"] is None  # not measured in one process
        assert ours["trainable"] == torch_side["trainable"]
        assert ratios["torch_over_ours"] == pytest.approx(torch_side["step_s"] / ours["step_s"])
        assert ratios["torch_over_ours_min"] == pytest.approx(torch_side["step_min_s"] / ours["step_min_s"])
        pairs = [t / o for t, o in zip(torch_side["times_s"], ours["times_s"], strict=True)]
        assert r["pair_ratios"] == pytest.approx(pairs)
        assert ratios["torch_over_ours_pairs"] == pytest.approx(sum(pairs) / 2)  # the median of two
        # both sides trained the same model on the same tokens: the same loss before the first update
        assert ours["first_loss"] == pytest.approx(torch_side["first_loss"], rel=1e-4)
    assert lora["torch"]["uses_peft"] and not full["torch"]["uses_peft"]
    # LoRA r=8 on c_attn [32, 96]: A [32, 8] + B [8, 96] per layer
    assert lora["ours"]["trainable"] == 32 * 8 + 8 * 96
    assert lora["ratios"]["ours_over_full"] == pytest.approx(lora["ours"]["step_s"] / full["ours"]["step_s"])
    assert lora["ratios"]["ours_over_full_xla_bytes"] == pytest.approx(lora["ours"]["xla_bytes"]
                                                                       / full["ours"]["xla_bytes"])
    assert full["ratios"]["ours_over_full"] == 1.0


def test_bench_train_isolated_processes_report_rss():
    out = bench_train.run(TINY + ["--methods", "prompt", "--no-torch", "--threads", "1", "--memory-steps", "1"])
    prompt = out["results"]["prompt"]
    assert prompt["torch"] is None and prompt["ratios"]["torch_over_ours"] is None
    assert prompt["ratios"]["ours_over_full"] is None  # full fine-tuning was not measured
    assert prompt["ours"]["trainable"] == bench_train.VIRTUAL_TOKENS * 32
    assert prompt["ours"]["rss_bytes"] is not None and prompt["ours"]["rss_bytes"] > 0
    assert prompt["ours"]["alone_step_s"] > 0 and prompt["ours"]["xla_bytes"] > 0
    assert out["settings"]["threads"] == 1


def test_bench_train_bad_options():
    with pytest.raises(ConfigError, match="unknown 'lorra'"):
        bench_train.run(["--methods", "lorra"])
    with pytest.raises(ConfigError, match="--repeats=0"):
        bench_train.run(["--repeats", "0"])
