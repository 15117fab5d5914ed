"""GPS and gradient-selected NeuroAda through the experiment runner (``configs/shapes_sparse.py``).

The two train the same entries (the top-k ``|∇W|`` connections of every decoder projection, seed 004
§4.3.1): GPS updates them in place through masked optimizer updates (Eq. 4.5-4.6), NeuroAda through
zero-initialised deltas. With AdamW and no weight decay the two are the same optimisation, so their loss
curves must agree step by step; and GPS must change the base only at its selected entries.
"""

import json

import jax
import numpy as np
import pytest

import run as cli
from vlpeft_jax.cli.config import apply_overrides, load_config_file
from vlpeft_jax.errors import ConfigError
from vlpeft_jax.experiments import runner

pytestmark = pytest.mark.slow


def _config(variant, root, caches, **overrides):
    cfg = load_config_file("configs/shapes_sparse.py", f"{variant},smoke")
    cfg = apply_overrides(cfg, [f"--config.pretrain.cache_dir={caches['pretrain']}",
                                f"--config.data.cache_dir={caches['data']}"])
    cfg.run_dir = str(root / variant)
    cfg.eval.zero_shot = False
    cfg.eval.update(max_examples=2, max_new_tokens=3)
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shapes_caches):
    root = tmp_path_factory.mktemp("sparse_runs")
    out = {}
    for variant in ("gps", "gradient"):
        cfg = _config(variant, root, shapes_caches)
        out[variant] = (cfg, runner.run(cfg))
    return root, out


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def test_gps_equals_neuroada_with_the_same_gradient_selection(runs):
    root, out = runs
    gps, ada = _losses(root / "gps"), _losses(root / "gradient")
    assert len(gps) == len(ada) == 4
    np.testing.assert_allclose(gps, ada, rtol=1e-5)
    assert gps[-1] < gps[0]  # it trained
    assert out["gps"][1]["params"]["trainable"] == out["gradient"][1]["params"]["trainable"]


def test_gps_changes_only_its_selected_entries(runs):
    root, out = runs
    cfg = out["gps"][0]
    _, params = runner.load_final(root / "gps", cfg)
    _, ada_params = runner.load_final(root / "gradient", out["gradient"][0])
    base = ada_params["base"]  # NeuroAda leaves the (cached, pretrained) base unchanged
    changed = jax.tree.map(lambda a, b: np.asarray(a) != np.asarray(b), params["base"], base)
    # every changed entry is one NeuroAda selected (the same selection): indices [d_out, k] per kernel
    allowed = {}
    for kp, idx in jax.tree_util.tree_leaves_with_path(ada_params["peft"]["neuroada"]):
        names = [str(getattr(k, "key", k)) for k in kp]
        if names[-1] == "indices":
            allowed["/".join(names[:-1])] = np.asarray(idx)
    total_changed = 0
    for kp, c in jax.tree_util.tree_leaves_with_path(changed):
        names = [str(getattr(k, "key", k)) for k in kp]
        n = int(c.sum())
        if not n:
            continue
        path = "/".join(names[:-1])
        assert names[-1] == "kernel" and path in allowed, path
        mask = np.zeros_like(c)
        idx = allowed[path]
        mask[idx, np.arange(idx.shape[0])[:, None]] = True  # kernels are [in, out]; idx[out, k] are inputs
        assert not (c & ~mask).any(), path
        total_changed += n
    assert 0 < total_changed <= out["gps"][1]["params"]["trainable"]


def test_eval_reads_a_gps_run(runs):
    # (the gradient-selected NeuroAda run loads through the same path, test_gps_changes_only_its_selected_entries)
    root, _ = runs
    assert cli.main(["eval", "--run", str(root / "gps"), "--max-examples", "2"]) == 0


def test_gradient_selection_without_a_dataset_is_one_error(tmp_path, shapes_caches):
    for variant in ("gradient", "gps"):
        cfg = _config(variant, tmp_path, shapes_caches, selection={"num_batches": 0})
        with pytest.raises(ConfigError, match="needs a selection dataset"):
            runner.run(cfg)
    # (GPS is a method now: a stage naming a method that is not defined replaces the old `gps.stages` check)
    cfg = _config("gps", tmp_path, shapes_caches)
    cfg.stages[0]["methods"] = ["nope"]
    with pytest.raises(ConfigError, match="activates method.*'nope'.*not defined"):
        runner.run(cfg)
