"""Benchmarks behind ``run.py bench NAME``: each module has ``run(argv: list[str]) -> dict`` that prints a table
of ratios measured side by side in one process and returns the numbers.

- :mod:`vlpeft_jax.benchmarks.decode`: greedy decoding throughput, our jitted KV-cache loop vs transformers'
  ``generate``.
- :mod:`vlpeft_jax.benchmarks.metrics`: our BLEU, ROUGE-L and CIDEr-D vs pycocoevalcap's.
- :mod:`vlpeft_jax.benchmarks.train`: train-step time and peak memory of every PEFT method, ours vs peft +
  PyTorch.
- :mod:`vlpeft_jax.benchmarks.sparse`: mask-based GPS vs NeuroAda vs LoRA (step time, XLA memory), and
  NeuroAda's gather vs scatter path.
- :mod:`vlpeft_jax.benchmarks.mtl`: the multi-task train step of every gradient-manipulation method, dense and
  with PSN sparse training, vs the plain summed-loss step; the per-task-gradient strategies (vjp, jacrev, loop).

Layer 6 of the package (``DESIGN.md`` §2): it may import every library layer except ``cli``, and it is the
only library code that imports peft, and torch too apart from :mod:`vlpeft_jax.hf.io` reading PyTorch ``.bin``
and bfloat16 checkpoints (here both lazily, inside the functions that need them). Nothing in the library
imports this package; :mod:`vlpeft_jax.cli.bench` loads its modules by name.
"""
