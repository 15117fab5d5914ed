"""KLAFT through the experiment runner (``configs/shapes_klaft.py``): the full model (MAM top block with ITM and
MRM, TCM with TTM) trains with every loss term of Eq. 9 logged, decodes with the MAM block's own KV cache, and
reports r_TCM beside the caption metrics; the variants of the two sweeps all configure."""

import json

import numpy as np
import pytest

from vlpeft_jax.cli.config import apply_overrides, load_config_file
from vlpeft_jax.cli.params import count
from vlpeft_jax.experiments import runner

pytestmark = pytest.mark.slow


def test_klaft_run_logs_every_loss_term_and_reports_r_tcm(tmp_path, shapes_caches):
    cfg = load_config_file("configs/shapes_klaft.py", "klaft,smoke")
    cfg = apply_overrides(cfg, [f"--config.pretrain.cache_dir={shapes_caches['pretrain']}",
                                f"--config.data.cache_dir={shapes_caches['data']}"])
    cfg.run_dir = str(tmp_path / "klaft")
    cfg.eval.zero_shot = False
    cfg.eval.update(max_examples=4, max_new_tokens=4)
    results = runner.run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "klaft" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss/ttm" in r]
    assert logged, rows[:2]
    for row in logged:  # Eq. 9: the TCM likelihood plus 0.1 x each auxiliary term (config.loss_weights)
        want = row["task_loss"] + 0.1 * (row["loss/ttm"] + row["loss/mrm"] + row["loss/itm"])
        assert row["loss"] == pytest.approx(want, rel=1e-5)
        assert row["loss/mrm"] > 0 and np.isfinite(row["loss/itm"])
    for domain in ("target", "source"):
        r = results["adapted"][domain]["metrics"]["r_TCM"]
        assert 0.0 <= r <= 1.0
    assert "r_TCM" in (tmp_path / "klaft" / "report.md").read_text()


@pytest.mark.parametrize("sweep", ["table2", "table4"])
def test_every_sweep_variant_configures_and_counts(sweep, shapes_caches):
    from configs import shapes_klaft

    counts = {}
    for variant in shapes_klaft.SWEEPS[sweep]:
        cfg = load_config_file("configs/shapes_klaft.py", f"{variant},smoke")
        cfg = apply_overrides(cfg, [f"--config.data.cache_dir={shapes_caches['data']}"])
        runner.stages_from_config(cfg)  # the stages validate (e.g. a non-empty trainable list)
        counts[variant] = count(cfg)
    if sweep == "table4":
        # K topics: W_TZ (d x K) + the topic vectors ((K - 1) x d); no TCM / ω = 0 change the counts as expected
        tcm = {v: c["peft_total"] for v, c in counts.items()}
        assert tcm["k20"] - tcm["k5"] == 2 * 15 * 32  # d = 32 in the smoke model
        assert tcm["omega0"] == tcm["klaft"] and tcm["no_tcm"] < tcm["klaft"]
    else:
        assert counts["tcm"]["stages"]["tcm"]["trainable"] == 10 * 32 + 2 * 32 + 9 * 32
