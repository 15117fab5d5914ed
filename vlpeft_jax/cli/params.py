"""``run.py params --config configs/X.py``: total and trainable parameter counts, on abstract shapes.

Nothing is allocated: the model and every PEFT method are initialised under ``jax.eval_shape``, so this
works for 7B-parameter configs on a laptop. Trainable counts follow each stage's ``trainable`` rules; a GPS
stage (``config.gps``) counts its selected entries (k per involved neuron), and gradient-selected methods
are counted without a selection pass (their shapes do not depend on the scores).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import jax
import ml_collections

from vlpeft_jax.cli.config import split_config_args
from vlpeft_jax.experiments.captioning import build_gps
from vlpeft_jax.models import layers, registry
from vlpeft_jax.peft import base as peft_base
from vlpeft_jax.peft.registry import build_methods
from vlpeft_jax.peft.selection import for_shapes
from vlpeft_jax.train import labels as labels_lib
from vlpeft_jax.train.stages import Stage


def abstract_params(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """``{"base": ..., "peft": ...}`` as ``ShapeDtypeStruct`` leaves."""
    model_cfg = cfg.model.to_dict()
    dec = model_cfg.get("decoder", model_cfg)
    if dec.get("vocab_size", 1) == 0:  # the shapes configs size the vocabulary from the world's tokenizer
        from vlpeft_jax.experiments.captioning import load_world

        dec["vocab_size"] = load_world(cfg).build_tokenizer().vocab_size
    module, inputs = registry.build_model(model_cfg)
    base = jax.eval_shape(lambda: layers.unbox(module.init(jax.random.key(0), **inputs))["params"])
    methods = build_methods(cfg.get("peft"))
    peft = {n: jax.eval_shape(for_shapes(m).init, jax.random.key(0), base) for n, m in methods.items()}
    return {"base": base, "peft": peft}


def count(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """Counts per stage: trainable, total base, and trainable as % of the base."""
    params = abstract_params(cfg)
    total = peft_base.count(params["base"])
    out: dict[str, Any] = {"base_total": total, "peft_total": peft_base.count(params["peft"]), "stages": {}}
    gps = build_gps(cfg)
    for i, s in enumerate(cfg.get("stages", [])):
        stage = Stage.from_dict(s, f"stages[{i}]")
        counts = labels_lib.count_params(params, labels_lib.make_labels(params, stage.trainable)) \
            if stage.trainable else {"trainable": 0}
        if gps is not None and stage.name in gps[1]:
            counts["trainable"] += gps[0].num_selected(params["base"])
        out["stages"][stage.name] = {**counts, "trainable_pct": 100.0 * counts["trainable"] / total}
    return out


def main(argv: list[str]) -> int:
    cfg, rest = split_config_args(argv, default="configs/shapes_lora.py")
    parser = argparse.ArgumentParser(prog="run.py params", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(rest)
    out = count(cfg)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"base parameters: {out['base_total']:,}   PEFT parameters: {out['peft_total']:,}")
    print("| stage | trainable | % of base |")
    print("|---|---:|---:|")
    for name, c in out["stages"].items():
        print(f"| {name} | {c['trainable']:,} | {c['trainable_pct']:.3f} |")
    return 0
