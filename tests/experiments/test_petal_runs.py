"""PETAL on InstructBLIP checkpoints (seed 001; issue: Vicuna/LLaMA and Flan-T5 LMs), end to end.

Tiny InstructBLIP checkpoints are written by transformers (tests/data/vlm_dirs.py, random weights). The
reference is transformers' ``InstructBlipForConditionalGeneration`` on its own processor's inputs: PETAL at
initialisation must give its logits (T2), and trained PETAL must move them. A `run.py train` of
``configs/instructblip_petal.py:smoke`` on a tiny COCO folder logs the IB terms and counts no estimator as
trainable; ``run.py params`` on the real shapes prints App. E's 1,056,768.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import run as cli
from tests.data import vlm_dirs
from tests.experiments.test_hf_vlm_runs import write_coco
from vlpeft_jax.data.shapes import CAPTION_INSTRUCTIONS
from vlpeft_jax.peft import base as pb
from vlpeft_jax.peft.petal import PETAL

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("petal_world")
    write_coco(root / "coco")
    return {"root": root, **{lm: vlm_dirs.instructblip_dir(root / f"iblip_{lm}", lm=lm, with_weights=True)
                             for lm in ("llama", "t5")}}


@pytest.mark.parametrize("lm", ["llama", "t5"])
def test_petal_at_init_gives_transformers_instructblip_logits(world, lm):
    """T2 against the reference: PETAL (DMA + AIM + gate) at init == the frozen InstructBLIP of transformers."""
    import torch
    from transformers import InstructBlipForConditionalGeneration

    from vlpeft_jax.hf import load_pretrained

    path, proc = world[lm]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), np.uint8))
    # one LM prompt length (rows of different lengths put LLaMA's left padding where transformers' forward
    # numbers positions differently: hf/blip2.py); the Q-Former texts differ in length
    inputs = proc(images=[image, image], text=["A photo of", "A photo of"], return_tensors="pt", padding=True)
    # PETAL's Q-Former text: the stacked Table 7 instructions (spec §3.2), different lengths per row
    q = proc.qformer_tokenizer(["\n".join(CAPTION_INSTRUCTIONS), CAPTION_INSTRUCTIONS[0]], return_tensors="pt",
                               padding=True)
    inputs["qformer_input_ids"], inputs["qformer_attention_mask"] = q["input_ids"], q["attention_mask"]
    if lm == "t5":
        inputs["decoder_input_ids"] = torch.tensor([[0, 5, 6], [0, 7, 8]])
    ref_model = InstructBlipForConditionalGeneration.from_pretrained(path).eval()
    with torch.no_grad():
        ref = ref_model(**inputs).logits.numpy()
    module, params = load_pretrained(path)
    x = {k: jnp.asarray(v.numpy()) for k, v in inputs.items()}
    x["pixel_values"] = x["pixel_values"].transpose(0, 2, 3, 1)
    petal = PETAL(rank=4, num_experts=3, expert_width=4, gate_width=4, ib_weight=0.0)
    p = petal.init(jax.random.key(0), params)
    ours = np.asarray(pb.apply_with(module.apply, [(petal, p)], {"params": params}, **x).logits)
    diff = float(np.abs(ours - ref).max())
    leaves, tree = jax.tree_util.tree_flatten(p)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    moved = jax.tree_util.tree_unflatten(tree, [v + 0.3 * jax.random.normal(k, v.shape)
                                                for v, k in zip(leaves, keys, strict=True)])
    effect = float(np.abs(np.asarray(pb.apply_with(module.apply, [(petal, moved)], {"params": params}, **x).logits)
                          - ref).max())
    print(f"InstructBLIP ({lm}): PETAL at init vs transformers max |logit diff| {diff:.2e}; trained-like PETAL "
          f"moves them by {effect:.2e}")
    assert diff < 1e-4 and effect > 100 * diff


def test_petal_run_on_an_instructblip_checkpoint(world, tmp_path, capsys):
    """`run.py train` of configs/instructblip_petal.py:smoke (Flan-T5 LM: the IB's Y from the decoder targets):
    the IB terms are logged, the estimators are not counted as trainable, captions are scored."""
    run_dir = tmp_path / "petal"
    capsys.readouterr()
    rc = cli.main(["train", "--config", "configs/instructblip_petal.py:smoke",
                   f"--config.model.hf_dir={world['t5'][0]}", f"--config.data.root={world['root'] / 'coco'}",
                   f"--config.run_dir={run_dir}"])
    err = capsys.readouterr().err
    assert rc == 0, err
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows and all("loss/ib" in r and "loss/ib_critic" in r for r in train_rows)
    assert all(np.isfinite(r["loss/ib"]) for r in train_rows)
    results = json.loads((run_dir / "results.json").read_text())
    assert "CIDEr-D" in results["adapted"]["val"]["metrics"]
    from vlpeft_jax.config import read_run_config
    from vlpeft_jax.experiments import runner

    setup, params = runner.load_final(run_dir, read_run_config(run_dir))
    petal, p = setup.methods["petal"], params["peft"]["petal"]
    assert "sib" in p and pb.count(p["sib"]) > 0
    stages, _ = runner.plan_stages(setup, params["peft"])
    assert runner.parameter_counts(params, setup, stages)["stages"]["adapt"]["trainable"] == petal.num_params(p)


def test_params_prints_app_e_count_on_real_shapes(capsys):
    """`run.py params` on InstructBLIP's real shapes (abstract): App. E's 1,056,768 beside our default's total."""
    capsys.readouterr()
    rc = cli.main(["params", "--config", "configs/instructblip_petal.py:counts"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| App. E subset (U, V, P + expert matrices) | 1,056,768 |" in out
    h_t, r, m, n = 768, 64, 64, 54
    ours = 1_056_768 + n * r + n + 2 * r + (2 * h_t * m + 2 * m)  # + p_n, Γ_n, λ, gate (W_x, W_y, bias, v)
    assert f"| PETAL total (adapter) | {ours:,} |" in out
