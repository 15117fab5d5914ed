"""Seed 002's Table 1 over finished runs: the effective rank of last-layer text and image features
(seed ``002_77ee72ace92f5c60.txt`` §2.3, Eq. 1-5, Table 1, Fig. 4), ``run.py analyze rank``.

:mod:`vlpeft_jax.analysis.rank` turns feature matrices into the accumulated singular-value curve and the
ratio at 0.9; this module captures those matrices from runs and makes the table and the plots.

**Which features** (Eq. 1). The paper takes "the output (activation) matrix of the last layer" of BLIP-2
(OPT-2.7B) for one sentence ``[w_sos, w_1 .. w_N, w_eos]`` or one image. Here, for every image of the split, the
language model reads the image's visual tokens followed by ``<bos> reference caption <eos>`` (the first
reference in the chosen caption style, tokenised as in training), and we take the LM's **last-layer hidden
states** (after the final RMSNorm, as transformers' last ``hidden_states`` entry of OPT is after its final layer
norm):

- ``F_txt``: the rows at the real text positions ``<bos> .. <eos>`` (``[N+2, d]``, Eq. 1);
- ``F_img``: the rows at the visual-token positions (``[I, d]``: one per visual token).

Both are taken *inside the LM* because that is where every method acts: LoRA, the adapters and the prefix
live in the LM's layers, so the vision tower's and the connector's outputs are the pre-trained ones for every
PEFT run and would show no difference by construction; only full fine-tuning changes them. The image is given
with the caption because the paper's LMM always sees one (a captioning model's text states are conditioned on
it). The PEFT methods of the run's stages are active (prefix keys/values included; they add no rows: the
prefix enters the attention, not the sequence). The ``pre-trained`` column is the same model with **no**
method, on the base of a run that never trained base parameters (a prefix-tuning run, say): the base all the
table's runs started from.

Notes on the numbers. Padded rows are masked out (zero rows add only zero singular values), so every text
sample has ``M_txt = min(T, d)`` values with ``T`` the longest ``<bos> caption <eos>`` of the selection (short
captions have trailing zeros); every image has ``M_img = min(I, d)`` (16 visual tokens on the shapes model:
the ratio moves in steps of 1/16 = 6.25 %). The same images and captions are used for every column (checked).

Example (capturing needs a finished run; the tests in tests/experiments/test_rank_runs.py make smoke runs):
    >>> markdown_table({"columns": ["a"], "rows": {"a": {"text": {"effective_rank": 0.5},
    ...                 "image": {"effective_rank": 0.25}}}, "settings": {"threshold": 0.9}}).splitlines()[2]
    '| text | 50.0 % |'
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlpeft_jax import files
from vlpeft_jax.analysis import knockout, rank
from vlpeft_jax.config import max_examples_arg, read_run_config
from vlpeft_jax.data.batching import CaptionBatches, text_codec
from vlpeft_jax.errors import ConfigError
from vlpeft_jax.train.labels import FROZEN

PRETRAINED = "pre-trained"
DOMAINS = ("source", "target")
DEFAULT_DOMAIN = "target"  # the adaptation's caption style (the downstream data every shapes_ptpeft run trains on)


# ------------------------------------------------------------------------------------------- features


@dataclasses.dataclass(frozen=True)
class Features:
    """Last-layer features of ``K`` samples, padded, ready for :func:`vlpeft_jax.analysis.rank.rank_summary`.

    Attributes:
      text: ``float32 [K, T, d]``, the states at ``<bos> caption <eos>`` (right-padded; ``F_txt`` of Eq. 1).
      text_mask: ``bool [K, T]``, true at the real text positions.
      image: ``float32 [K, I, d]``, the states at the visual tokens (``F_img``).
      image_mask: ``bool [K, I]`` (all true: every image has its ``I`` visual tokens).
      image_ids: the images, in order.
      captions: the reference caption given with each image.
    """

    text: np.ndarray
    text_mask: np.ndarray
    image: np.ndarray
    image_mask: np.ndarray
    image_ids: tuple[str, ...]
    captions: tuple[str, ...]

    def summary(self, threshold: float = 0.9) -> dict[str, dict[str, Any]]:
        """``{"text": rank_summary, "image": rank_summary}`` (curve, effective rank, K, M) of Eq. 1-5."""
        return {"text": rank.rank_summary(self.text, self.text_mask, threshold),
                "image": rank.rank_summary(self.image, self.image_mask, threshold)}


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r}: expected an integer >= {minimum}")


def _last_hidden_fn(module: Any, methods: Sequence[tuple[str, Any]]) -> Any:
    model = knockout.Model(module, tuple(methods))

    @jax.jit
    def fn(params: Any, inputs: Mapping[str, Any]) -> jax.Array:
        return model(params, inputs, logits_to_keep=1).hidden_states[-1].astype(jnp.float32)

    return fn


def capture_features(setup: Any, params: Mapping[str, Any], split: str = "val", max_examples: int = 0,
                     batch_size: int = 8, *, methods: Sequence[tuple[str, Any]] | None = None,
                     domain: str = DEFAULT_DOMAIN, reference: int = 0) -> Features:
    """Text and image features (see the module docstring) of the first ``max_examples`` images of ``split``.

    Args:
      setup: a run's :class:`~vlpeft_jax.experiments.runner.Setup` (its task must hold a shapes world).
      params: ``{"base", "peft"}`` (what :func:`~vlpeft_jax.experiments.runner.load_final` returns).
      split: the world's split (``train``, ``val``, ``test``, ``ood``).
      max_examples: images to use, ``0`` for all of the split.
      batch_size: rows per forward pass (the last batch is padded with dummy rows, dropped; a batch size
        changes nothing but float rounding).
      methods: the active PEFT methods (default: the run's, ``setup.active()``; ``()`` for the bare base).
      domain: the caption style of the reference (``source`` or ``target``).
      reference: which reference caption of each image (0 = the first).

    Raises:
      ConfigError: a bad setting (naming it and what is valid), a task without a shapes world, or a model that
        does not put visual tokens before the text.

    Example (needs a finished run):
        >>> from vlpeft_jax.experiments import runner  # doctest: +SKIP
        >>> setup, params = runner.load_final(run_dir, read_run_config(run_dir))  # doctest: +SKIP
        >>> f = capture_features(setup, params, "val", 8, 4)  # doctest: +SKIP
        >>> f.text.shape[0], f.image.shape[1]  # doctest: +SKIP
        (8, 16)
    """
    _check_int("max_examples", max_examples, 0)
    _check_int("batch_size", batch_size, 1)
    _check_int("reference", reference, 0)
    if domain not in DOMAINS:
        raise ConfigError(f"domain={domain!r}: the caption style of the references; valid: {', '.join(DOMAINS)}")
    task = setup.task
    if not hasattr(type(task), "world"):
        raise ConfigError(f"task {getattr(task, 'name', type(task).__name__)!r} holds no shapes world; the rank "
                          "analysis reads the shapes world's images and captions (config.data.kind='shapes')")
    world = task.world
    if split not in world.splits:
        raise ConfigError(f"split={split!r}: valid: {', '.join(world.splits)}")
    examples = world[split].caption_examples(domain)
    examples = examples[:max_examples or len(examples)]
    if not examples:
        raise ConfigError(f"split {split!r} has no images")
    short = [ex.image_id for ex in examples if len(ex.captions) <= reference]
    if short:
        raise ConfigError(f"reference={reference}: image {short[0]!r} has fewer {domain} references; use a smaller "
                          "reference index")
    examples = [dataclasses.replace(ex, captions=(ex.captions[reference],)) for ex in examples]
    codec = text_codec(task.tokenizer)
    length = max(len(codec.encode(ex.captions[0])) for ex in examples) + 2  # <bos> caption <eos>: never cut
    batches: Any = CaptionBatches(examples, task.tokenizer, task.preprocessor, batch_size=batch_size,
                                  max_length=length, shuffle=False, drop_remainder=False)
    steps = len(batches)
    if hasattr(task, "with_qformer_text"):  # an InstructBLIP-like model reads its Q-Former text with the image
        batches = task.with_qformer_text(batches)
    fn = _last_hidden_fn(setup.module, setup.active() if methods is None else methods)
    text, text_mask, image = [], [], []
    for b in batches.iterate(0, steps):
        inputs = {k: jnp.asarray(v) for k, v in b.items()
                  if k in ("input_ids", "attention_mask", "pixel_values", "qformer_input_ids",
                           "qformer_attention_mask")}
        hidden = np.asarray(fn(params, inputs))
        visual = hidden.shape[1] - b["input_ids"].shape[1]
        if visual <= 0:
            raise ConfigError(f"{type(setup.module).__name__}: the model puts no visual tokens before the text "
                              "(a placeholder layout or a text-only model); the image features need a prefix "
                              "VLM whose visual tokens come first")
        keep = np.asarray(b["example_index"]) >= 0
        image.append(hidden[keep, :visual])
        text.append(hidden[keep, visual:])
        text_mask.append(np.asarray(b["attention_mask"], bool)[keep])
    img = np.concatenate(image)
    return Features(text=np.concatenate(text), text_mask=np.concatenate(text_mask), image=img,
                    image_mask=np.ones(img.shape[:2], bool), image_ids=tuple(ex.image_id for ex in examples),
                    captions=tuple(ex.captions[0] for ex in examples))


# -------------------------------------------------------------------------------------------- runs


def base_training(cfg: ml_collections.ConfigDict) -> str | None:
    """Where a run's config trains base parameters (``"stage 'full': rule 'base/.*' -> full"``), or None.

    A rule trains the base when its label is not ``frozen`` and its pattern is under ``base/`` (or starts with a
    wildcard that also reaches it).

    Example:
        >>> cfg = ml_collections.ConfigDict({"stages": [{"name": "p", "trainable": [["peft/prefix/.*", "prefix"]]},
        ...     {"name": "f", "trainable": [["base/x/.*", "frozen"], ["base/.*", "full"]]}]})
        >>> base_training(cfg)
        "stage 'f': rule 'base/.*' -> full"
    """
    for stage in cfg.get("stages") or []:
        for rule in stage.get("trainable") or []:
            pattern, label = str(rule[0]), str(rule[1])
            if label != FROZEN and re.match(r"(?:\^?base(?:/|\\/|$)|\.[*+]|\(\?:\.[*+])", pattern):
                return f"stage {stage.get('name', '?')!r}: rule {pattern!r} -> {label}"
    return None


def _final_dir(run_dir: Path) -> Path:
    """The run directory holding the final parameters: the run's own, or, for a sweep run evaluated on an
    earlier run's parameters (``results.json`` says ``trained_in``), that run's."""
    if (run_dir / "final").is_dir():
        return run_dir
    try:
        trained_in = json.loads((run_dir / "results.json").read_text(encoding="utf-8")).get("trained_in")
    except (OSError, ValueError, AttributeError):
        trained_in = None
    return Path(trained_in) if trained_in else run_dir


def load_run(run_dir: str | Path) -> tuple[ml_collections.ConfigDict, Any, Any]:
    """``(cfg, setup, params)`` of a finished run; one :class:`ConfigError` for a directory that is not a run
    or has no final parameters."""
    from vlpeft_jax.experiments import runner

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    setup, params = runner.load_final(_final_dir(run_dir), cfg)
    return cfg, setup, params


def check_pretrained(run_dir: str | Path, cfg: ml_collections.ConfigDict) -> None:
    """Refuses a ``--pretrained`` run whose base is not the pre-trained one (its config trains base parameters,
    or its ``final/base`` was saved because training changed the base)."""
    where = base_training(cfg)
    if where is None and (Path(run_dir) / "final" / "base").exists():
        where = "its final/base was saved (training changed the base)"
    if where is not None:
        raise ConfigError(f"--pretrained {run_dir}: the run trained base parameters ({where}), so its base is not the "
                          "pre-trained model; give a run that trains only PEFT methods (e.g. prefix tuning)")


def _score(run_dir: Path, domain: str) -> float | None:
    """The run's CIDEr-D on ``domain`` x100 (results.json), or None."""
    try:
        res = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
        value = res["adapted"][domain]["metrics"]["CIDEr-D"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return 100.0 * float(value) if isinstance(value, (int, float)) else None


def rank_table(run_dirs: Sequence[str | Path], labels: Sequence[str] | None = None,
               pretrained: str | Path | None = None, split: str = "val", max_examples: int = 0,
               batch_size: int = 16, domain: str = DEFAULT_DOMAIN, threshold: float = 0.9) -> dict[str, Any]:
    """Table 1: per column the text and image effective-rank ratio (and curve) of a run's last-layer features.

    Columns: ``pre-trained`` first when ``pretrained`` names a run (its base, no PEFT method; refused when that
    run trained base parameters), then one per run, labelled by ``labels`` or the run directory's name.

    Returns:
      ``{"columns": [...], "rows": {label: {"run", "methods", "text", "image", "cider"}}, "settings": {...}}``;
      ``text`` / ``image`` are :func:`~vlpeft_jax.analysis.rank.rank_summary` dicts.

    Raises:
      ConfigError: no runs, labels that do not match the runs or repeat, a directory that is not a finished run,
        a full-fine-tuning ``pretrained`` run, runs whose selected images or captions differ.

    Example (needs finished runs):
        >>> t = rank_table(["runs/prefix-seed0"], pretrained="runs/prefix-seed0")  # doctest: +SKIP
        >>> t["columns"]  # doctest: +SKIP
        ['pre-trained', 'prefix-seed0']
    """
    run_dirs = [Path(r) for r in run_dirs]
    if not run_dirs:
        raise ConfigError("no runs: give at least one --run RUN_DIR")
    if labels is not None and len(labels) != len(run_dirs):
        raise ConfigError(f"{len(labels)} --label for {len(run_dirs)} --run; give one label per run (or none)")
    names = list(labels) if labels is not None else [r.name for r in run_dirs]
    if pretrained is not None:
        names = [PRETRAINED, *names]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"column label(s) {', '.join(map(repr, repeated))} repeat; give distinct --label values")
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"threshold={threshold}: must be in (0, 1]")
    _check_int("max_examples", max_examples, 0)
    _check_int("batch_size", batch_size, 1)
    jobs: list[tuple[str, Path, bool]] = [(n, r, False) for n, r in zip(names[-len(run_dirs):], run_dirs,
                                                                          strict=True)]
    configs = {}
    for _, r, _ in jobs:  # every run directory is read (and checked) before any model is loaded
        configs[r] = read_run_config(r)
        if not (_final_dir(r) / "final" / "peft").exists():
            raise ConfigError(f"{r} has no final parameters ({_final_dir(r) / 'final' / 'peft'}); did the run "
                              "finish?")
    if pretrained is not None:
        pretrained = Path(pretrained)
        check_pretrained(pretrained, read_run_config(pretrained))
        jobs.insert(0, (PRETRAINED, pretrained, True))
    rows: dict[str, Any] = {}
    first: Features | None = None
    for name, r, bare in jobs:
        cfg, setup, params = load_run(r)
        methods = [] if bare else setup.active()
        feats = capture_features(setup, params, split, max_examples, batch_size, methods=methods, domain=domain)
        if first is None:
            first = feats
        elif (feats.image_ids, feats.captions) != (first.image_ids, first.captions):
            raise ConfigError(f"{r}: its {split} images or captions differ from those of {jobs[0][1]} (another "
                              "data config?); the columns must describe the same samples")
        rows[name] = {"run": str(r.resolve()), "methods": [n for n, _ in methods], **feats.summary(threshold),
                      "cider": None if bare else _score(r, domain)}
        del setup, params, feats
    assert first is not None
    settings = {"split": split, "domain": domain, "reference": 0, "max_examples": max_examples or None,
                "num_samples": len(first.image_ids), "batch_size": batch_size, "threshold": threshold,
                "pretrained": None if pretrained is None else str(Path(pretrained).resolve()),
                "features": "LM last-layer hidden states (after the final norm): visual-token rows (image), "
                            "<bos> caption <eos> rows (text)"}
    return {"columns": list(rows), "rows": rows, "settings": settings}


def markdown_table(table: Mapping[str, Any]) -> str:
    """Seed 002 Table 1's layout: rows ``text`` / ``image`` (and the runs' CIDEr-D when known), a column per
    model; cells are the remaining rank ratio at the threshold, in %."""
    cols = list(table["columns"])
    rows = table["rows"]
    lines = ["| features | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for kind in ("text", "image"):
        lines.append(f"| {kind} | " + " | ".join(f"{100 * rows[c][kind]['effective_rank']:.1f} %" for c in cols)
                     + " |")
    if any(rows[c].get("cider") is not None for c in cols):
        lines.append("| CIDEr-D | " + " | ".join("n/a" if rows[c].get("cider") is None else f"{rows[c]['cider']:.1f}"
                                                for c in cols) + " |")
    return "\n".join(lines)


def write_outputs(table: Mapping[str, Any], out: str | Path) -> list[Path]:
    """``rank.json``, ``rank.md``, ``rank_text.png``, ``rank_image.png`` in ``out`` (JSON last)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    s = table["settings"]
    note = (f"\n\nEffective rank = the remaining rank ratio k/M where the accumulated normalised singular values "
            f"reach {s['threshold']} (seed 002 Eq. 1-5, Table 1); {s['num_samples']} {s['split']} images, "
            f"{s['domain']} reference captions; M = "
            + ", ".join(f"{kind} {table['rows'][table['columns'][0]][kind]['num_values']}"
                        for kind in ("text", "image")) + ".\n")
    written = [files.write_text(out / "rank.md", markdown_table(table) + note)]
    for kind in ("text", "image"):
        path = out / f"rank_{kind}.png"
        rank.plot_curves(path, {c: table["rows"][c][kind]["curve"] for c in table["columns"]},
                         threshold=s["threshold"], title=f"{kind} features ({s['split']}, last layer)")
        written.append(path)
    written.append(files.write_json(out / "rank.json", table))
    return written


# --------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str]) -> int:
    """``run.py analyze rank --run RUN [--run RUN2 ...] [--label L ...] [--pretrained RUN] [--split val]
    [--domain target] [--max-examples N|all] [--batch-size B] [--threshold 0.9] --out DIR [--json]``.

    Writes ``rank.json``, ``rank.md``, ``rank_text.png`` and ``rank_image.png`` into ``--out`` and prints the
    table (``--json``: the JSON instead). Every option and run directory is checked before any model is loaded.
    """
    parser = argparse.ArgumentParser(prog="run.py analyze rank", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, action="append", required=True, help="a finished run directory "
                        "(repeat for more columns)")
    parser.add_argument("--label", action="append", default=None, help="column label per --run (default: the "
                        "run directory's name)")
    parser.add_argument("--pretrained", type=Path, default=None, help="a run that trained no base parameters "
                        "(e.g. prefix tuning): its base without PEFT methods is the 'pre-trained' column")
    parser.add_argument("--split", default="val")
    parser.add_argument("--domain", choices=DOMAINS, default=DEFAULT_DOMAIN, help="caption style of the references")
    parser.add_argument("--max-examples", default="all", help="images of the split (an integer >= 1, or 'all')")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    args = parser.parse_args(list(argv))
    files.check_writable_dir(args.out, "--out")
    table = rank_table(args.run, args.label, args.pretrained, split=args.split,
                       max_examples=max_examples_arg(args.max_examples), batch_size=args.batch_size,
                       domain=args.domain, threshold=args.threshold)
    table["settings"]["time"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    write_outputs(table, args.out)
    print(json.dumps(table, indent=1) if args.json else markdown_table(table))
    if not args.json:
        print(f"wrote {args.out}")
    return 0
