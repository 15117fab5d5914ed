"""``run.py bench train`` on a tiny GPT-2: the result structure and ratios computed from the measured times.

No wall-clock assertions (the machine is shared); the trainable-parameter counts of both sides, counted by
each library, must agree, which checks that the PyTorch side trains the same parameters as ours.
"""

from __future__ import annotations

import pytest

from vlpeft_jax.benchmarks import train as bench_train
from vlpeft_jax.errors import ConfigError

TINY = ["--layers", "1", "--width", "32", "--heads", "2", "--vocab", "64", "--batch", "2", "--seq", "8",
        "--repeats", "2", "--warmup", "1"]


def test_bench_train_in_process_with_torch():
    out = bench_train.run(TINY + ["--methods", "lora,full", "--isolate", "none"])
    assert set(out) >= {"settings", "environment", "results", "memory_note", "skipped"}
    machine, threads = out["environment"]["machine"], out["environment"]["threads"]
    assert len(machine["load_average_before"]) == 3 and machine["wall_s"] > 0 and isinstance(machine["warnings"], list)
    assert threads["cores"] >= 1 and threads["torch_threads"] >= 1 and "XLA_FLAGS" in threads["environment"]
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
    assert out["settings"]["torch_device"] == "cpu" and out["settings"]["matmul_precision"] == "highest"
    assert lora["torch"]["device"] == "cpu" and lora["ours"]["device_peak_bytes"] is None  # CPU: no device peak


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
    with pytest.raises(ConfigError, match="--torch-device=cuda: PyTorch sees no CUDA"):
        bench_train.resolve_torch_device("cuda", "gpu", cuda_available=False)
    with pytest.raises(ConfigError, match="matmul-precision='bf16'"):
        bench_train.set_matmul_precision("bf16")


def test_accelerator_settings():
    """Where the PyTorch side runs, and the float32 precision both sides use (the GPU paths themselves need a GPU)."""
    import jax
    import torch

    assert bench_train.resolve_torch_device("auto", "cpu", cuda_available=True) == "cpu"
    assert bench_train.resolve_torch_device("auto", "gpu", cuda_available=True) == "cuda"
    assert bench_train.resolve_torch_device("auto", "gpu", cuda_available=False) == "cpu"
    assert bench_train.resolve_torch_device("auto", "tpu", cuda_available=True) == "cpu"
    assert bench_train.resolve_torch_device("cpu", "gpu", cuda_available=True) == "cpu"
    before = (jax.config.jax_default_matmul_precision, torch.backends.cuda.matmul.allow_tf32,
              torch.backends.cudnn.allow_tf32)
    try:
        bench_train.set_matmul_precision("tf32")
        assert jax.config.jax_default_matmul_precision == "tensorfloat32"
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        bench_train.set_matmul_precision("highest")
        assert jax.config.jax_default_matmul_precision == "highest"
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        jax.config.update("jax_default_matmul_precision", before[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[1:]


def test_bench_train_bfloat16_against_torch_autocast(capsys):
    """``--precision bfloat16``: both sides start from the same loss up to bfloat16 rounding (ours computes in
    bfloat16, PyTorch under autocast), and our parameters stay float32 (the trainable count is unchanged)."""
    out = bench_train.run(TINY + ["--methods", "lora", "--isolate", "none", "--precision", "bfloat16"])
    assert out["settings"]["precision"] == "bfloat16"
    lora = out["results"]["lora"]
    assert lora["ours"]["finite"] and lora["ours"]["trainable"] == lora["torch"]["trainable"] == 32 * 8 + 8 * 96
    assert lora["ours"]["compute_dtype"] == "bfloat16"  # the model computed in bfloat16, not float32 again
    # a log(64) ≈ 4.16 loss, bfloat16 logits (8 mantissa bits): well within 2 % of each other
    assert lora["ours"]["first_loss"] == pytest.approx(lora["torch"]["first_loss"], rel=0.02)
    assert "bfloat16 compute" in capsys.readouterr().out
