"""End to end on real-format data and Hugging Face checkpoints: `run.py train`, `eval`, `export` and `generate`.

Tiny LLaVA (LLaMA LM) and InstructBLIP (LLaMA and Flan-T5 LMs) checkpoints are written by transformers
(tests/data/vlm_dirs.py, random weights), beside tiny COCO-captions and VQAv2 folders in the official file
layouts. The references are transformers itself: `generate` of the torch models on the inputs of the
transformers processors, and peft's `PeftModel` with the exported adapter.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import run as cli
from tests.data import vlm_dirs

pytestmark = pytest.mark.slow

CAPTIONS = ["a red cat", "a blue dog", "two cats", "a small green photo", "the dog is big", "a cat on a dog"]
QUESTIONS = [("what color is the cat ?", "red", "other"), ("is there a dog ?", "yes", "yes/no"),
             ("how many cats are there ?", "two", "number"), ("is it a photo ?", "no", "yes/no")]


def write_coco(root, n=6, seed=0):
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        (root / split).mkdir()
        images, anns = [], []
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (20 + 3 * i, 30, 3), dtype=np.uint8)).save(root / split / f"{i}.jpg")
            images.append({"id": i, "file_name": f"{i}.jpg"})
            anns += [{"image_id": i, "id": 10 * i + k, "caption": CAPTIONS[(i + k) % len(CAPTIONS)]} for k in range(2)]
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps({"images": images,
                                                                              "annotations": anns}))


def write_vqav2(root, seed=1):
    rng = np.random.default_rng(seed)
    for split in ("train2014", "val2014"):
        (root / split).mkdir(parents=True)
        questions, anns = [], []
        for i, (q, a, kind) in enumerate(QUESTIONS):
            image_id = i + 1
            Image.fromarray(rng.integers(0, 255, (24, 20 + i, 3), dtype=np.uint8)).save(
                root / split / f"COCO_{split}_{image_id:012d}.jpg")
            questions.append({"question_id": 100 + i, "image_id": image_id, "question": q})
            anns.append({"question_id": 100 + i, "image_id": image_id, "answer_type": kind,
                         "multiple_choice_answer": a, "answers": [{"answer": a, "answer_id": k} for k in range(10)]})
        (root / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps(
            {"data_subtype": split, "questions": questions}))
        (root / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps({"annotations": anns}))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_world")
    write_coco(root / "coco")
    write_vqav2(root / "vqa")
    llava, llava_proc = vlm_dirs.llava_dir(root / "llava", with_weights=True)
    iblip, iblip_proc = vlm_dirs.instructblip_dir(root / "iblip", with_weights=True)
    return {"root": root, "llava": llava, "llava_proc": llava_proc, "iblip": iblip, "iblip_proc": iblip_proc}


def run_cli(argv, capsys):
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def llava_run(world, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "llava"
    rc = cli.main(["train", "--config", "configs/llava_lora.py:smoke,vision", f"--config.model.hf_dir={world['llava']}",
                   f"--config.data.root={world['root'] / 'coco'}", f"--config.run_dir={run_dir}",
                   "--config.stages.0.optimizer.learning_rate=0.05"])  # (so that 3 steps move the adapters)
    assert rc == 0
    return run_dir


def test_llava_captioning_run_reports_caption_metrics(llava_run):
    results = json.loads((llava_run / "results.json").read_text())
    assert results["task"] == "captioning"
    metrics = results["adapted"]["val"]["metrics"]
    assert set(metrics) >= {"BLEU-4", "ROUGE-L", "CIDEr-D"}
    assert results["train"]["steps"] == 3 and np.isfinite(results["train"]["final_loss"])
    captions = json.loads((llava_run / "captions_adapted.json").read_text())
    assert sorted(c["image_id"] for c in captions) == [0, 1, 2, 3]  # eval.max_examples=4 of the val split
    saved = json.loads((llava_run / "checkpoint.json").read_text())
    assert saved["model_type"] == "llava" and saved["num_image_tokens"] == 4


def test_llava_eval_rescores_the_run(llava_run, capsys):
    rc, out, err = run_cli(["eval", "--run", llava_run], capsys)
    assert rc == 0, err
    folder = llava_run / "eval-val-greedy-t4-n4"
    metrics = json.loads((folder / "metrics.json").read_text())
    trained = json.loads((llava_run / "results.json").read_text())["adapted"]["val"]["metrics"]
    assert metrics["val"]["metrics"]["CIDEr-D"] == pytest.approx(trained["CIDEr-D"])


def test_llava_export_loads_in_peft_with_equal_logits(world, llava_run, tmp_path, capsys):
    """The run's LoRA (LM and vision tower) exported in peft format, loaded with PeftModel onto the torch LLaVA:
    its logits equal ours for the run's adapted parameters."""
    import torch
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    out = tmp_path / "adapter"
    rc, _, err = run_cli(["export", "--run", llava_run, "--format", "peft", "--out", out], capsys)
    assert rc == 0, err
    from safetensors.numpy import load_file

    keys = list(load_file(out / "adapter_model.safetensors"))
    assert any(".vision_tower." in k for k in keys) and any(".language_model." in k for k in keys)
    proc = world["llava_proc"]
    images = [Image.open(world["root"] / "coco" / "val2017" / f"{i}.jpg").convert("RGB") for i in (0, 1)]
    texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}],
                                      add_generation_prompt=True) for t in ("what is this ?", "a cat")]
    inputs = proc(images=images, text=texts, padding=True, return_tensors="pt")
    torch_model = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(world["llava"]).eval(),
                                            str(out)).eval()
    with torch.no_grad():
        ref = torch_model(**inputs).logits.numpy()
    ours = adapted_logits(llava_run, inputs)
    mask = inputs["attention_mask"].numpy().astype(bool)
    diff = float(np.abs(np.asarray(ours) - ref)[mask].max())
    with torch.no_grad(), torch_model.disable_adapter():
        effect = float(np.abs(torch_model(**inputs).logits.numpy() - ref)[mask].max())
    print(f"LLaVA run: exported LoRA in PeftModel vs ours, max |logit diff| {diff:.2e} (the adapter moves them "
          f"by {effect:.2e})")
    assert diff < 1e-4 and effect > 100 * diff, (diff, effect)


def generate_json(argv, capsys):
    rc, out, err = run_cli(["generate", *argv, "--json"], capsys)
    assert rc == 0, err
    return json.loads(out)["outputs"]


def trim(ids, stop):
    ids = [int(i) for i in ids]
    for k, t in enumerate(ids):
        if t in stop:
            return ids[:k]
    return ids


def test_generate_on_a_llava_checkpoint_equals_transformers(world, capsys):
    import torch
    from transformers import LlavaForConditionalGeneration

    files = [world["root"] / "coco" / "val2017" / f"{i}.jpg" for i in (2, 3)]
    outs = generate_json(["--model", world["llava"], "--image", files[0], "--image", files[1],
                          "--prompt", "what is this ?", "--max-new-tokens", 6], capsys)
    proc = world["llava_proc"]
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                  {"type": "text", "text": "what is this ?"}]}],
                                    add_generation_prompt=True)
    inputs = proc(images=[Image.open(f).convert("RGB") for f in files], text=[text, text], padding=True,
                  return_tensors="pt")
    model = LlavaForConditionalGeneration.from_pretrained(world["llava"]).eval()
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=6, do_sample=False, num_beams=1)
    stop = {int(proc.tokenizer.eos_token_id)}
    new = ref[:, inputs["input_ids"].shape[1]:].numpy()
    assert [o["token_ids"] for o in outs] == [trim(r, stop) for r in new]
    assert outs[0]["text"] == proc.tokenizer.decode(trim(new[0], stop), skip_special_tokens=True).strip()


def test_generate_beam_on_an_instructblip_checkpoint_equals_transformers(world, capsys):
    import torch
    from transformers import InstructBlipForConditionalGeneration

    file = world["root"] / "vqa" / "val2014" / "COCO_val2014_000000000002.jpg"
    outs = generate_json(["--model", world["iblip"], "--image", file, "--prompt", "is there a dog ?",
                          "--max-new-tokens", 5, "--num-beams", 3], capsys)
    proc = world["iblip_proc"]
    inputs = proc(images=[Image.open(file).convert("RGB")], text=["is there a dog ?"], return_tensors="pt")
    model = InstructBlipForConditionalGeneration.from_pretrained(world["iblip"]).eval()
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=5, do_sample=False, num_beams=3)
    stop = {int(proc.tokenizer.eos_token_id)}
    new = ref[0, inputs["input_ids"].shape[1]:].numpy()
    assert outs[0]["token_ids"] == trim(new, stop)


def test_instructblip_vqa_run_then_eval_and_generate_from_the_run(world, tmp_path, capsys):
    run_dir = tmp_path / "iblip_vqa"
    rc, _, err = run_cli(["train", "--config", "configs/instructblip_lora.py:vqa,smoke,qformer",
                          f"--config.model.hf_dir={world['iblip']}", f"--config.data.root={world['root'] / 'vqa'}",
                          f"--config.run_dir={run_dir}", "--config.stages.0.optimizer.learning_rate=0.05"], capsys)
    assert rc == 0, err
    results = json.loads((run_dir / "results.json").read_text())
    adapted = results["adapted"]
    assert set(adapted) >= {"all", "yes/no", "number", "other"}
    assert adapted["all"]["count"] == 4 and adapted["yes/no"]["count"] == 2
    answers = json.loads((run_dir / "answers_adapted.json").read_text())
    assert sorted(a["question_id"] for a in answers) == [100, 101, 102, 103]
    rc, _, err = run_cli(["eval", "--run", run_dir, "--method", "beam", "--num-beams", 2], capsys)
    assert rc == 0, err
    assert (run_dir / "eval-val-beam2-lp1-t4-n4" / "metrics.json").is_file()
    file = world["root"] / "vqa" / "val2014" / "COCO_val2014_000000000001.jpg"
    outs = generate_json(["--model", run_dir, "--image", file, "--prompt", "what color is the cat ?",
                          "--max-new-tokens", 4], capsys)
    assert len(outs) == 1 and len(outs[0]["token_ids"]) <= 4

    # the LoRA of the LM and the Q-Former, exported, loads in peft onto the torch InstructBLIP with our logits
    import torch
    from peft import PeftModel
    from transformers import InstructBlipForConditionalGeneration

    out = tmp_path / "adapter"
    rc, _, err = run_cli(["export", "--run", run_dir, "--format", "peft", "--out", out], capsys)
    assert rc == 0, err
    targets = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert any("query" in t for t in targets) and any("q_proj" in t for t in targets)
    proc = world["iblip_proc"]
    inputs = proc(images=[Image.open(file).convert("RGB")], text=["Question: what color is the cat ? Short answer:"],
                  return_tensors="pt")
    torch_model = PeftModel.from_pretrained(InstructBlipForConditionalGeneration.from_pretrained(world["iblip"]).eval(),
                                            str(out)).eval()
    with torch.no_grad():
        ref = torch_model(**inputs).logits.numpy()
    diff = float(np.abs(adapted_logits(run_dir, inputs) - ref).max())
    with torch.no_grad(), torch_model.disable_adapter():
        effect = float(np.abs(torch_model(**inputs).logits.numpy() - ref).max())
    print(f"InstructBLIP run: exported LoRA in PeftModel vs ours, max |logit diff| {diff:.2e} (the adapter moves "
          f"them by {effect:.2e})")
    assert diff < 1e-4 and effect > 100 * diff, (diff, effect)


def adapted_logits(run_dir, inputs):
    """Our logits of a finished run's adapted model on transformers processor outputs (NCHW -> NHWC)."""
    import jax.numpy as jnp

    from vlpeft_jax.config import read_run_config
    from vlpeft_jax.experiments import runner
    from vlpeft_jax.peft import base as peft_base
    from vlpeft_jax.tasks import base

    setup, params = runner.load_final(run_dir, read_run_config(run_dir))
    x = {k: jnp.asarray(v.numpy()) for k, v in inputs.items()}
    x["pixel_values"] = x["pixel_values"].transpose(0, 2, 3, 1)
    return np.asarray(peft_base.apply_with(setup.module.apply, base.active_methods(setup.active(), params),
                                           {"params": params["base"]}, **x).logits)


def test_generate_missing_image_and_bad_option(world, tmp_path, capsys):
    rc, _, err = run_cli(["generate", "--model", world["llava"], "--image", tmp_path / "missing.jpg", "--prompt", "hi"],
                         capsys)
    assert rc == 2 and "missing.jpg" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:  # argparse: usage line and exit status 2
        cli.main(["generate", "--model", str(world["llava"]), "--image", "x.jpg", "--max-new-tokens", "0"])
    assert e.value.code == 2
    assert "--max-new-tokens 0: must be >= 1" in capsys.readouterr().err


def test_generate_unreadable_image_is_named(world, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    rc, _, err = run_cli(["generate", "--model", world["llava"], "--image", bad, "--prompt", "hi"], capsys)
    assert rc == 2 and "bad.jpg" in err and err.count("\n") == 1


def test_a_run_on_real_data_without_a_checkpoint_is_refused(world, tmp_path, capsys):
    rc, _, err = run_cli(["train", "--config", "configs/shapes_lora.py:smoke", "--config.data.kind=coco",
                          f"--config.run_dir={tmp_path / 'r'}"], capsys)
    assert rc == 2 and "model.hf_dir" in err
    assert not (tmp_path / "r").exists()


def test_a_checkpoint_run_with_missing_data_files_is_refused_before_loading(world, tmp_path, capsys):
    rc, _, err = run_cli(["train", "--config", "configs/llava_lora.py:smoke", f"--config.model.hf_dir={world['llava']}",
                          f"--config.data.root={tmp_path}", f"--config.run_dir={tmp_path / 'r'}"], capsys)
    assert rc == 2 and "captions_train2017.json" in err and "no such file" in err
    assert not (tmp_path / "r").exists()


def test_tcm_on_a_llava_checkpoint_reports_r_tcm(world, tmp_path):
    """KLAFT's TCM as PEFT on a frozen LLaVA (seed 000 Table 6's setting): trains with TTM logged and the
    caption report gets r_TCM."""
    import ml_collections

    from vlpeft_jax.config import load_config_file
    from vlpeft_jax.experiments import runner

    cfg = load_config_file("configs/llava_lora.py", "smoke")
    cfg.model.hf_dir, cfg.data.root = str(world["llava"]), str(world["root"] / "coco")
    cfg.run_dir = str(tmp_path / "tcm")
    cfg.peft = ml_collections.ConfigDict({"tcm": {"method": "tcm", "num_topics": 3, "omega": 0.5}})
    cfg.loss_weights = ml_collections.ConfigDict({"ttm": 0.1})
    cfg.stages[0].update(trainable=[["peft/tcm/.*", "tcm"]], methods=["tcm"])
    results = runner.run(cfg)
    assert 0.0 <= results["adapted"]["val"]["metrics"]["r_TCM"] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "tcm" / "metrics.jsonl").read_text().splitlines()]
    assert all("loss/ttm" in r for r in rows if "loss" in r)
