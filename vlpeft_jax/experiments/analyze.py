"""Information-flow analysis of a trained model: attention knockout, logit lens and module knockout over a
run's data (thesis, seed ``004_21d0d480fe4006f4.txt``, ch. 7 and App. E.4; the library pieces are in
:mod:`vlpeft_jax.analysis`). ``run.py analyze knockout|lens|modules`` calls :func:`main`.

Inputs:

- ``--run RUN_DIR``: a finished run (its final parameters, its PEFT methods active). On a VQA run of the
  shapes world every question of ``--split`` is asked with the prompt the run evaluates with
  (``<bos> Question: {q} Short answer:``) and the named position sets of
  :mod:`vlpeft_jax.analysis.positions` are available (``image``, ``image_objects``, ``question``, ``last``,
  ...); results are grouped by question type (the thesis' per-task panels). The answer token is the first token
  of the reference answer; only questions whose greedy first token is that token count (the thesis analyses
  the correctly answered samples, spec A10), unless ``--all-samples`` or ``--token ID`` (every sample then
  reads that token id).
- ``--model DIR --prompts FILE``: a decoder-only Hugging Face checkpoint folder and one prompt per line, with
  explicit index sets (``--source 0:16 --target 20:24,30``, see
  :func:`~vlpeft_jax.analysis.positions.index_set`; a set starting with ``-`` other than a plain number is
  written ``--target=-2:``); the token read is the model's greedy prediction.

Outputs (``--out``, default ``RUN_DIR/analysis-<kind>-<split>-k<K>-n<N>``): ``<kind>.json`` (settings, the
aggregates per group and the per-sample values), ``<kind>.md`` (the tables printed), ``<kind>.png`` (the
plots: knockout curves p_c against the centre layer with one line per source → target pair and one panel per
question type, as Figs. 7.3-7.5; the logit-lens probability of the answer per layer, as Fig. 7.6; the Jaccard
per centre layer for the attention and MLP branches, as Fig. 26). ``--json`` prints the JSON instead of the
table. Aggregates are means over samples with the population std, ``n`` and a bootstrapped 95% interval of the
mean (1000 resamples, seed 0; the band seaborn draws in the thesis' plots).

The default window is the thesis' k = 9 of 40 layers scaled to the model's depth, ``max(1, round(9 L / 40))``
(1 for our 6-layer shapes model, 7 for a 32-layer LLaVA-1.5-7b); ``--window K`` sets it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlpeft_jax import files
from vlpeft_jax.analysis import knockout as ko
from vlpeft_jax.analysis import lens as lens_mod
from vlpeft_jax.analysis import modules as mod_ko
from vlpeft_jax.analysis.positions import NAMED_SETS, index_set, vqa_sets
from vlpeft_jax.config import max_examples_arg
from vlpeft_jax.errors import ConfigError, InputError

KINDS = ("knockout", "lens", "modules")
THESIS_PAIRS = (("question", "last"), ("image", "last"), ("last", "last"), ("image", "question"),
                ("image_objects", "question"), ("image_other", "question"), ("image_random", "question"))
"""The thesis' blocks (Figs. 7.3-7.5) plus the size-matched random-patch control: (source, target)."""
BOOTSTRAP = 1000


def default_window(num_layers: int) -> int:
    """The thesis' k = 9 of 40 layers at this depth: ``max(1, round(9 L / 40))``.

    Example:
        >>> default_window(6), default_window(32), default_window(40)
        (1, 7, 9)
    """
    return max(1, round(9 * num_layers / 40))


def summarize(values: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Mean, population std, n and a bootstrapped 95% interval of the mean over axis 0 of ``values [n, ...]``.

    Example:
        >>> s = summarize(np.array([[1.0, 0.0], [3.0, 0.0]]))
        >>> s["mean"], s["std"], s["n"]
        ([2.0, 0.0], [1.0, 0.0], 2)
    """
    values = np.asarray(values, np.float64)
    n = values.shape[0]
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": None}
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, n, size=(BOOTSTRAP, n))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5], axis=0)
    return {"n": int(n), "mean": values.mean(0).tolist(), "std": values.std(0).tolist(),
            "ci95": [lo.tolist(), hi.tolist()]}


# ------------------------------------------------------------------------------------------------ data


@dataclasses.dataclass
class Batch:
    """One left-padded batch: model inputs, named position sets ``bool [b, T]`` and per-row metadata."""

    inputs: dict[str, Any]
    sets: dict[str, np.ndarray]
    valid: np.ndarray  # bool [b]
    groups: list[str]  # per row
    ids: list[str]  # per row
    answer_token: np.ndarray | None  # int [b] (the reference answer's first token) or None
    capitalized_token: np.ndarray | None = None


@dataclasses.dataclass
class Source:
    """What is analysed: the model, its parameters, the batches and how rows are grouped."""

    model: ko.Model
    params: Any
    batches: list[Batch]
    groups: tuple[str, ...]
    description: str
    named: bool  # the named sets exist
    vocabulary: Any = None  # id -> token string, for the reports


def _first_token(codec: Any, text: str) -> int | None:
    ids = codec.encode(text)
    return int(ids[0]) if ids else None


def run_source(run_dir: Path, split: str, max_examples: int, batch_size: int, seed: int) -> Source:
    """The batches of a VQA run's questions of ``split`` with the named sets (see the module docstring)."""
    from vlpeft_jax.config import read_run_config
    from vlpeft_jax.data.batching import EvalBatches, text_codec, vqa_prompt
    from vlpeft_jax.experiments import runner
    from vlpeft_jax.tasks.vqa import question_group

    cfg = read_run_config(run_dir)
    if cfg.get("task", "captioning") != "vqa" or cfg.data.get("kind", "shapes") != "shapes":
        raise ConfigError(f"{run_dir}: a {cfg.get('task', 'captioning')!r} run on {cfg.data.get('kind')!r} data; the "
                          "named position sets need a VQA run on the shapes world (configs/shapes_knockout.py). For "
                          "other models use --model DIR --prompts FILE with index sets")
    setup, params = runner.load_final(run_dir, cfg)
    task, module = setup.task, setup.module
    model = ko.Model(module, tuple(setup.active()))
    model.num_layers  # noqa: B018 -- refuses encoder-decoder language models early
    examples = task.examples(split)
    if max_examples:
        examples = examples[:max_examples]
    if not examples:
        raise InputError(f"split {split!r} of {run_dir} has no questions")
    codec = text_codec(task.tokenizer)
    prompt = vqa_prompt()
    longest = max(len(codec.encode(prompt(ex))) for ex in examples) + 1
    batches = EvalBatches(examples, task.tokenizer, task.preprocessor, batch_size=batch_size,
                          max_prompt_length=longest, prompt=prompt)
    prepended = ko.num_prepended(model, {"pixel_values": 1})
    patch = _patch_size(module)
    world = task.world[split] if getattr(task, "world", None) is not None else None
    out = []
    for b in batches:
        rows = [examples[i] if i >= 0 else None for i in b["example_index"]]
        questions = [codec.encode(ex.question) if ex is not None else None for ex in rows]
        objects = None
        if patch is not None and world is not None:
            objects = [None if ex is None else
                       world[ex.meta["index"]].patch_masks(patch)[list(ex.meta["object_ids"])].any(0)
                       for ex in rows]
        sets = vqa_sets(b["input_ids"], b["attention_mask"], questions, num_prepended=prepended,
                        object_patches=objects, seed=seed)
        answer = np.array([_first_token(codec, ex.answer) if ex is not None else -1 for ex in rows])
        capital = np.array([_first_token(codec, ex.answer.capitalize()) if ex is not None else -1 for ex in rows])
        out.append(Batch({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
                          "pixel_values": b["pixel_values"]}, sets, np.asarray(b["valid"], bool),
                         [str(question_group(ex)) if ex is not None else "" for ex in rows],
                         [ex.question_id if ex is not None else "" for ex in rows], answer, capital))
    groups = ("all", *[g for g in task.groups[1:] if any(g in bt.groups for bt in out)])
    vocab = getattr(task.tokenizer, "id_to_token", None)
    return Source(model, params, out, groups, f"run {run_dir} ({cfg.get('name', '')}), split {split}, "
                  f"{len(examples)} questions", True, vocab)


def _patch_size(module: Any) -> int | None:
    """The vision tower's patch size when each visual token is one patch (a prefix VLM on ``patches``)."""
    connector = getattr(module, "connector", None)
    vision = getattr(module, "vision_tower", None)
    if connector is None or vision is None or connector.feature != "patches":
        return None
    p = getattr(vision.config, "patch_size", None)
    if p is None:
        return None
    p = tuple(p) if isinstance(p, (tuple, list)) else (p, p)
    return int(p[0]) if p[0] == p[1] else None


def prompts_source(model_dir: Path, prompts_file: Path, batch_size: int, max_examples: int) -> Source:
    """Batches of the prompts in ``prompts_file`` (one per line) for a decoder-only checkpoint folder."""
    from vlpeft_jax.data.batching import build_prompt_sequences, text_codec
    from vlpeft_jax.hf import load_pretrained, load_tokenizer

    if not (Path(model_dir) / "config.json").is_file():
        raise ConfigError(f"--model {model_dir}: not a checkpoint folder (no config.json)")
    if not Path(prompts_file).is_file():
        raise ConfigError(f"--prompts {prompts_file}: no such file (one prompt per line)")
    prompts = [line.rstrip("\n") for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    if max_examples:
        prompts = prompts[:max_examples]
    if not prompts:
        raise InputError(f"--prompts {prompts_file} holds no prompt")
    module, base = load_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir)
    model = ko.Model(module)
    model.num_layers  # noqa: B018
    codec = text_codec(tokenizer)
    length = max(len(codec.encode(p)) for p in prompts) + 1
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        pad = batch_size - len(chunk)
        arrays = build_prompt_sequences(chunk + [chunk[-1]] * pad, codec, length)
        valid = np.arange(batch_size) < len(chunk)
        out.append(Batch(dict(arrays), {}, valid, ["all"] * batch_size,
                         [str(start + i) for i in range(batch_size)], None))
    vocab = getattr(tokenizer, "convert_ids_to_tokens", None)
    return Source(model, {"base": base, "peft": {}}, out, ("all",), f"model {model_dir}, {len(prompts)} prompts "
                  f"from {prompts_file}", False, vocab)


def position_set(spec: str, batch: Batch, model: ko.Model, named: bool) -> np.ndarray:
    """A named set of the batch or an explicit index set (:func:`~vlpeft_jax.analysis.positions.index_set`)."""
    if spec in batch.sets:
        return batch.sets[spec]
    if spec in NAMED_SETS:
        why = ("this model's visual tokens are not one per patch" if named else
               "named sets need a VQA run of the shapes world (--run)")
        raise ConfigError(f"position set {spec!r} is not available here: {why}; use index sets like 0:16,20")
    if spec and (spec[0].isdigit() or spec[0] in "-:"):
        return index_set(spec, ko.sequence_mask(model, batch.inputs))
    raise ConfigError(f"position set {spec!r}: valid names {', '.join(NAMED_SETS)}, or indices/ranges like 0:16,20")


def _selected(batch: Batch, correct: np.ndarray | None, all_samples: bool) -> np.ndarray:
    keep = batch.valid.copy()
    if correct is not None and not all_samples:
        keep &= correct
    return keep


def _by_group(source: Source, rows: Sequence[tuple[str, np.ndarray]]) -> dict[str, dict[str, Any]]:
    out = {}
    for g in source.groups:
        chosen = [v for group, v in rows if g == "all" or group == g]
        out[g] = summarize(np.stack(chosen) if chosen else np.zeros((0,)))
    return out


# ------------------------------------------------------------------------------------------- analyses


def run_knockout(source: Source, pairs: Sequence[tuple[str, str]], window: int, mode: str, all_samples: bool,
                 fully_blocked: str = "zero", token: int | None = None) -> dict[str, Any]:
    """p1, p2 and p_c per sample and centre layer for every (source, target) pair; aggregates per group.
    ``token``: read this token id's probability in every sample (default: the greedy token)."""
    L = source.model.num_layers
    windows = ko.layer_windows(window, L, mode)
    sweep = ko.make_sweep(source.model, fully_blocked)
    results: dict[str, Any] = {}
    for src, tgt in pairs:
        name = f"{src}->{tgt}"
        samples, rows, empty = [], [], 0
        for batch in source.batches:
            s_set = position_set(src, batch, source.model, source.named)
            t_set = position_set(tgt, batch, source.model, source.named)
            given = None if token is None else np.full(batch.valid.size, token)
            res = {k: np.asarray(v) for k, v in sweep(source.params, batch.inputs, s_set, t_set, windows,
                                                          given).items()}
            correct = None if batch.answer_token is None or token is not None else res["token"] == batch.answer_token
            keep = _selected(batch, correct, all_samples)
            nonempty = s_set.any(1) & t_set.any(1)
            empty += int((keep & ~nonempty).sum())
            keep &= nonempty
            for r in np.nonzero(keep)[0]:
                rows.append((batch.groups[r], res["p_c"][:, r]))
                samples.append({"id": batch.ids[r], "group": batch.groups[r], "token": int(res["token"][r]),
                                "p1": float(res["p1"][r]), "p2": res["p2"][:, r].tolist(),
                                "p_c": res["p_c"][:, r].tolist()})
        if not rows:
            raise InputError(f"{name}: no sample left to analyse ({empty} with an empty source or target set"
                             f"{'' if all_samples else '; only correctly answered samples count (--all-samples)'})")
        results[name] = {"source": src, "target": tgt, "groups": _by_group(source, rows),
                         "skipped_empty": empty, "samples": samples}
    return {"kind": "knockout", "window": window, "window_mode": mode, "num_layers": L,
            "centres": list(range(L)), "pairs": results}


def run_lens(source: Source, all_samples: bool, final_norm: bool, token: int | None = None) -> dict[str, Any]:
    """The logit lens at the last position: probability and rank of the answer token (the reference answer's
    first token; ``token`` instead when given, else the model's prediction) per layer (0 … L)."""
    L = source.model.num_layers
    rows_p, rows_r, rows_c, samples = [], [], [], []
    for batch in source.batches:
        positions = np.full((batch.valid.size, 1), batch.inputs["input_ids"].shape[1] - 1
                            + ko.num_prepended(source.model, batch.inputs))
        probs = lens_mod.logit_lens(source.model, source.params, batch.inputs, positions, final_norm)
        greedy = probs[:, -1, 0].argmax(-1)
        tracked = (np.full(greedy.shape, token) if token is not None else
                   batch.answer_token if batch.answer_token is not None else greedy)
        correct = None if batch.answer_token is None or token is not None else greedy == batch.answer_token
        keep = _selected(batch, correct, all_samples) & (tracked >= 0)  # -1: a padding row, or no answer token
        tracked = np.maximum(tracked, 0)
        p = lens_mod.token_probs(probs, tracked)[:, :, 0]
        rank = lens_mod.token_ranks(probs, tracked)[:, :, 0]
        cap = None
        if batch.capitalized_token is not None:
            cap = lens_mod.token_probs(probs, np.maximum(batch.capitalized_token, 0))[:, :, 0]
        for r in np.nonzero(keep)[0]:
            rows_p.append((batch.groups[r], p[r]))
            rows_r.append((batch.groups[r], rank[r].astype(float)))
            has_cap = token is None and cap is not None and batch.capitalized_token[r] not in (-1, tracked[r])
            if has_cap:
                rows_c.append((batch.groups[r], cap[r]))
            samples.append({"id": batch.ids[r], "group": batch.groups[r], "token": int(tracked[r]),
                            "prob": p[r].tolist(), "rank": rank[r].tolist(),
                            "top": probs[r, :, 0].argmax(-1).tolist(),
                            "capitalized_prob": cap[r].tolist() if has_cap else None})
    if not samples:
        raise InputError("no sample left for the logit lens (only correctly answered samples count; --all-samples)")
    return {"kind": "lens", "num_layers": L, "layers": list(range(L + 1)), "final_norm": final_norm,
            "answer_prob": _by_group(source, rows_p), "answer_rank": _by_group(source, rows_r),
            "capitalized_prob": _by_group(source, rows_c) if rows_c else None,
            "capitalized_note": None if rows_c else "no answer has a capitalised spelling with its own token in "
                                                    "this vocabulary (the shapes world is lowercase): Fig. 7.6's "
                                                    "lowercase/capitalised contrast is not applicable",
            "samples": samples}


def run_modules(source: Source, target: str, window: int, all_samples: bool, k: int) -> dict[str, Any]:
    """Jaccard of the top-k final-layer tokens at the ``target`` positions with the attention or MLP branch
    zeroed there in a forward window of layers (App. E.4), per centre layer."""
    L = source.model.num_layers
    windows = ko.layer_windows(window, L, "forward")
    branches: dict[str, Any] = {}
    for branch in mod_ko.BRANCHES:
        sweep = mod_ko.make_module_sweep(source.model, branch, k)
        rows, samples = [], []
        for batch in source.batches:
            positions = position_set(target, batch, source.model, source.named)
            res = {key: np.asarray(v) for key, v in sweep(source.params, batch.inputs, positions, windows).items()}
            keep = batch.valid & positions.any(1)
            if batch.answer_token is not None and not all_samples:
                keep &= res["clean"][:, -1, 0] == batch.answer_token
            jac = np.stack([mod_ko.jaccard_of_topk(res["clean"], res["knocked"][c], positions) for c in range(L)], 1)
            for r in np.nonzero(keep)[0]:
                rows.append((batch.groups[r], jac[r]))
                samples.append({"id": batch.ids[r], "group": batch.groups[r], "jaccard": jac[r].tolist()})
        if not rows:
            raise InputError(f"module knockout at {target!r}: no sample left (an empty set, or no correct answer; "
                             "--all-samples)")
        branches[branch] = {"groups": _by_group(source, rows), "samples": samples}
    return {"kind": "modules", "target": target, "window": window, "window_mode": "forward", "top_k": k,
            "num_layers": L, "centres": list(range(L)), "branches": branches}


# ------------------------------------------------------------------------------------------- reports


def _fmt(x: Any, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(result: Mapping[str, Any], groups: Sequence[str]) -> str:
    """The tables of a result: one row per line of the plot, one column per layer, per group."""
    kind = result["kind"]
    lines: list[str] = []
    if kind == "knockout":
        head = "| block (source -> target) | n | " + " | ".join(f"ℓ={c}" for c in result["centres"]) + " |"
        for g in groups:
            lines += [f"**{g}**: mean p_c (%) per centre layer, window k={result['window']}", "", head,
                      "|" + "---|" * (len(result["centres"]) + 2)]
            for name, res in result["pairs"].items():
                s = res["groups"][g]
                cells = [_fmt(v) for v in s["mean"]] if s["n"] else ["n/a"] * len(result["centres"])
                lines.append(f"| {name} | {s['n']} | " + " | ".join(cells) + " |")
            lines.append("")
    elif kind == "lens":
        head = "| question type | n | " + " | ".join(f"ℓ={c}" for c in result["layers"]) + " |"
        lines += ["mean probability (%) of the answer token at the last position, per layer "
                  f"(0 = embeddings; final norm on intermediate layers: {result['final_norm']})", "", head,
                  "|" + "---|" * (len(result["layers"]) + 2)]
        for g in groups:
            s = result["answer_prob"][g]
            cells = [_fmt(100 * v) for v in s["mean"]] if s["n"] else ["n/a"] * len(result["layers"])
            lines.append(f"| {g} | {s['n']} | " + " | ".join(cells) + " |")
        lines += ["", "mean rank of the answer token (0 = top)", "", head, "|" + "---|" * (len(result["layers"]) + 2)]
        for g in groups:
            s = result["answer_rank"][g]
            cells = [_fmt(v) for v in s["mean"]] if s["n"] else ["n/a"] * len(result["layers"])
            lines.append(f"| {g} | {s['n']} | " + " | ".join(cells) + " |")
        if result.get("capitalized_note"):
            lines += ["", result["capitalized_note"]]
    else:
        head = "| branch zeroed | n | " + " | ".join(f"ℓ={c}" for c in result["centres"]) + " |"
        for g in groups:
            lines += [f"**{g}**: mean top-{result['top_k']} Jaccard at {result['target']!r}, forward window "
                      f"k={result['window']}", "", head, "|" + "---|" * (len(result["centres"]) + 2)]
            for branch, res in result["branches"].items():
                s = res["groups"][g]
                cells = [_fmt(v, 3) for v in s["mean"]] if s["n"] else ["n/a"] * len(result["centres"])
                lines.append(f"| {branch} | {s['n']} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def plot(path: Path, result: Mapping[str, Any], groups: Sequence[str]) -> None:
    """Knockout curves / logit-lens lines / Jaccard curves, one panel per group (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = result["kind"]
    if kind == "lens":
        panels = [("answer_prob", "P(answer) at the last position"), ("answer_rank", "rank of the answer")]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), squeeze=False)
        for ax, (key, title) in zip(axes[0], panels, strict=True):
            for g in groups:
                s = result[key][g]
                if s["n"]:
                    _line(ax, result["layers"], s, f"{g} (n={s['n']})")
            ax.set_xlabel("layer (0 = embeddings)")
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=7)
    else:
        cols = min(3, len(groups))
        rows = -(-len(groups) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
        lines = result["pairs"] if kind == "knockout" else result["branches"]
        for ax, g in zip(axes.ravel(), groups, strict=False):
            for name, res in lines.items():
                s = res["groups"][g]
                if s["n"]:
                    _line(ax, result["centres"], s, name)
            ax.axhline(0.0 if kind == "knockout" else 1.0, color="grey", lw=0.6)
            ax.set_title(f"{g} (n={max(r['groups'][g]['n'] for r in lines.values())})", fontsize=9)
            ax.set_xlabel("centre layer" if kind == "knockout" else "first zeroed layer")
            ax.set_ylabel("p_c (%)" if kind == "knockout" else f"top-{result['top_k']} Jaccard")
        for ax in axes.ravel()[len(groups):]:
            ax.axis("off")
        axes.ravel()[0].legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _line(ax: Any, xs: Sequence[int], s: Mapping[str, Any], label: str) -> None:
    ax.plot(xs, s["mean"], marker="o", ms=3, label=label)
    ax.fill_between(xs, s["ci95"][0], s["ci95"][1], alpha=0.2)


# ---------------------------------------------------------------------------------------------- CLI


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run.py analyze {knockout,lens,modules}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--run", type=Path, default=None, help="a finished VQA run directory (named sets)")
    p.add_argument("--model", type=Path, default=None, help="a decoder-only checkpoint folder (with --prompts)")
    p.add_argument("--prompts", type=Path, default=None, help="one prompt per line (with --model)")
    p.add_argument("--split", default="val")
    p.add_argument("--max-examples", default="200",
                   help="questions/prompts analysed (an integer >= 1, or 'all')")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--source", default=None, help="knockout: source set (a name or indices like 0:16,20)")
    p.add_argument("--target", default=None, help="knockout: target set; modules: the zeroed positions "
                   "(default question)")
    p.add_argument("--window", type=int, default=None, help="layers per window (default: 9 of 40, scaled)")
    p.add_argument("--window-mode", choices=ko.WINDOW_MODES, default="centered", help="knockout windows")
    p.add_argument("--fully-blocked", choices=ko.FULLY_BLOCKED, default="zero")
    p.add_argument("--final-norm", action="store_true", help="lens: norm the intermediate states first")
    p.add_argument("--top-k", type=int, default=10, help="modules: tokens per position in the Jaccard")
    p.add_argument("--token", type=int, default=None, help="knockout/lens: the token id whose probability is read "
                   "(default: the reference answer's first token on a VQA run, else the greedy prediction)")
    p.add_argument("--all-samples", action="store_true", help="also analyse wrongly answered questions")
    p.add_argument("--seed", type=int, default=0, help="the image_random draw")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--json", action="store_true", help="print the JSON result instead of the tables")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    args.max_examples = max_examples_arg(args.max_examples)
    if (args.run is None) == (args.model is None):
        raise ConfigError("give either --run RUN_DIR or --model DIR --prompts FILE")
    if args.model is not None and args.prompts is None:
        raise ConfigError("--model needs --prompts FILE (one prompt per line)")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.kind == "knockout" and (args.source is None) != (args.target is None):
        raise ConfigError("give both --source and --target (or neither, for the thesis' blocks)")
    if args.run is not None and not args.run.is_dir():
        raise ConfigError(f"--run {args.run}: no such run directory")
    if args.model is not None and args.kind == "knockout" and args.source is None:
        raise ConfigError("--model needs explicit --source and --target index sets (e.g. --source 0:4 --target -1)")
    if args.model is not None and args.kind == "modules" and args.target is None:
        raise ConfigError("--model needs --target index set for the module knockout (e.g. --target 1:5)")
    source = (run_source(args.run, args.split, args.max_examples, args.batch_size, args.seed) if args.run is not None
              else prompts_source(args.model, args.prompts, args.batch_size, args.max_examples))
    L = source.model.num_layers
    if args.token is not None:
        ko.check_token_ids(args.token, source.model)
    window = args.window if args.window is not None else default_window(L)
    ko.layer_windows(window, L, args.window_mode)  # checks the window before any work
    print(f"analyze {args.kind}: {source.description}; {L} layers, window k={window}", file=sys.stderr)
    if args.kind == "knockout":
        pairs = [(args.source, args.target)] if args.source is not None else list(THESIS_PAIRS)
        if args.source is None:
            available = set(source.batches[0].sets)
            pairs = [p for p in pairs if p[0] in available and p[1] in available]
        result = run_knockout(source, pairs, window, args.window_mode, args.all_samples, args.fully_blocked,
                              args.token)
    elif args.kind == "lens":
        result = run_lens(source, args.all_samples, args.final_norm, args.token)
    else:
        result = run_modules(source, args.target or "question", window, args.all_samples, args.top_k)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(window=window, time=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    result = {"settings": settings, "description": source.description, "groups": list(source.groups), **result}
    base = args.run if args.run is not None else Path("runs")
    out = args.out or base / f"analysis-{args.kind}-{args.split}-k{window}-n{args.max_examples or 'all'}"
    files.check_writable_dir(out, "--out")
    table = markdown(result, source.groups)
    files.write_text(out / f"{args.kind}.md", table)
    plot(out / f"{args.kind}.png", result, source.groups)
    files.write_json(out / f"{args.kind}.json", result, indent=1)
    if args.json:
        print(json.dumps(result))
    else:
        print(table)
    print(f"wrote {out}", file=sys.stderr)
    return 0

