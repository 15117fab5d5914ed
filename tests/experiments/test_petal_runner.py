"""PETAL on the shapes world (configs/shapes_petal.py; seed 001 Tables 1-4, Fig. 3): every variant and baseline
builds and counts on abstract shapes with the paper's parameter ordering, the sweeps plan (VQA included), and a
smoke run trains PETAL with its IB terms logged and its estimators left out of the trainable count."""

from __future__ import annotations

import json

import pytest

from configs import shapes_petal
from vlpeft_jax.cli import params as params_cli
from vlpeft_jax.config import load_config_file
from vlpeft_jax.errors import ConfigError
from vlpeft_jax.experiments import runner, sweep


def trainable(variant: str) -> int:
    cfg = load_config_file("configs/shapes_petal.py", variant)
    return params_cli.count(cfg)["stages"]["adapt"]["trainable"]


@pytest.fixture(scope="module")
def counts():
    return {v: trainable(v) for v in ("petal", "v1", "v2", "v3", "v4", "core_cp", "lora", "head", "full")}


def test_parameter_ordering_and_ablation_counts(counts):
    """Seed 001 §6 ordering 5 at our scale: PETAL < LoRA (same matrices) < head < full Q-Former; the ablations
    differ by exactly their parts (estimators never counted: V2 == full PETAL)."""
    assert counts["petal"] < counts["lora"] < counts["head"] < counts["full"]
    assert counts["v2"] == counts["petal"]  # λ_IB = 0 removes only the (uncounted) estimators
    assert counts["v1"] == counts["v3"]
    h, r, m, k, d_g, n = 64, 8, 8, 3, 8, 12  # Q-Former width, R, M, K, gate width, adapted matrices
    experts_and_gate = k * 2 * h * m + 2 * h * d_g + 2 * d_g
    assert counts["petal"] - counts["v1"] == experts_and_gate
    assert counts["petal"] - counts["v4"] == n  # one Γ per matrix
    assert counts["petal"] - counts["core_cp"] == 2 * r ** 3  # the two R×R×R cores
    assert counts["lora"] == sum(r * (d_in + h) for d_in in [h] * 8 + [96] * 4)  # txt inputs 64, image 96


def test_sweeps_plan_every_variant(tmp_path):
    for name, variants in shapes_petal.SWEEPS.items():
        planned = sweep.plan_sweep("configs/shapes_petal.py", name, [0], tmp_path / name)
        assert [p.variant for p in planned] == variants
        metric, metrics, groups = sweep._task_metrics(planned, None)
        assert metric == ("VQA accuracy" if name in ("table2", "fig3") else "CIDEr-D"), name
        assert groups


def test_bad_options():
    with pytest.raises(ConfigError, match="captioning only"):
        load_config_file("configs/shapes_petal.py", "petal,vqa,n=50")
    with pytest.raises(ConfigError):
        load_config_file("configs/shapes_petal.py", "petal_v9")


@pytest.mark.slow
def test_petal_smoke_run_logs_ib_and_counts_the_adapter_only(tmp_path, shapes_caches):
    cfg = load_config_file("configs/shapes_petal.py", "petal,smoke")
    cfg.data.cache_dir = str(shapes_caches["data"])  # the session's world and bases (cached by content)
    cfg.pretrain.cache_dir = str(shapes_caches["pretrain"])
    cfg.eval.zero_shot = False  # what this test checks is training and the adapted model
    cfg.eval.update(max_examples=4, max_new_tokens=4)
    cfg.run_dir = str(tmp_path / "petal")
    results = runner.run(cfg)
    assert "CIDEr-D" in results["adapted"]["target"]["metrics"]
    rows = [json.loads(line) for line in (tmp_path / "petal" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows and all("loss/ib" in r and "loss/ib_critic" in r for r in train_rows)
    assert not (tmp_path / "petal" / "final" / "base").exists()  # the frozen model did not change (T8)
    setup, p = runner.load_final(tmp_path / "petal", cfg)
    petal = setup.methods["petal"]
    stages, _ = runner.plan_stages(setup, p["peft"])
    assert runner.parameter_counts(p, setup, stages)["stages"]["adapt"]["trainable"] == petal.num_params(
        p["peft"]["petal"])
