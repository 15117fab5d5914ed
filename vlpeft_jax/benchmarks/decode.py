"""``run.py bench decode``: greedy decoding throughput, our jitted KV-cache loop vs transformers' ``generate``.

Both run in this process on the same random GPT-2 weights (built with transformers, saved, and loaded
through :func:`vlpeft_jax.hf.decoders.load_gpt2`), the same prompts and float32. Greedy decoding
produces exactly ``--new-tokens`` tokens per sequence on both sides (no EOS). Each side is warmed up once
(our compilation, PyTorch's first-call set-up), then the two are timed in ``--repeats`` alternating rounds (each
side once per round, the order swapped every round: :func:`vlpeft_jax.benchmarks.timing.alternate`). Reported:
each side's median and interquartile range, and the ratio as the median (and quartiles) of the per-round ratios.
Tokens/s counts generated tokens (``batch * new_tokens / seconds``); the prefill is included in the time.

How the numbers were taken is part of the result (:mod:`vlpeft_jax.benchmarks.timing`): the load average before
and after, the share of CPU time other processes used meanwhile (a warning above 10 %: load slows PyTorch's
threads more than XLA's, which once made a 1.2x ratio read 4.84x), and the thread settings of both sides.

Example (a small run)::

    python run.py bench decode --layers 2 --width 128 --heads 4 --vocab 512 --batch 2 --new-tokens 8 \\
        --repeats 2 --out /tmp/decode.json
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlpeft_jax.benchmarks import timing
from vlpeft_jax.eval.decode import ModuleApply, generate

PAD = 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run.py bench decode", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", type=int, default=6, help="GPT-2 layers")
    p.add_argument("--width", type=int, default=512, help="model width")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size")
    p.add_argument("--batch", type=int, default=8, help="sequences decoded together")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per sequence")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sequence")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds, each side once per round (median reported)")
    p.add_argument("--num-beams", type=int, default=1,
                   help="1: greedy decoding; K > 1: beam search with K beams on both sides (no EOS, length penalty 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and prompts")
    p.add_argument("--torch-device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where transformers runs: auto = on the GPU when JAX runs on one and PyTorch sees CUDA")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads for the reference (default: PyTorch's own choice)")
    return p


def run(argv: list[str]) -> dict[str, Any]:
    """Runs the benchmark, prints a table and returns the results (also written to ``--out`` by the CLI).

    Example:
        >>> import contextlib, io
        >>> with contextlib.redirect_stdout(io.StringIO()) as table:  # a busy machine adds a warning line first
        ...     r = run(["--layers", "1", "--width", "32", "--heads", "2", "--vocab", "64", "--batch", "2",
        ...              "--prompt-len", "4", "--new-tokens", "4", "--repeats", "1"])
        >>> "decode benchmark: GPT-2 1 layers" in table.getvalue()
        True
        >>> r["jax"]["tokens_per_s"] > 0, r["torch"]["tokens_per_s"] > 0
        (True, True)
        >>> "other_cpu_share" in r["machine"], r["jax_over_torch_q1"] <= r["jax_over_torch"] <= r["jax_over_torch_q3"]
        (True, True)
    """
    args = _parser().parse_args(argv)
    if args.num_beams < 1:
        from vlpeft_jax.errors import ConfigError

        raise ConfigError(f"bench decode --num-beams={args.num_beams}; must be >= 1 (1 = greedy)")
    import torch
    import transformers

    from vlpeft_jax.benchmarks.train import resolve_torch_device
    from vlpeft_jax.hf.decoders import load_gpt2

    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    torch.manual_seed(args.seed)
    hf_config = transformers.GPT2Config(vocab_size=args.vocab, n_positions=args.prompt_len + args.new_tokens,
                                        n_embd=args.width, n_layer=args.layers, n_head=args.heads,
                                        bos_token_id=None, eos_token_id=None, pad_token_id=PAD)
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    with tempfile.TemporaryDirectory() as d:
        hf_model.save_pretrained(d)
        module, params = load_gpt2(d)
    params = jax.device_put(params)
    device = resolve_torch_device(args.torch_device, jax.default_backend(), torch.cuda.is_available())
    hf_model.to(device)

    rng = np.random.default_rng(args.seed)
    ids = rng.integers(1, args.vocab, (args.batch, args.prompt_len))
    mask = np.ones_like(ids)
    step = ModuleApply(module)
    beam = args.num_beams > 1
    decoding = f"beam search, {args.num_beams} beams" if beam else "greedy"
    jax_ids, jax_mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)

    def ours() -> np.ndarray:
        out = generate(step, params, jax_ids, jax_mask, max_new_tokens=args.new_tokens, eos_token_id=None,
                       pad_token_id=PAD, method="beam" if beam else "greedy", num_beams=args.num_beams)
        return np.asarray(jax.block_until_ready(out.sequences))

    torch_ids, torch_mask = torch.tensor(ids).to(device), torch.tensor(mask).to(device)

    def reference() -> np.ndarray:
        with torch.inference_mode():
            out = hf_model.generate(input_ids=torch_ids, attention_mask=torch_mask, do_sample=False,
                                    max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                    eos_token_id=None, pad_token_id=PAD, num_beams=args.num_beams,
                                    length_penalty=1.0)
        return out[:, args.prompt_len:].cpu().numpy()  # .cpu() waits for queued GPU work

    with timing.Monitor() as machine:
        times, outputs = timing.alternate({"jax": ours, "torch": reference}, rounds=args.repeats)
    jax_tokens, torch_tokens = outputs["jax"], outputs["torch"]
    n_tokens = args.batch * args.new_tokens
    assert torch_tokens.shape == jax_tokens.shape, (torch_tokens.shape, jax_tokens.shape)
    sides = {}
    for name in ("jax", "torch"):
        summary = timing.time_summary(times[name])
        sides[name] = {"tokens_per_s": n_tokens / summary["median_s"], **summary}
    ratio = timing.paired_ratio(times["torch"], times["jax"])  # per round: transformers' time / ours
    results = {
        "config": {k: v for k, v in vars(args).items()} | {
            "dtype": "float32", "decoding": decoding, "torch_device": device, "jax_backend": jax.default_backend()},
        **sides,
        "jax_over_torch": ratio["median"], "jax_over_torch_q1": ratio["q1"], "jax_over_torch_q3": ratio["q3"],
        # Same weights and prompts: the tokens should agree (near-ties of a random model may not).
        "token_agreement": float((jax_tokens == torch_tokens).mean()),
        "machine": machine.record(),
        "threads": timing.thread_settings(torch),
        "environment": {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                        "cpu": platform.processor() or platform.machine()},
    }
    _print(results, args)
    return results


def _print(r: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"decode benchmark: GPT-2 {args.layers} layers, width {args.width}, {args.heads} heads, vocab {args.vocab}, "
          f"batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, float32, "
          f"{r['config']['decoding']}, no EOS, "
          f"{args.repeats} alternating rounds; JAX on {r['config']['jax_backend']}, PyTorch on "
          f"{r['config']['torch_device']}")
    print(f"{'implementation':<42} {'median s':>10} {'IQR s':>17} {'tokens/s':>10}")
    for name, label in (("jax", "vlpeft_jax generate (jit, KV cache)"),
                        ("torch", "transformers GPT2LMHeadModel.generate")):
        s = r[name]
        print(f"{label:<42} {s['median_s']:>10.4f} {s['q1_s']:>8.4f}-{s['q3_s']:<8.4f} {s['tokens_per_s']:>10.1f}")
    m, t = r["machine"], r["threads"]
    other = "n/a" if m["other_cpu_share"] is None else f"{100 * m['other_cpu_share']:.0f} %"
    print(f"ratio (ours / transformers tokens/s, median of per-round ratios): {r['jax_over_torch']:.2f}x "
          f"[{r['jax_over_torch_q1']:.2f}-{r['jax_over_torch_q3']:.2f}]; token agreement "
          f"{100 * r['token_agreement']:.1f}%")
    print(f"machine: load average {m['load_average_before'][0]:.2f} before, {m['load_average_after'][0]:.2f} after; "
          f"other processes' CPU share {other}; {t['cores']} cores; torch threads {t['torch_threads']} "
          f"(inter-op {t['torch_interop_threads']}); XLA_FLAGS {t['environment']['XLA_FLAGS']!r}")
