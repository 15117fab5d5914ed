"""``run.py bench klaft``: KLAFT's topic control mechanism (TCM) vs LoRA and vs the naive per-topic head.

One GPT-2 (default: 2 layers, width 256, 4 heads, vocab 8192, batch 4 x 64 tokens; random weights, float32,
Adam, causal-LM loss on random tokens, every weight frozen except the method's) is trained side by side in one
process with

- ``tcm``: :class:`vlpeft_jax.peft.tcm.TCM` (K = 10, ω = 0.2, addition; seed 000's defaults) through its
  efficient path: the frozen head applied once to ``h`` and once to the K-1 topic vectors, a scan over topics
  in log space with a custom VJP (memory O(b·t·V)); TTM on the main pass (``ttm="clean"``);
- ``tcm_naive``: the same parameters through the naive path (the head applied to each topic's hidden state,
  K stacked distributions: O(K·b·t·V));
- ``tcm_ttm_pass``: ``tcm`` with the spec's TTM recipe (``ttm="dropout"``): an extra token-dropout forward
  pass per step (:func:`vlpeft_jax.peft.base.extra_pass_records`);
- ``lora``: LoRA on ``c_attn`` with the rank that gives the trainable count closest to TCM's (the "similar
  trainable budget"; the ratio of the counts is printed).

For each: the step time (fastest of ``--steps`` steps, timed round-robin across the setups so that load changes
on a shared machine hit all alike; the median is in the JSON) and the peak memory of the compiled train step,
XLA's own accounting (``compiled.memory_analysis()``: arguments + outputs - donated aliases + temporaries; the
same measure on CPU, GPU and TPU). Printed: the table, the ratios TCM / LoRA and TCM / naive, and the load
average (``os.getloadavg``) before and after.

Example (not run by the doctests: it compiles four train steps; the smoke test in tests/benchmarks runs it):
    >>> result = run(["--layers", "1", "--width", "16", "--heads", "2", "--vocab", "64", "--batch", "2",
    ...               "--seq", "8", "--steps", "1"])  # doctest: +SKIP
    >>> result["ratios"]["tcm_over_naive"]["peak_bytes"] < 1  # doctest: +SKIP
    True
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlpeft_jax.benchmarks import timing
from vlpeft_jax.benchmarks.sparse import Setup, mb, prepare_step, time_round_robin
from vlpeft_jax.errors import ConfigError
from vlpeft_jax.models import layers, registry
from vlpeft_jax.peft import base as pb
from vlpeft_jax.peft.base import extra_pass_records
from vlpeft_jax.peft.lora import LoRA
from vlpeft_jax.peft.tcm import TCM
from vlpeft_jax.train.losses import causal_lm_loss, shift_labels

MEMORY_NOTE = "compiled.memory_analysis(): argument + output - alias + temp bytes of one train step"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run.py bench klaft", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--topics", type=int, default=10, help="K, the residual topic included")
    p.add_argument("--omega", type=float, default=0.2)
    p.add_argument("--steps", type=int, default=5, help="timed steps per setup (round-robin; fastest reported)")
    p.add_argument("--warmup", type=int, default=1)
    return p


def _check(args: argparse.Namespace) -> None:
    for key in ("layers", "width", "heads", "vocab", "batch", "seq", "topics", "steps"):
        if getattr(args, key) < 1:
            raise ConfigError(f"bench klaft --{key}={getattr(args, key)}; must be >= 1")
    if args.width % args.heads:
        raise ConfigError(f"bench klaft --width={args.width} is not divisible by --heads={args.heads}")
    if args.seq < 2:
        raise ConfigError(f"bench klaft --seq={args.seq}; must be >= 2 (a causal LM predicts from the 2nd token)")


def _loss(module: Any, name: str, method: Any) -> Callable[..., Any]:
    """Causal-LM cross-entropy through the method, plus its recorded loss terms (main and extra passes)."""

    def loss_fn(params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
        ids = batch["input_ids"]
        active = [(method, params["peft"][name])]
        side = {"target_ids": shift_labels(ids)}
        out, records = pb.apply_with(module.apply, active, {"params": params["base"]}, ids, rng=rng, train=True,
                                     side_inputs=side, record=True)
        extra = extra_pass_records(module.apply, active, {"params": params["base"]}, ids, rng=rng, side_inputs=side)
        loss = causal_lm_loss(out.logits, ids)[0]
        for value in (*records.loss_terms().values(), *extra.loss_terms().values()):
            loss = loss + 0.1 * value  # KLAFT's λ = 0.1
        return loss, {}

    return loss_fn


def _prepare(name: str, module: Any, base: Any, method: Any, peft_params: Any, batch: dict[str, jax.Array]
             ) -> Setup:
    params = {"base": base, "peft": {name: peft_params}}
    return prepare_step(name, params, [(f"peft/{name}/.*", name)], optax.adam(1e-3), _loss(module, name, method),
                        batch)


def run(argv: list[str]) -> dict[str, Any]:
    """Runs the benchmark; prints the table and ratios; returns the measurements."""
    args = _parser().parse_args(argv)
    _check(args)
    load_before = os.getloadavg()
    cfg = dict(family="gpt2", vocab_size=args.vocab, hidden_size=args.width, num_hidden_layers=args.layers,
               num_attention_heads=args.heads, max_position_embeddings=max(args.seq, 8))
    module, inputs = registry.build_model(cfg)
    base = layers.unbox(jax.jit(module.init)(jax.random.key(0), **inputs))["params"]
    ids = jnp.asarray(np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq)), jnp.int32)
    batch = {"input_ids": ids}
    print(f"backend {jax.default_backend()}: GPT-2, {args.layers} layers, width {args.width}, vocab {args.vocab}, "
          f"batch {args.batch} x {args.seq} tokens, float32, Adam; TCM K={args.topics}, ω={args.omega}, addition; "
          f"load average {load_before[0]:.2f}")

    key = jax.random.key(1)
    tcm = TCM(num_topics=args.topics, omega=args.omega, ttm="clean")
    tcm_params = tcm.init(key, base)
    n_tcm = tcm.num_params(tcm_params)
    # LoRA on c_attn ([d, 3d]): r·(d + 3d) per layer; the rank closest to TCM's count
    rank = max(1, min(args.width, round(n_tcm / (4 * args.width * args.layers))))
    lora = LoRA(targets=("c_attn",), rank=rank, alpha=2.0 * rank)
    setups = [
        _prepare("tcm", module, base, tcm, tcm_params, batch),
        _prepare("tcm_naive", module, base, dataclasses.replace(tcm, naive=True), tcm_params, batch),
        _prepare("tcm_ttm_pass", module, base, dataclasses.replace(tcm, ttm="dropout"), tcm_params, batch),
        _prepare("lora", module, base, lora, lora.init(key, base), batch),
    ]
    with timing.Monitor() as machine:
        time_round_robin(setups, batch, args.steps, args.warmup)
    results = {s.name: s.record for s in setups}
    results["lora"]["rank"] = rank
    del setups
    load_after = os.getloadavg()

    base_total = pb.count(base)
    print()
    print("| setup | trainable | % of base | step ms | peak MiB (XLA) | temp MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results.values():
        label = f"{r['name']} (r={r['rank']})" if r["name"] == "lora" else r["name"]
        print(f"| {label} | {r['trainable']:,} | {100 * r['trainable'] / base_total:.4f} | {1000 * r['step_s']:.1f} | "
              f"{mb(r['peak_bytes'])} | {mb(r['temp_bytes'])} |")

    def ratio(a: str, b: str, key: str) -> float | None:
        x, y = results[a].get(key), results[b].get(key)
        return None if x is None or y is None or y == 0 else x / y

    keys = ("step_s", "peak_bytes", "temp_bytes", "trainable")
    ratios = {"tcm_over_lora": {k: ratio("tcm", "lora", k) for k in keys},
              "tcm_over_naive": {k: ratio("tcm", "tcm_naive", k) for k in keys[:3]},
              "tcm_ttm_pass_over_tcm": {k: ratio("tcm_ttm_pass", "tcm", k) for k in keys[:3]},
              "tcm_ttm_pass_over_lora": {k: ratio("tcm_ttm_pass", "lora", k) for k in keys[:3]}}
    print()
    for name, r in ratios.items():
        parts = [f"{k} {v:.2f}x" for k, v in r.items() if v is not None]
        print(f"{name.replace('_over_', ' / ')}: {', '.join(parts)}")
    print(timing.describe(machine))  # the load averages around the timed steps, and other processes' share
    return {"backend": jax.default_backend(), "settings": vars(args), "base_params": base_total, "results": results,
            "ratios": ratios, "load_average": {"before": list(load_before), "after": list(load_after)},
            "machine": machine.record(), "threads": timing.thread_settings(),
            "peak_memory_source": MEMORY_NOTE}
