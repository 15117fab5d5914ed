"""``run.py bench decode``: greedy decoding throughput, our jitted KV-cache loop vs transformers' ``generate``.

Both run in this process on the same random GPT-2 weights (built with transformers, saved, and loaded
through :func:`vlpeft_jax.hf.decoders.load_gpt2`), the same prompts and float32. Greedy decoding
produces exactly ``--new-tokens`` tokens per sequence on both sides (no EOS). Each side is warmed up once
(our compilation, PyTorch's first-call set-up), then timed ``--repeats`` times; the median is reported.
Tokens/s counts generated tokens (``batch * new_tokens / seconds``); the prefill is included in the time.

Example (a small run)::

    python run.py bench decode --layers 2 --width 128 --heads 4 --vocab 512 --batch 2 --new-tokens 8 \\
        --repeats 2 --out /tmp/decode.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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
    p.add_argument("--repeats", type=int, default=5, help="timed runs per implementation (median reported)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and prompts")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads for the reference (default: PyTorch's own choice)")
    return p


def _median_seconds(fn: Any, repeats: int) -> tuple[float, list[float], Any]:
    result = fn()  # warm-up: compilation / first-call set-up, not timed
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, result


def run(argv: list[str]) -> dict[str, Any]:
    """Runs the benchmark, prints a table and returns the results (also written to ``--out`` by the CLI).

    Example:
        >>> r = run(["--layers", "1", "--width", "32", "--heads", "2", "--vocab", "64", "--batch", "2",
        ...          "--prompt-len", "4", "--new-tokens", "4", "--repeats", "1"])  # doctest: +ELLIPSIS
        decode ...
        >>> r["jax"]["tokens_per_s"] > 0, r["torch"]["tokens_per_s"] > 0
        (True, True)
    """
    args = _parser().parse_args(argv)
    import torch
    import transformers

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

    rng = np.random.default_rng(args.seed)
    ids = rng.integers(1, args.vocab, (args.batch, args.prompt_len))
    mask = np.ones_like(ids)
    step = ModuleApply(module)
    jax_ids, jax_mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)

    def ours() -> np.ndarray:
        out = generate(step, params, jax_ids, jax_mask, max_new_tokens=args.new_tokens, eos_token_id=None,
                       pad_token_id=PAD)
        return np.asarray(jax.block_until_ready(out.sequences))

    torch_ids, torch_mask = torch.tensor(ids), torch.tensor(mask)

    def reference() -> np.ndarray:
        with torch.inference_mode():
            out = hf_model.generate(input_ids=torch_ids, attention_mask=torch_mask, do_sample=False,
                                    max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                    eos_token_id=None, pad_token_id=PAD)
        return out[:, args.prompt_len:].numpy()

    jax_s, jax_times, jax_tokens = _median_seconds(ours, args.repeats)
    torch_s, torch_times, torch_tokens = _median_seconds(reference, args.repeats)
    n_tokens = args.batch * args.new_tokens
    assert torch_tokens.shape == jax_tokens.shape, (torch_tokens.shape, jax_tokens.shape)
    results = {
        "config": {k: v for k, v in vars(args).items()} | {"dtype": "float32", "decoding": "greedy, no EOS"},
        "jax": {"tokens_per_s": n_tokens / jax_s, "median_s": jax_s, "times_s": jax_times},
        "torch": {"tokens_per_s": n_tokens / torch_s, "median_s": torch_s, "times_s": torch_times},
        "jax_over_torch": torch_s / jax_s,
        # Same weights and prompts: the greedy tokens should agree (near-ties of a random model may not).
        "token_agreement": float((jax_tokens == torch_tokens).mean()),
        "environment": {"jax": jax.__version__, "jax_backend": jax.default_backend(), "torch": torch.__version__,
                        "torch_threads": torch.get_num_threads(), "transformers": transformers.__version__,
                        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                        # other processes on the machine distort both timings; this says how busy it was
                        "load_average_1min": os.getloadavg()[0]},
    }
    _print(results, args)
    return results


def _print(r: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"decode benchmark: GPT-2 {args.layers} layers, width {args.width}, {args.heads} heads, vocab {args.vocab}, "
          f"batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, float32, greedy, "
          f"median of {args.repeats}")
    print(f"{'implementation':<42} {'median s':>10} {'tokens/s':>10}")
    print(f"{'vlpeft_jax generate (jit, KV cache)':<42} {r['jax']['median_s']:>10.4f} "
          f"{r['jax']['tokens_per_s']:>10.1f}")
    print(f"{'transformers GPT2LMHeadModel.generate':<42} {r['torch']['median_s']:>10.4f} "
          f"{r['torch']['tokens_per_s']:>10.1f}")
    env = r["environment"]
    print(f"ratio (ours / transformers tokens/s): {r['jax_over_torch']:.2f}x; "
          f"greedy token agreement {100 * r['token_agreement']:.1f}%; torch threads {env['torch_threads']}, "
          f"{env['cpu_count']} CPUs, load average {env['load_average_1min']:.1f}")
