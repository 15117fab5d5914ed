"""``run.py analyze rank`` (seed 002 §2.3 Eq. 1-5, Table 1) over two smoke runs: prefix tuning (base untouched)
and full fine-tuning (base trained). Features against per-example unpadded forward passes, the ratios against a
numpy SVD of those, the pre-trained column, the refusals and the files."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from vlpeft_jax.cli.config import apply_overrides, load_config_file
from vlpeft_jax.data.batching import example_image
from vlpeft_jax.errors import ConfigError
from vlpeft_jax.experiments import rank_runs, runner
from vlpeft_jax.peft import base as peft_base

N = 4  # val images used (the smoke world has 8): batches of 3 leave a padded last batch



@pytest.fixture(scope="module")
def runs(tmp_path_factory, shapes_caches):
    root = tmp_path_factory.mktemp("rank_runs")
    out = {}
    for variant in ("prefix", "only_full"):
        cfg = load_config_file("configs/shapes_ptpeft.py", f"{variant},smoke")
        cfg = apply_overrides(cfg, [f"--config.pretrain.cache_dir={shapes_caches['pretrain']}",
                                    f"--config.data.cache_dir={shapes_caches['data']}",
                                    "--config.eval.max_examples=1", "--config.eval.max_new_tokens=1",
                                    '--config.eval.metrics=["BLEU-4"]'])
        cfg.run_dir = str(root / variant)
        runner.run(cfg)
        out[variant] = root / variant
    return out


@pytest.fixture(scope="module")
def prefix_run(runs):
    return rank_runs.load_run(runs["prefix"])


def _unpadded(setup, params, methods, indices, domain="target"):
    """Per example, one forward pass of exactly ``<bos> caption <eos>`` with its image (no padding, no batching):
    the last hidden state split into visual-token rows and text rows."""
    task = setup.task
    tok = task.tokenizer
    examples = task.world["val"].caption_examples(domain)
    active = [(m, params["peft"][name]) for name, m in methods]
    out = []
    for i in indices:
        ex = examples[i]
        ids = [tok.token_to_id("<bos>"), *tok.encode(ex.captions[0], add_special_tokens=False),
               tok.token_to_id("<eos>")]
        pixels = task.preprocessor.normalize(example_image(ex, task.preprocessor)[None])
        h = peft_base.apply_with(setup.module.apply, active, {"params": params["base"]},
                                 input_ids=jnp.asarray([ids]), attention_mask=jnp.ones((1, len(ids)), jnp.int32),
                                 pixel_values=jnp.asarray(pixels)).hidden_states[-1][0]
        v = setup.module.num_image_tokens
        out.append((np.asarray(h[:v]), np.asarray(h[v:])))
    return out


def _numpy_curve(features, mask, threshold=0.9):
    """Eq. 2-5 and Table 1's ratio by numpy: SVD of each sample's real rows, normalised, zero-filled to
    ``M = min(rows, d)`` values, averaged, accumulated; the smallest k reaching the threshold over M."""
    width = min(features.shape[1:])
    rows = []
    for f, m in zip(features, mask, strict=True):
        s = np.linalg.svd(f[m].astype(np.float64), compute_uv=False)
        rows.append(np.pad(s / s.sum(), (0, width - len(s))))
    y = np.cumsum(np.mean(rows, axis=0))
    return (int(np.argmax(y >= threshold - 1e-6)) + 1) / width, y


def test_features_match_unpadded_passes_and_batch_size(prefix_run):
    _, setup, params = prefix_run
    f3 = rank_runs.capture_features(setup, params, "val", N, 3)  # rows 3..: a last batch with 2 padding rows
    f4 = rank_runs.capture_features(setup, params, "val", N, 4)
    d = setup.module.language_model.config.hidden_size
    v = setup.module.num_image_tokens
    tok = setup.task.tokenizer
    lengths = [len(tok.encode(ex.captions[0], add_special_tokens=False)) + 2
               for ex in setup.task.world["val"].caption_examples("target")[:N]]
    assert f3.text.shape == (N, max(lengths), d) and f3.image.shape == (N, v, d)
    assert f3.text_mask.sum(1).tolist() == lengths and f3.image_mask.all()
    assert all(f3.text_mask[i, :n].all() for i, n in enumerate(lengths))  # right padding: real rows first
    np.testing.assert_allclose(f3.text, f4.text, atol=2e-5)
    np.testing.assert_allclose(f3.image, f4.image, atol=2e-5)
    assert [n for n, _ in setup.active()] == ["prefix"]
    (img, txt), = _unpadded(setup, params, setup.active(), (3,))  # the row of the padded last batch, by hand
    np.testing.assert_allclose(f3.image[3], img, atol=2e-5)
    np.testing.assert_allclose(f3.text[3, :lengths[3]], txt, atol=2e-5)
    with pytest.raises(ConfigError, match="split='nope'"):
        rank_runs.capture_features(setup, params, "nope", N, 4)
    with pytest.raises(ConfigError, match="domain="):
        rank_runs.capture_features(setup, params, "val", N, 4, domain="styled")


def test_main_table_files_and_pretrained_column(runs, prefix_run, tmp_path, capsys):
    """The table through ``main``: the pre-trained column is the prefix run's base with its methods removed, each
    column's ratios and curves are numpy's SVD of the features, and the files are written."""
    out = tmp_path / "out"
    assert rank_runs.main(["--run", str(runs["prefix"]), "--run", str(runs["only_full"]), "--label", "PT",
                           "--label", "FT", "--pretrained", str(runs["prefix"]), "--max-examples", str(N),
                           "--batch-size", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "rank.json").read_text())
    assert data["columns"] == ["pre-trained", "PT", "FT"]
    rows = data["rows"]
    assert rows["pre-trained"]["methods"] == [] and rows["PT"]["methods"] == ["prefix"] and rows["FT"]["methods"] == []
    assert data["settings"]["num_samples"] == N and data["settings"]["split"] == "val"

    _, setup, params = prefix_run
    bare = rank_runs.capture_features(setup, params, "val", N, 3, methods=())
    (img, txt), = _unpadded(setup, params, (), (1,))  # the bare base, by hand
    np.testing.assert_allclose(bare.image[1], img, atol=2e-5)
    np.testing.assert_allclose(bare.text[1, :len(txt)], txt, atol=2e-5)
    full_setup, full_params = rank_runs.load_run(runs["only_full"])[1:]
    for col, feats in (("pre-trained", bare), ("PT", rank_runs.capture_features(setup, params, "val", N, 3)),
                       ("FT", rank_runs.capture_features(full_setup, full_params, "val", N, 3))):
        for kind in ("text", "image"):
            ratio, y = _numpy_curve(getattr(feats, kind), getattr(feats, f"{kind}_mask"))
            assert rows[col][kind]["effective_rank"] == ratio, (col, kind)
            np.testing.assert_allclose(rows[col][kind]["curve"], y, atol=1e-5)
            assert rows[col][kind]["num_samples"] == N
    # the prefix and full fine-tuning change the features: their columns are not the base's
    for col in ("PT", "FT"):
        assert not np.allclose(rows[col]["text"]["curve"], rows["pre-trained"]["text"]["curve"], atol=1e-6)

    lines = (out / "rank.md").read_text().splitlines()
    assert lines[0] == "| features | pre-trained | PT | FT |"
    text_row = "| text | " + " | ".join(f"{100 * rows[c]['text']['effective_rank']:.1f} %" for c in data["columns"])
    assert lines[2] == text_row + " |" and lines[2] in printed and lines[3].startswith("| image | ")
    assert (out / "rank_text.png").stat().st_size > 0 and (out / "rank_image.png").stat().st_size > 0
    with pytest.raises(ConfigError, match="--max-examples 0"):
        rank_runs.main(["--run", str(runs["prefix"]), "--max-examples", "0", "--out", str(out)])


def test_refusals(runs, tmp_path):
    with pytest.raises(ConfigError, match=r"trained base parameters \(stage 'full': rule 'base/\.\*'"):
        rank_runs.rank_table([runs["prefix"]], pretrained=runs["only_full"], max_examples=N)
    # a config that says nothing about base training, but a saved final/base: refused as well
    fake = tmp_path / "fake"
    shutil.copytree(runs["prefix"], fake, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    shutil.copytree(runs["only_full"] / "final" / "base", fake / "final" / "base")
    with pytest.raises(ConfigError, match="final/base was saved"):
        rank_runs.check_pretrained(fake, rank_runs.read_run_config(fake))
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(runs["prefix"] / "config.json", unfinished / "config.json")
    with pytest.raises(ConfigError, match="has no final parameters"):
        rank_runs.rank_table([runs["prefix"], unfinished])
    with pytest.raises(ConfigError, match="has no final parameters"):
        rank_runs.load_run(unfinished)  # runner.load_final's own error
    with pytest.raises(ConfigError, match="not a run directory"):
        rank_runs.rank_table([tmp_path / "missing"])
    with pytest.raises(ConfigError, match="one label per run"):
        rank_runs.rank_table([runs["prefix"]], labels=["a", "b"])
    with pytest.raises(ConfigError, match="repeat"):
        rank_runs.rank_table([runs["prefix"], runs["only_full"]], labels=["a", "a"])
