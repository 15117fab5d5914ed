"""The tiny InstructBLIP-like model on the shapes world: Q-Former text in the batches, the ``:smoke`` pretrain end
to end, and LoRA on the Q-Former's attention on top of it (the set-up PETAL and its baselines adapt)."""

from pathlib import Path

import jax
import numpy as np
import pytest

from vlpeft_jax import tasks
from vlpeft_jax.config import load_config_file
from vlpeft_jax.data import shapes
from vlpeft_jax.errors import ConfigError
from vlpeft_jax.experiments import runner
from vlpeft_jax.tasks.captioning import QFORMER_TEXTS, qformer_texts

ROOT = Path(__file__).resolve().parents[2]
PRETRAIN = str(ROOT / "configs/shapes_qformer_pretrain.py")


def smoke_config(shapes_caches, variant="smoke", **model):
    cfg = load_config_file(PRETRAIN, variant)
    cfg.data.cache_dir = str(shapes_caches["data"])
    cfg.pretrain.cache_dir = str(shapes_caches["pretrain"])
    cfg.model.update(model)
    return cfg


def as_decoded(text: str) -> str:
    """What the shapes tokenizer decodes ``text`` back to: lower case, lines joined by spaces."""
    return " ".join(text.split()).lower()


def expected(mode: str, instructions, task_line: str) -> str:
    return {"task": task_line, "instructions": "\n".join(instructions),
            "instructions+task": "\n".join([*instructions, task_line])}[mode]


@pytest.mark.parametrize("mode", QFORMER_TEXTS)
def test_batches_carry_the_chosen_qformer_text(shapes_caches, mode):
    cfg = smoke_config(shapes_caches, qformer_text=mode)
    task = tasks.build(cfg)
    tok = task.tokenizer
    instructions = task.world.config.caption_instructions
    batch = next(iter(task.train_batches(0).iterate(0, 1)))
    ids, mask = batch["qformer_input_ids"], batch["qformer_attention_mask"]
    assert ids.shape == mask.shape == (cfg.train.batch_size, 64) and ids.dtype == np.int32
    want = expected(mode, instructions, shapes.CAPTION_TASK_PROMPT)
    for row in range(len(ids)):
        assert mask[row].sum() == len(tok.encode(want))  # <bos> text <eos>, right-padded
        assert mask[row, 0] == 1 and (mask[row, :-1] >= mask[row, 1:]).all()
        assert tok.decode(ids[row][mask[row] > 0]) == as_decoded(want)
    # the helper gives the same texts; the words of the paragraph are all in the vocabulary
    examples = task.world["train"].caption_examples("source")[:2]
    assert qformer_texts(cfg, task.world, examples) == [want, want]
    assert not tok.unknown_words(want)
    # selection batches carry them too
    sel = next(iter(task.selection_batches({"num_batches": 1}, 0)))
    assert {"qformer_input_ids", "qformer_attention_mask", "pixel_values", "labels"} <= set(sel)

    # VQA: the question's task line; the VQA instruction set (with "color")
    vcfg = smoke_config(shapes_caches, "vqa,smoke", qformer_text=mode)
    vtask = tasks.build(vcfg)
    vbatches = vtask.train_batches(0)
    vb = next(iter(vbatches.iterate(0, 1)))
    for row, i in enumerate(vb["example_index"]):
        ex = vbatches.batches.examples[i]  # (the training questions: the source-style types)
        task_line = shapes.VQA_TASK_TEMPLATE.format(question=ex.question)
        want = expected(mode, vtask.world.config.vqa_instructions, task_line)
        got = vb["qformer_attention_mask"][row] > 0
        assert tok.decode(vb["qformer_input_ids"][row][got]) == as_decoded(want)
        # the LM's own text stays the task instruction and the answer
        lm_text = tok.decode(vb["input_ids"][row][vb["attention_mask"][row] > 0])
        assert lm_text == as_decoded(f"{task_line} {ex.answer}")


def test_generation_passes_qformer_text_at_the_prefill(shapes_caches, monkeypatch):
    from vlpeft_jax.eval import decode

    cfg = smoke_config(shapes_caches, qformer_text="instructions")
    task = tasks.build(cfg)
    seen = []

    class Out:
        def __init__(self, b):
            self.sequences = np.full((b, 2), task.tokenizer.eos_id, np.int32)
            self.lengths = np.ones((b,), np.int32)

    def fake_generate(step, params, inputs, mask, **kw):
        seen.append(inputs)
        return Out(inputs["input_ids"].shape[0])

    monkeypatch.setattr(decode, "generate", fake_generate)
    examples = task.world["val"].caption_examples("source")[:3]
    task.generate(None, None, [], examples)
    inputs = seen[0]
    assert {"input_ids", "pixel_values", "qformer_input_ids", "qformer_attention_mask"} == set(inputs)
    rows = np.asarray(inputs["qformer_input_ids"])
    mask = np.asarray(inputs["qformer_attention_mask"])
    want = as_decoded("\n".join(task.world.config.caption_instructions))
    assert [task.tokenizer.decode(r[m > 0]) for r, m in zip(rows[:3], mask[:3], strict=True)] == [want] * 3


def test_bad_qformer_text_settings(shapes_caches):
    with pytest.raises(ConfigError, match=r"model.qformer_text='voting'; valid: task, instructions, "
                                          r"instructions\+task"):
        tasks.build(smoke_config(shapes_caches, qformer_text="voting"))
    with pytest.raises(ConfigError, match="qformer_max_length=100; must be in 1..64"):
        tasks.build(smoke_config(shapes_caches, qformer_max_length=100))
    too_short = smoke_config(shapes_caches, qformer_text="instructions", qformer_max_length=8)
    with pytest.raises(ConfigError, match="model.qformer_max_length=8 is too short"):
        tasks.build(too_short).train_batches(0)
    prefix = load_config_file(str(ROOT / "configs/shapes_pretrain.py"), "smoke")
    prefix.model.qformer_text = "task"
    with pytest.raises(ConfigError, match="model.qformer_text is for model.family='qformer_vlm'"):
        tasks.build(prefix)


@pytest.mark.slow
def test_smoke_pretrain_end_to_end(shapes_caches, tmp_path):
    cfg = smoke_config(shapes_caches)
    cfg.run_dir = str(tmp_path / "run")
    results = runner.run(cfg)
    for domain in ("source", "target"):
        assert {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"} <= set(results["adapted"][domain]["metrics"])
    assert results["params"]["trainable_pct"] == 100.0
    assert np.isfinite(results["train"]["final_loss"])


@pytest.mark.slow
def test_lora_on_the_qformer_over_the_smoke_pretrain(shapes_caches, tmp_path, capsys):
    cfg = smoke_config(shapes_caches, qformer_text="instructions")  # PETAL's Q-Former input, on the task base
    cfg.name = "shapes_qformer_lora"
    cfg.run_dir = str(tmp_path / "run")
    cfg.pretrain.config = PRETRAIN + ":smoke"
    cfg.peft = {"lora": {"targets": [r"qformer/.*attention/(query|value)"], "rank": 4, "alpha": 8}}
    cfg.stages = [dict(name="lora", steps=3, trainable=[["peft/lora/.*", "lora"]],
                       optimizer=dict(name="adamw", learning_rate=3e-3, warmup_steps=0), methods=["lora"])]
    cfg.eval.metrics = ["BLEU-4", "CIDEr-D"]
    setup = runner.build(cfg)
    peft = runner.prepare_methods(setup, jax.random.key(0), abstract=True)
    lora_paths = {"/".join(k.key for k in path[:-1]) for path, _ in jax.tree_util.tree_leaves_with_path(peft["lora"])}
    # every Q-Former layer: self-attention query/value and cross-attention query/value (4 per layer, 2 layers)
    assert len(lora_paths) == 8 and all("qformer/encoder/layer_" in p for p in lora_paths)
    results = runner.run(cfg)
    assert 0 < results["params"]["trainable_pct"] < 5
    assert {"BLEU-4", "CIDEr-D"} <= set(results["adapted"]["target"]["metrics"])
    # the base was pretrained with the pretrain config's own Q-Former text ("task"), so a run feeding the task
    # instruction reuses the same cached base
    task_cfg = load_config_file(str(ROOT / "configs/shapes_qformer_pretrain.py"), "smoke")
    task_cfg.update({k: cfg[k] for k in ("data", "pretrain", "peft", "stages")})
    capsys.readouterr()
    runner.build(task_cfg)
    assert "reusing the pretrained base" in capsys.readouterr().out
    assert len(list(Path(shapes_caches["pretrain"]).glob("shapes_qformer_pretrain-*/params"))) == 1

