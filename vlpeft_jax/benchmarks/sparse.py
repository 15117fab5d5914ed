"""``run.py bench sparse``: mask-based GPS vs NeuroAda vs LoRA, measured side by side in one process.

One LLaMA-style decoder (default: 4 layers, width 1024, MLP 2752, vocab 8192, batch 2 x 128 tokens as
the thesis' Fig. 5.5 batch of 2; random weights, causal-LM loss on random tokens, float32, AdamW) is
trained with

- ``gps``: the targeted base kernels trained in place, dense gradient and optimizer state, masked to the
  same per-neuron top-``k`` selection (thesis Fig. 5.2; the memory-heavy reference);
- ``neuroada_gather`` / ``neuroada_scatter``: NeuroAda with the same ``k`` (the same trainable budget)
  through each forward path;
- ``lora``: LoRA of rank ``--lora-rank`` on the same projections, and ``neuroada_lora_budget``: NeuroAda
  with as many trainable values as that LoRA (``budget`` = LoRA's count);
- ``full``: full fine-tuning, for scale.

For each it reports the step time (the fastest of ``--steps`` steps, timed round-robin across the
setups so that load changes on a shared machine hit all of them alike; the median is in the JSON), the
peak memory of the compiled train step and the optimizer-state bytes, and prints the ratios
NeuroAda / GPS and NeuroAda / LoRA. *Peak memory* is XLA's own accounting of the compiled step
(``compiled.memory_analysis()``: arguments + outputs - donated aliases + temporaries): deterministic, and
the same measure on CPU, GPU and TPU (the device's running ``peak_bytes_in_use`` would mix the setups,
and CPU does not report it).

A second table trains NeuroAda through the ``gather`` and the ``scatter`` path for several ``k`` (full
train steps): step time and XLA temporaries, which is faster and which needs less memory, next to what
``mode="auto"`` picks (:func:`vlpeft_jax.peft.neuroada.choose_mode`; "gather/scatter" when it differs
between the model's projection widths).

Example (not run by the doctests: it compiles a train step for each of seven setups, about 15 s on two CPU
cores even at toy sizes):
    >>> result = run(["--hidden", "64", "--layers", "1", "--steps", "2"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlpeft_jax.benchmarks import timing
from vlpeft_jax.models import layers, registry
from vlpeft_jax.peft import base as pb
from vlpeft_jax.peft import gps as gps_lib
from vlpeft_jax.peft.lora import LoRA
from vlpeft_jax.peft.neuroada import NeuroAda, choose_mode
from vlpeft_jax.train import labels as labels_lib
from vlpeft_jax.train.losses import lm_loss
from vlpeft_jax.train.state import TrainState
from vlpeft_jax.train.step import make_train_step

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run.py bench sparse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2752)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--k", type=int, default=1, help="connections per neuron for GPS and NeuroAda")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per setup (round-robin; fastest reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--mode-ks", type=int, nargs="*", default=[1, 2, 4, 8],
                   help="k values of the gather-vs-scatter table (empty: skip it)")
    p.add_argument("--no-full", action="store_true", help="skip the full fine-tuning row")
    return p


def _model(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    cfg = dict(family="llama", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
               num_hidden_layers=args.layers, num_attention_heads=args.heads, tie_word_embeddings=False)
    module, inputs = registry.build_model(cfg)
    base = layers.unbox(jax.jit(module.init)(jax.random.key(0), **inputs))["params"]
    return module, base


def _nbytes(tree: Any) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


@dataclasses.dataclass
class Setup:
    """One compiled train step with its state, and the numbers that do not need running it."""

    name: str
    compiled: Any
    state: Any
    record: dict[str, Any]
    times: list[float] = dataclasses.field(default_factory=list)


def prepare_step(name: str, params: Any, rules: list[tuple[str, str]], tx: optax.GradientTransformation,
                 loss_fn: Callable[..., Any], batch: dict[str, jax.Array]) -> Setup:
    """A compiled, donated train step of ``loss_fn`` training the leaves ``rules`` label, its initial state, and
    what needs no run: trainable count, XLA's peak and temporary bytes, optimizer-state (and GPS mask) bytes."""
    labels = labels_lib.make_labels(params, rules)
    counts = labels_lib.count_params(params, labels)
    state = jax.jit(lambda p: TrainState.create(p, labels, tx, jax.random.PRNGKey(0)))(params)
    compiled = jax.jit(make_train_step(loss_fn, tx), donate_argnums=0).lower(state, batch).compile()
    mem = compiled.memory_analysis()
    peak = temp = None
    if mem is not None:
        temp = int(mem.temp_size_in_bytes)
        peak = int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + temp)
    mask_bytes = _nbytes(state.opt_state.mask) if isinstance(state.opt_state, gps_lib.MaskedState) else 0
    record = {"name": name, "trainable": counts["trainable"], "peak_bytes": peak, "temp_bytes": temp,
              "opt_state_bytes": _nbytes(state.opt_state), "mask_bytes": mask_bytes}
    return Setup(name, compiled, state, record)


def time_round_robin(setups: list[Setup], batch: dict[str, jax.Array], steps: int, warmup: int) -> None:
    """Times the setups in turn, one step each per round (the order reversed every other round), so that load
    changes on a shared machine hit all of them alike; records the fastest step (the least disturbed) and the
    median."""
    for _ in range(warmup):
        for s in setups:
            s.state, _ = s.compiled(s.state, batch)
            jax.block_until_ready(s.state)
    for r in range(steps):
        for s in (setups if r % 2 == 0 else setups[::-1]):
            t0 = time.perf_counter()
            s.state, metrics = s.compiled(s.state, batch)
            jax.block_until_ready((s.state, metrics))
            s.times.append(time.perf_counter() - t0)
            s.record["final_loss"] = float(metrics["loss"])
    for s in setups:
        s.record["step_s"] = min(s.times)
        s.record["step_median_s"] = statistics.median(s.times)
        s.state = None  # free the buffers


def mb(x: int | None) -> str:
    """Bytes as MiB text (``n/a`` when XLA gave no memory analysis)."""
    return "n/a" if x is None else f"{x / 2**20:.1f}"


def run(argv: list[str]) -> dict[str, Any]:
    """Runs the benchmark; prints the tables; returns the measurements and ratios."""
    args = _parser().parse_args(argv)
    machine = timing.Monitor().start()
    module, base = _model(args)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, args.vocab, (args.batch, args.seq)), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}
    print(f"backend {jax.default_backend()}: LLaMA-style decoder, {args.layers} layers, width {args.hidden}, "
          f"mlp {args.intermediate}, vocab {args.vocab}, batch {args.batch} x {args.seq} tokens, float32, AdamW")

    adamw = optax.adamw(1e-3, weight_decay=0.0)

    def neuroada_setup(name: str, ada: NeuroAda) -> Setup:
        params = {"base": base, "peft": {"neuroada": ada.init(jax.random.key(1), base)}}
        return prepare_step(name, params, ada.trainable_rules(), adamw, lm_loss(module, [("neuroada", ada)]), batch)

    setups = []
    gps = gps_lib.GPS(targets=TARGETS, k=args.k, selection="magnitude")  # selection does not change the cost
    masks = gps.masks(jax.random.key(1), base)
    setups.append(prepare_step("gps", {"base": base, "peft": {}}, gps.trainable_rules(masks),
                               gps.optimizer(adamw, masks), lm_loss(module, []), batch))
    del masks
    for mode in ("gather", "scatter"):
        setups.append(neuroada_setup(f"neuroada_{mode}", NeuroAda(targets=TARGETS, k=args.k, mode=mode)))
    lora = LoRA(targets=TARGETS, rank=args.lora_rank, alpha=2.0 * args.lora_rank)
    lora_params = lora.init(jax.random.key(1), base)
    setups.append(prepare_step("lora", {"base": base, "peft": {"lora": lora_params}}, [("peft/lora/.*", "lora")], adamw,
                           lm_loss(module, [("lora", lora)]), batch))
    budget_ada = NeuroAda(targets=TARGETS, budget=float(lora.num_params(lora_params)), mode="auto")
    setups.append(neuroada_setup("neuroada_lora_budget", budget_ada))
    budget_k = int(jax.tree.leaves(setups[-1].state.trainable)[0].shape[1])
    if not args.no_full:
        setups.append(prepare_step("full", {"base": base, "peft": {}}, [("base/.*", "full")], adamw,
                                   lm_loss(module, []), batch))
    time_round_robin(setups, batch, args.steps, args.warmup)
    results: dict[str, dict[str, Any]] = {s.name: s.record for s in setups}
    results["neuroada_lora_budget"]["k"] = budget_k
    del setups

    base_total = pb.count(base)
    print()
    print("| setup | trainable | % of base | step ms | peak MiB (XLA) | optimizer state MiB | of which masks MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results.values():
        print(f"| {r['name']} | {r['trainable']:,} | {100 * r['trainable'] / base_total:.3f} | "
              f"{1000 * r['step_s']:.1f} | {mb(r['peak_bytes'])} | {mb(r['opt_state_bytes'])} | "
              f"{mb(r['mask_bytes'])} |")

    def ratio(a: str, b: str, key: str) -> float | None:
        x, y = results[a][key], results[b][key]
        return None if x is None or y is None or y == 0 else x / y

    # the path mode="auto" takes for the narrowest projections (the default a user gets)
    best = "neuroada_" + choose_mode(min(args.hidden, args.intermediate), args.k, args.batch * args.seq)
    ratios = {
        "neuroada_vs_gps": {key: ratio(best, "gps", key) for key in ("step_s", "peak_bytes", "opt_state_bytes")},
        "neuroada_lora_budget_vs_lora": {key: ratio("neuroada_lora_budget", "lora", key)
                                         for key in ("step_s", "peak_bytes", "opt_state_bytes", "trainable")},
        "neuroada_auto_mode": best,
    }
    # the thesis' claim (ch. 5, Fig. 5.5): NeuroAda needs <= 0.5x the memory of mask-based tuning, and is faster
    ratios["claim_memory_at_most_half"] = bool(ratios["neuroada_vs_gps"]["peak_bytes"] is not None
                                               and ratios["neuroada_vs_gps"]["peak_bytes"] <= 0.5)
    ratios["claim_faster"] = bool(ratios["neuroada_vs_gps"]["step_s"] < 1.0)
    print()
    print(f"NeuroAda ({best.split('_')[1]}) / GPS at k={args.k}: step time "
          f"{ratios['neuroada_vs_gps']['step_s']:.2f}x, peak memory {ratios['neuroada_vs_gps']['peak_bytes']:.2f}x, "
          f"optimizer state {ratios['neuroada_vs_gps']['opt_state_bytes']:.4f}x (thesis: memory <= 0.5x: "
          f"{'met' if ratios['claim_memory_at_most_half'] else 'not met'}; faster: "
          f"{'met' if ratios['claim_faster'] else 'not met'})")
    r2 = ratios["neuroada_lora_budget_vs_lora"]
    print(f"NeuroAda / LoRA r={args.lora_rank} at an equal budget (NeuroAda k="
          f"{results['neuroada_lora_budget']['k']}, trainable ratio {r2['trainable']:.3f}): step time "
          f"{r2['step_s']:.2f}x, peak memory {r2['peak_bytes']:.2f}x, optimizer state {r2['opt_state_bytes']:.2f}x")

    modes: list[dict[str, Any]] = []
    tokens = args.batch * args.seq
    for k in args.mode_ks:
        row: dict[str, Any] = {"k": k, "tokens": tokens}
        if k == args.k:
            pair = {mode: results[f"neuroada_{mode}"] for mode in ("gather", "scatter")}
        else:
            pair_setups = [neuroada_setup(f"neuroada_{mode}_k{k}", NeuroAda(targets=TARGETS, k=k, mode=mode))
                           for mode in ("gather", "scatter")]
            time_round_robin(pair_setups, batch, args.steps, args.warmup)
            pair = {mode: s.record for mode, s in zip(("gather", "scatter"), pair_setups, strict=True)}
        for mode, r in pair.items():
            row[f"{mode}_step_s"], row[f"{mode}_temp_bytes"] = r["step_s"], r["temp_bytes"]
        row["faster"] = "gather" if row["gather_step_s"] <= row["scatter_step_s"] else "scatter"
        if row["gather_temp_bytes"] is not None:
            row["less_memory"] = "gather" if row["gather_temp_bytes"] <= row["scatter_temp_bytes"] else "scatter"
        row["auto"] = sorted({choose_mode(d_in, k, tokens) for d_in in (args.hidden, args.intermediate)})
        modes.append(row)
    if modes:
        print()
        print("NeuroAda's two paths in full train steps (all seven projections):")
        print("| k | tokens | gather ms | scatter ms | gather temp MiB | scatter temp MiB | faster | less memory | "
              "auto picks |")
        print("|---:|---:|---:|---:|---:|---:|---|---|---|")
        for m in modes:
            print(f"| {m['k']} | {m['tokens']} | {1000 * m['gather_step_s']:.0f} | {1000 * m['scatter_step_s']:.0f} | "
                  f"{mb(m['gather_temp_bytes'])} | {mb(m['scatter_temp_bytes'])} | {m['faster']} | "
                  f"{m.get('less_memory', 'n/a')} | {'/'.join(m['auto'])} |")
    machine.stop()
    print(timing.describe(machine))
    return {"backend": jax.default_backend(), "settings": vars(args), "base_params": base_total,
            "results": results, "ratios": ratios, "modes": modes,
            "machine": machine.record(), "threads": timing.thread_settings(),
            "peak_memory_source": "compiled.memory_analysis(): argument + output - alias + temp bytes"}
