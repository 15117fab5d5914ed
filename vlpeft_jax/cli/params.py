"""``run.py params --config configs/X.py``: total and trainable parameter counts, on abstract shapes.

Nothing is allocated: the model and every PEFT method are initialised under ``jax.eval_shape``, so this
works for 7B-parameter configs on a laptop. Trainable counts follow each stage's ``trainable`` rules and the
active methods' stage rules (a stage with GPS counts its selected entries, k per involved neuron); methods
are prepared on shapes only, so gradient selection needs no selection pass (shapes do not depend on scores).
A method that counts by part (``param_breakdown``: PETAL beside its paper's App. E count) gets a table of its own.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import jax
import ml_collections

from vlpeft_jax.cli.config import split_config_args
from vlpeft_jax.experiments import runner
from vlpeft_jax.models import registry
from vlpeft_jax.peft.registry import build_methods
from vlpeft_jax.train import precision as precision_lib


def abstract_setup(cfg: ml_collections.ConfigDict) -> tuple[runner.Setup, dict[str, Any]]:
    """The run's setup and ``{"base": ..., "peft": ...}`` as ``ShapeDtypeStruct`` leaves (nothing allocated)."""
    model_cfg = cfg.model.to_dict()
    task = None
    if cfg.get("task"):
        # the task sizes what the data decide (the shapes world's vocabulary, the classification heads)
        from vlpeft_jax import tasks

        if tasks.uses_checkpoint(cfg):  # shapes from the checkpoint's config.json; the data are not read
            from vlpeft_jax.tasks.hf_vlm import task_for_inference

            task = task_for_inference(cfg)
        else:
            task = tasks.build(cfg)
        model_cfg = task.model_config()
    model_cfg = precision_lib.with_compute_dtype(model_cfg, cfg.get("precision"))
    if task is not None and hasattr(task, "abstract_model"):  # a Hugging Face checkpoint, from its config.json
        module, base = task.abstract_model()
        inputs: dict[str, Any] = {}
    else:
        module, inputs = registry.build_model(model_cfg)
        base = runner.abstract_base(module, inputs)
    setup = runner.Setup(cfg, task, module, inputs, base, build_methods(cfg.get("peft")))
    peft = runner.prepare_methods(setup, jax.random.key(0), abstract=True)
    return setup, {"base": base, "peft": peft}


def abstract_params(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """``{"base": ..., "peft": ...}`` as ``ShapeDtypeStruct`` leaves."""
    return abstract_setup(cfg)[1]


def count(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """Counts per stage: trainable, total base, and trainable as % of the base."""
    setup, params = abstract_setup(cfg)
    stages, _ = runner.plan_stages(setup, params["peft"])
    out = runner.parameter_counts(params, setup, stages)
    breakdowns = {name: m.param_breakdown(params["peft"][name]) for name, m in setup.methods.items()
                  if hasattr(m, "param_breakdown")}
    return {**out, "breakdown": breakdowns} if breakdowns else out


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
    for name, parts in out.get("breakdown", {}).items():  # methods that count by part (PETAL vs App. E)
        print(f"\n{name}:")
        print("| part | parameters |")
        print("|---|---:|")
        for part, n in parts.items():
            print(f"| {part} | {n:,} |")
    return 0
