"""``run.py bench train``: train-step time and peak memory of every PEFT method, here and in peft + PyTorch.

One GPT-2 (default: 6 layers, width 512, 8 heads, vocab 8192; batch 8 x 128 tokens; float32; AdamW) with
random weights is built by transformers, saved, and loaded here with :func:`vlpeft_jax.hf.decoders.load_gpt2`,
so both sides train the same model on the same random tokens (causal-LM cross-entropy). For each method:

- **ours**: the real training machinery: trainable/frozen labels (:mod:`vlpeft_jax.train.labels`),
  :func:`~vlpeft_jax.train.step.make_train_step` (``value_and_grad`` over the trainable leaves only) jitted with
  the state donated (:func:`~vlpeft_jax.train.step.jit_train_step`), optax AdamW from
  :func:`~vlpeft_jax.train.optim.build_optimizer`, the loss through :func:`vlpeft_jax.peft.base.apply_with`
  with the method active;
- **PyTorch**: ``GPT2LMHeadModel`` wrapped by ``peft.get_peft_model`` with the equivalent config (LoRA r=8 α=16
  on ``c_attn``; DoRA the same with ``use_dora``; IA3 on ``c_attn`` / ``mlp.c_proj``; prefix tuning and prompt
  tuning with 16 virtual tokens), ``torch.optim.AdamW`` over the trainable parameters, ``loss.backward()``,
  ``step()``, ``zero_grad()``. Full fine-tuning and BitFit, which need no peft, run on the plain model (all
  parameters, or only the biases, trainable). Bottleneck adapters and NeuroAda have no peft counterpart.

``--precision bfloat16`` (or ``float16``) measures mixed precision: ours computes in that dtype with float32
master weights and optimizer state (``config.precision``, :mod:`vlpeft_jax.train.precision`), PyTorch runs the
forward pass and the loss under ``torch.autocast`` with float32 parameters (its own recipe); float16 adds a dynamic
loss scale on both sides (ours :func:`~vlpeft_jax.train.precision.dynamic_loss_scale`, PyTorch
``torch.amp.GradScaler``).

Same settings on both sides: float32 (unless ``--precision``), no dropout anywhere (the HF config's dropouts are set
to 0, as our model has none), AdamW with lr 1e-4 and weight decay 0.01 (PyTorch's default single-tensor
implementation), no gradient clipping, an all-ones attention mask. Threads: PyTorch
``torch.set_num_threads(cores)``, XLA its default (a pool as large as the cores the process may use); ``--threads
N`` pins each measurement process to ``N`` cores, which sets both.

Accelerators: JAX runs on its default backend; ``--torch-device auto`` (the default) puts the PyTorch side on the
same GPU when JAX runs on one and PyTorch sees CUDA (``cpu`` or ``cuda`` force it). A PyTorch step is timed
between two ``torch.cuda.synchronize()`` calls, ours until ``jax.block_until_ready``. ``--matmul-precision``
sets float32 matrix products on both sides alike: ``highest`` (true float32: PyTorch's default, JAX's
``jax_default_matmul_precision="highest"``) or ``tf32`` (TensorFloat-32 on both, JAX's own GPU default). On a
GPU the table adds each side's device-memory peak. ``tools/device_bench.sh`` runs the whole measurement on a
GPU machine from the source tree, with that machine's own packages.

Timing: both steps of a method are built in one fresh process and run alternately (ours, PyTorch, ours, ...)
for ``--repeats`` pairs after ``--warmup`` pairs (compilation excluded), so both sides see the same load from
other processes; the table gives the medians and the median of the per-pair ratios. (Timing each side in its
own process was tried first: on a shared 2-core machine the load changed between the two processes by up to 3x.)

Memory, measured two ways (the table says which):

- ``XLA MiB``: XLA's own accounting of the compiled step, ``compiled.memory_analysis()``: argument + output
  - aliased (donated) + temporary bytes: parameters, optimizer state, batch and every intermediate buffer
  of one step. It is exact for the program but misses allocator overhead and the runtime itself;
- ``RSS MiB``: for both sides, each alone in a fresh process (``--memory-steps`` steps), the peak resident
  memory during the timed steps (``VmHWM``, reset after warm-up through ``/proc/self/clear_refs``, once
  freed heap went back to the system with ``malloc_trim``, so that compilation's garbage does not count) minus
  the resident memory after the imports (and the XLA runtime's start), before the model was loaded. It counts
  what the process really holds (weights, optimizer state, activations, gradients, allocator caches, compiled
  code), is comparable between the two sides, and is noisy by a few MiB. With ``--isolate none`` (everything
  in this process, faster) RSS is not reported.

The machine this was written on is a 2-core box shared with other work: step times vary with the load, which
is printed (``os.getloadavg``) before and after, and returned. Under heavy load PyTorch's OpenMP threads slow
down much more than XLA's thread pool, which favours us; compare at low load.

Example (not run by the doctests: it trains both sides and reads the load; tests/benchmarks runs it):
    >>> results = run(["--layers", "1", "--width", "32", "--heads", "2", "--vocab", "64", "--batch", "2",
    ...                "--seq", "8", "--repeats", "2", "--methods", "lora", "--isolate", "none"])  # doctest: +SKIP
    >>> results["results"]["lora"]["ratios"]["torch_over_ours"] > 0  # doctest: +SKIP
    True
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlpeft_jax.benchmarks import timing
from vlpeft_jax.benchmarks.timing import usable_cores
from vlpeft_jax.errors import ConfigError
from vlpeft_jax.peft import registry as peft_registry
from vlpeft_jax.train import precision as precision_lib
from vlpeft_jax.train import presets
from vlpeft_jax.train.losses import lm_loss

METHODS = ("lora", "dora", "ia3", "prefix", "prompt", "adapter", "bitfit", "neuroada", "full")
PEFT_METHODS = ("lora", "dora", "ia3", "prefix", "prompt")  # those peft implements
PLAIN_TORCH_METHODS = ("full", "bitfit")  # PyTorch without peft: which parameters require grad
LORA_RANK, LORA_ALPHA, VIRTUAL_TOKENS, ADAPTER_SIZE = 8, 16.0, 16, 64
LEARNING_RATE, WEIGHT_DECAY = 1e-4, 0.01
MATMUL_PRECISIONS = ("highest", "tf32")
PRECISIONS = precision_lib.PRECISIONS
MEMORY_NOTE = ("XLA MiB: compiled.memory_analysis() of our step (argument + output - aliased + temp bytes). "
               "RSS MiB: peak resident memory during steps (VmHWM, reset after warm-up) minus the resident memory "
               "after the imports; the same measure for both sides, each side alone in a fresh process. "
               "Device peak MiB (accelerators only): the peak of JAX's allocator over that process "
               "(memory_stats()['peak_bytes_in_use']) and PyTorch's torch.cuda.max_memory_allocated() over the "
               "timed steps.")


def add_shape_arguments(p: argparse.ArgumentParser) -> None:
    """The GPT-2 and batch shapes the training benchmarks share (``--layers --width --heads --vocab --batch --seq``;
    defaults: the issue's 6 layers, width 512, 8 heads, vocab 8192, batch 8 x 128)."""
    for name, default in (("layers", 6), ("width", 512), ("heads", 8), ("vocab", 8192), ("batch", 8), ("seq", 128)):
        p.add_argument(f"--{name}", type=int, default=default)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run.py bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(p)
    p.add_argument("--repeats", type=int, default=10, help="timed (paired) steps per method (median reported)")
    p.add_argument("--memory-steps", type=int, default=3,
                   help="steps of each side's separate memory measurement (0: skip it; --isolate process only)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   help=f"subset of {', '.join(METHODS)} (space or comma separated)")
    p.add_argument("--isolate", choices=("process", "none"), default="process",
                   help="process: every method's measurements in fresh Python processes (RSS reported); "
                        "none: all in this process (no RSS)")
    p.add_argument("--no-torch", action="store_true", help="measure our side only")
    p.add_argument("--torch-device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the PyTorch side runs; auto: cuda when JAX runs on a GPU and PyTorch sees CUDA, "
                        "else cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="float32",
                   help="compute dtype: ours computes in it with float32 master weights and optimizer state "
                        "(config.precision); PyTorch runs forward and loss under torch.autocast(dtype) (float16: "
                        "both sides with a dynamic loss scale)")
    p.add_argument("--matmul-precision", choices=MATMUL_PRECISIONS, default="highest",
                   help="float32 matrix products on both sides: highest (true float32, the default of PyTorch) "
                        "or tf32 (TensorFloat-32 on GPUs that have it; JAX's GPU default). No effect on CPUs")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for both sides (each measurement process is pinned to this many cores; "
                        "default: all cores)")
    return p


def parse_methods(requested: Sequence[str], valid: Sequence[str], command: str) -> list[str]:
    """``--methods`` values (repeatable, comma-separated) as a list without repeats, each checked against ``valid``.

    Raises:
      ConfigError: an unknown name or an empty list, naming ``command`` (e.g. ``bench train``).
    """
    names = [n for item in requested for n in item.split(",") if n]
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise ConfigError(f"{command} --methods: unknown {', '.join(map(repr, unknown)) or 'empty list'}; "
                          f"valid: {', '.join(valid)}")
    return list(dict.fromkeys(names))


def _available(name: str) -> bool:
    if name == "full":
        return True
    try:
        peft_registry.method_class(name)
    except ConfigError:
        return False
    return True


# --------------------------------------------------------------------------------------------------
# Process memory (Linux /proc)


def _status_kib(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_peak_rss() -> bool:
    """Returns freed heap to the system (glibc ``malloc_trim``), so that RSS counts live memory, then resets
    ``VmHWM`` to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------------------------------
# The model and the batch, shared by both sides


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def check_shapes(shapes: dict[str, int]) -> None:
    """Raises :class:`ConfigError` naming the flag for shapes the GPT-2 of either side cannot have: every size
    ``>= 1`` and ``--width`` a multiple of ``--heads`` (transformers' ``GPT2Attention`` requires it)."""
    for key, value in shapes.items():
        if value < 1:
            raise ConfigError(f"bench train --{key}={value}; must be >= 1")
    if shapes["width"] % shapes["heads"]:
        raise ConfigError(f"bench train --width={shapes['width']} is not divisible by --heads={shapes['heads']} "
                          "(GPT-2 splits the width evenly over the heads); choose e.g. --heads="
                          f"{max(h for h in range(1, shapes['heads'] + 1) if shapes['width'] % h == 0)}")


def write_checkpoint(directory: str | os.PathLike, shapes: dict[str, int]) -> None:
    """A random float32 Hugging Face ``GPT2LMHeadModel`` (seed 0, no dropout) saved to ``directory``.

    Raises:
      ConfigError: transformers rejects the shapes (its message attached, naming the bench flags).
    """
    import torch
    import transformers

    _quiet_transformers()

    flags = " ".join(f"--{k}={v}" for k, v in shapes.items())
    try:
        config = transformers.GPT2Config(
            vocab_size=shapes["vocab"], n_positions=max(1024, shapes["seq"] + 2 * VIRTUAL_TOKENS),
            n_embd=shapes["width"], n_layer=shapes["layers"], n_head=shapes["heads"],
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=shapes["vocab"] - 1,
            eos_token_id=shapes["vocab"] - 1)
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(config)
    except (ValueError, TypeError, RuntimeError) as e:
        raise ConfigError(f"bench train: transformers rejects the GPT-2 shapes {flags}: "
                          f"{' '.join(str(e).split())}") from None
    model.save_pretrained(directory)


def make_batch(shapes: dict[str, int]) -> dict[str, np.ndarray]:
    """Random token ids (seed 0) and an all-ones mask, ``[batch, seq]`` int32."""
    ids = np.random.default_rng(0).integers(0, shapes["vocab"], (shapes["batch"], shapes["seq"]), dtype=np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def set_matmul_precision(precision: str, torch_too: bool = True) -> None:
    """The same float32 matrix-product precision on both sides (see ``--matmul-precision``)."""
    if precision not in MATMUL_PRECISIONS:
        raise ConfigError(f"bench train --matmul-precision={precision!r}; valid: {', '.join(MATMUL_PRECISIONS)}")
    jax.config.update("jax_default_matmul_precision", "highest" if precision == "highest" else "tensorfloat32")
    if torch_too:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"


def resolve_torch_device(requested: str, jax_backend: str, cuda_available: bool) -> str:
    """``--torch-device`` -> ``"cpu"`` or ``"cuda"``: auto follows JAX onto a GPU when PyTorch can follow."""
    if requested == "cuda" and not cuda_available:
        raise ConfigError("bench train --torch-device=cuda: PyTorch sees no CUDA device here; use cpu or auto")
    if requested == "auto":
        return "cuda" if jax_backend == "gpu" and cuda_available else "cpu"
    return requested


def _jax_device_peak() -> int | None:
    """Peak bytes the JAX allocator has held on the default device in this process (accelerators; None on CPU)."""
    if jax.default_backend() == "cpu":
        return None
    return (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


def _reset_torch_peak(device: str) -> None:
    """Starts PyTorch's allocator peak afresh (CUDA only; see :func:`_torch_peak`)."""
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def _torch_peak(device: str) -> int | None:
    """``torch.cuda.max_memory_allocated()`` since :func:`_reset_torch_peak` (None off CUDA)."""
    if device != "cuda":
        return None
    import torch

    return int(torch.cuda.max_memory_allocated())


# --------------------------------------------------------------------------------------------------
# Our side


def our_method(name: str, shapes: dict[str, int]) -> tuple[Any | None, list[tuple[str, str]]]:
    """``(method instance or None for full fine-tuning, trainable rules)`` of one benchmarked method."""
    cls = None if name == "full" else peft_registry.method_class(name)
    if name in ("lora", "dora"):
        method = cls(targets=("c_attn",), rank=LORA_RANK, alpha=LORA_ALPHA, name=name)
    elif name == "ia3":
        method = cls(targets=("c_attn", "mlp/c_proj"), feedforward_modules=("mlp/c_proj",), name=name)
    elif name == "prefix":  # peft's default PrefixTuningConfig: prefixes trained directly, no encoder
        method = cls(num_virtual_tokens=VIRTUAL_TOKENS, num_kv_heads=shapes["heads"], projection=False,
                     type_embedding=False, name=name)
    elif name == "prompt":
        method = cls(num_virtual_tokens=VIRTUAL_TOKENS, init_from="random", name=name)
    elif name == "adapter":  # sequential (Houlsby) after attn/c_proj and mlp/c_proj
        method = cls(placement="sequential", bottleneck_size=min(ADAPTER_SIZE, shapes["width"]), name=name)
    elif name == "neuroada":
        method = cls(targets=("c_attn", "c_proj", "c_fc"), k=1, name=name)
    elif name == "bitfit":
        method = cls(name=name)
    else:
        return None, presets.full_finetuning()
    rules = method.trainable_rules() if hasattr(method, "trainable_rules") else presets.method(name)
    return method, rules


class OurStep:
    """Our compiled train step of one method, its state and batch; :meth:`step` runs one update.

    The state is donated to every call (as in training) and replaced by the returned one. The model is the GPT-2
    checkpoint in ``model_dir``, or ``model = (module, base)`` when given (``bench remat`` builds one module per
    policy; ``base`` is then owned, and donated, by this step).
    """

    def __init__(self, name: str, model_dir: str | None, shapes: dict[str, int], total_steps: int,
                 compute: str = "float32", model: tuple[Any, Any] | None = None) -> None:
        from vlpeft_jax.hf.decoders import load_gpt2
        from vlpeft_jax.train import labels as labels_lib
        from vlpeft_jax.train.optim import GroupOptimizer, OptimizerConfig, build_optimizer
        from vlpeft_jax.train.state import TrainState
        from vlpeft_jax.train.step import jit_train_step, make_train_step

        # parameters stay float32
        module, base = model if model is not None else load_gpt2(model_dir, dtype=getattr(jnp, compute))
        base = jax.device_put(base)
        method, rules = our_method(name, shapes)
        params = {"base": base, "peft": {} if method is None else {name: method.init(jax.random.key(1), base)}}
        labels = labels_lib.make_labels(params, rules)
        self.trainable = labels_lib.count_params(params, labels)["trainable"]
        adamw = GroupOptimizer("adamw", learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY, schedule="constant")
        tx = build_optimizer(OptimizerConfig(default=adamw, clip_norm=None), labels, total_steps=total_steps).tx
        if precision_lib.loss_scaling(compute):
            tx = precision_lib.dynamic_loss_scale(tx)
        self.state = TrainState.create(params, labels, tx, jax.random.PRNGKey(0))
        del params, base
        self.batch = jax.device_put(make_batch(shapes))
        loss_fn = lm_loss(module, [] if method is None else [(name, method)])
        t0 = time.perf_counter()
        self.compiled = jit_train_step(make_train_step(loss_fn, tx)).lower(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - t0
        mem = self.compiled.memory_analysis()
        self.xla_bytes = self.xla_temp_bytes = None
        if mem is not None:
            self.xla_bytes = int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                                 + mem.temp_size_in_bytes)
            self.xla_temp_bytes = int(mem.temp_size_in_bytes)
        self.losses: list[float] = []
        self.finite = True
        self.compute_dtype = jnp.dtype(module.config.dtype).name

    def step(self) -> float:
        """One update; returns its wall time in seconds (the result is waited for)."""
        t0 = time.perf_counter()
        self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        elapsed = time.perf_counter() - t0
        self.losses.append(float(metrics["loss"]))
        self.finite = self.finite and bool(metrics["finite"])
        return elapsed

    def info(self) -> dict[str, Any]:
        return {"trainable": self.trainable, "compute_dtype": self.compute_dtype, "compile_s": self.compile_s,
                "xla_bytes": self.xla_bytes,
                "xla_temp_bytes": self.xla_temp_bytes, "first_loss": self.losses[0], "last_loss": self.losses[-1],
                "finite": self.finite}


def _start_runtime() -> None:
    jax.block_until_ready(jnp.zeros(1) + 1)  # the XLA runtime's own memory is not the step's


def _times(times: list[float]) -> dict[str, Any]:
    return {"step_s": statistics.median(times), "step_min_s": min(times), "times_s": times}


def measure_ours(name: str, model_dir: str, shapes: dict[str, int], repeats: int, warmup: int,
                 precision: str = "highest", compute: str = "float32") -> dict[str, Any]:
    """Our step of method ``name`` alone in this process: times, XLA memory, the peak-RSS increase and, on an
    accelerator, the device allocator's peak."""
    set_matmul_precision(precision, torch_too=False)
    _start_runtime()
    rss0 = _status_kib("VmRSS")
    ours = OurStep(name, model_dir, shapes, repeats + warmup, compute)
    for _ in range(warmup):
        ours.step()
    reset = _reset_peak_rss()
    times = [ours.step() for _ in range(repeats)]
    hwm = _status_kib("VmHWM")
    rss = (hwm - rss0) * 1024 if reset and hwm is not None and rss0 is not None else None
    return {**_times(times), **ours.info(), "rss_bytes": rss, "device_peak_bytes": _jax_device_peak()}


# --------------------------------------------------------------------------------------------------
# PyTorch side


def peft_config(name: str) -> Any:
    """peft's config equivalent to :func:`our_method`'s settings for ``name``."""
    import peft

    if name in ("lora", "dora"):
        return peft.LoraConfig(task_type="CAUSAL_LM", r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                               target_modules=["c_attn"], fan_in_fan_out=True, use_dora=name == "dora")
    if name == "ia3":
        return peft.IA3Config(task_type="CAUSAL_LM", target_modules=["c_attn", "mlp.c_proj"],
                              feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True)
    if name == "prefix":
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS)
    if name == "prompt":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS)
    raise ConfigError(f"peft has no counterpart of {name!r} here; peft methods: {', '.join(PEFT_METHODS)}")


class TorchStep:
    """A peft + PyTorch train step (plain PyTorch for ``full`` and ``bitfit``); :meth:`step` runs one update."""

    def __init__(self, name: str, model_dir: str, shapes: dict[str, int], device: str = "cpu",
                 compute: str = "float32") -> None:
        import contextlib

        import peft
        import torch
        import transformers

        _quiet_transformers()
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float32)
        if name in PEFT_METHODS:
            model = peft.get_peft_model(model, peft_config(name))
        elif name == "bitfit":
            for n, p in model.named_parameters():
                p.requires_grad_(n.endswith(".bias"))
        elif name != "full":
            raise ConfigError(f"no PyTorch counterpart of {name!r}; valid: "
                              f"{', '.join(PEFT_METHODS + PLAIN_TORCH_METHODS)}")
        model.to(device).train()
        self.device = device
        params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = int(sum(p.numel() for p in params))
        self.model = model
        self.optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        self.batch = {k: torch.from_numpy(v).long().to(device) for k, v in make_batch(shapes).items()}
        self._sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.uses_peft = name in PEFT_METHODS
        self.losses: list[float] = []
        # float32 master weights, forward and loss under autocast (PyTorch's mixed-precision recipe)
        self._autocast = (contextlib.nullcontext if compute == "float32" else
                          lambda: torch.autocast(device_type=device, dtype=getattr(torch, compute)))
        self._scaler = torch.amp.GradScaler(device) if compute == "float16" else None

    def step(self) -> float:
        """One update; returns its wall time in seconds (queued GPU work is waited for)."""
        self._sync()
        t0 = time.perf_counter()
        with self._autocast():
            loss = self.model(input_ids=self.batch["input_ids"], attention_mask=self.batch["attention_mask"],
                              labels=self.batch["input_ids"]).loss
        if self._scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self._scaler.scale(loss).backward()
            self._scaler.step(self.optimizer)
            self._scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self._sync()
        elapsed = time.perf_counter() - t0
        self.losses.append(float(loss.detach()))
        return elapsed

    def info(self) -> dict[str, Any]:
        import torch

        return {"trainable": self.trainable, "threads": torch.get_num_threads(), "uses_peft": self.uses_peft,
                "device": self.device,
                "first_loss": self.losses[0], "last_loss": self.losses[-1]}


def _torch_threads(threads: int | None) -> None:
    import torch

    torch.set_num_threads(threads or usable_cores())


def measure_torch(name: str, model_dir: str, shapes: dict[str, int], repeats: int, warmup: int,
                  threads: int | None = None, device: str = "cpu", precision: str = "highest",
                  compute: str = "float32") -> dict[str, Any]:
    """The PyTorch step alone in this process (``threads`` threads; None: the cores this process may use):
    times, the peak-RSS increase and, on CUDA, the peak of ``torch.cuda.max_memory_allocated``."""
    _torch_threads(threads)
    set_matmul_precision(precision)
    rss0 = _status_kib("VmRSS")
    side = TorchStep(name, model_dir, shapes, device, compute)
    for _ in range(warmup):
        side.step()
    _reset_torch_peak(device)
    reset = _reset_peak_rss()
    times = [side.step() for _ in range(repeats)]
    hwm = _status_kib("VmHWM")
    rss = (hwm - rss0) * 1024 if reset and hwm is not None and rss0 is not None else None
    return {**_times(times), **side.info(), "rss_bytes": rss, "device_peak_bytes": _torch_peak(device)}


def measure_paired(name: str, model_dir: str, shapes: dict[str, int], repeats: int, warmup: int,
                   with_torch: bool, threads: int | None = None, device: str = "cpu",
                   precision: str = "highest", compute: str = "float32") -> dict[str, Any]:
    """Both steps built in this process and run alternately (ours, PyTorch, ours, ...), so that both see the
    same load from other processes; ``{"ours": ..., "torch": ... or None, "pair_ratios": [...]}``.

    On CUDA, PyTorch's allocator peak over the timed steps is measured here too (it counts PyTorch's own
    allocations only); JAX's peak is process-wide and is left to :func:`measure_ours`.
    """
    set_matmul_precision(precision, torch_too=with_torch)
    _start_runtime()
    ours = OurStep(name, model_dir, shapes, repeats + warmup, compute)
    side = None
    if with_torch:
        _torch_threads(threads)
        side = TorchStep(name, model_dir, shapes, device, compute)
    for _ in range(warmup):
        ours.step()
        if side is not None:
            side.step()
    if side is not None:
        _reset_torch_peak(device)
    ours_times, torch_times = [], []
    for _ in range(repeats):
        ours_times.append(ours.step())
        if side is not None:
            torch_times.append(side.step())
    return {"ours": {**_times(ours_times), **ours.info(), "device_peak_bytes": None},
            "torch": None if side is None else {**_times(torch_times), **side.info(),
                                                "device_peak_bytes": _torch_peak(device)},
            "pair_ratios": [t / o for t, o in zip(torch_times, ours_times, strict=True)] if side is not None else []}


# --------------------------------------------------------------------------------------------------
# Running measurements (each in a fresh process by default)


JOBS: dict[str, Callable[..., dict[str, Any]]] = {
    "ours": measure_ours, "torch": measure_torch, "paired": measure_paired}


def _in_fresh_process(job: str, kwargs: dict[str, Any], cpus: list[int] | None, workdir: str) -> dict[str, Any]:
    """``JOBS[job](**kwargs)`` in a new Python process (pinned to ``cpus``), for a clean heap and RSS."""
    stem = os.path.join(workdir, f"{job}_{kwargs['name']}")
    spec = {"job": job, "kwargs": kwargs, "cpus": cpus, "result": stem + ".json"}
    Path(stem + ".spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "vlpeft_jax.benchmarks.train", stem + ".spec.json"],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.exists(spec["result"]):
        raise RuntimeError(f"bench train: the {job} measurement of {kwargs['name']!r} failed (exit "
                           f"{proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(Path(spec["result"]).read_text())


def _worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    if spec["cpus"]:
        # before the XLA runtime starts: it sizes its thread pools by the CPUs this process may use
        os.sched_setaffinity(0, spec["cpus"])
    Path(spec["result"]).write_text(json.dumps(JOBS[spec["job"]](**spec["kwargs"])))
    return 0


def measure_method(name: str, model_dir: str, shapes: dict[str, int], args: argparse.Namespace, workdir: str
                   ) -> dict[str, Any]:
    """Paired timing and (in fresh processes) memory of one method, merged into ``{"ours", "torch", ...}``."""
    with_torch = not args.no_torch and name in PEFT_METHODS + PLAIN_TORCH_METHODS
    common = {"name": name, "model_dir": model_dir, "shapes": shapes, "precision": args.matmul_precision,
              "compute": args.precision}
    timing_kwargs = {**common, "repeats": args.repeats, "warmup": args.warmup, "with_torch": with_torch,
                     "threads": args.threads, "device": args.torch_device}
    if args.isolate == "none":  # XLA's thread pool already exists here: --threads applies to PyTorch only
        out = measure_paired(**timing_kwargs)
        for side in ("ours", "torch"):
            if out[side] is not None:
                out[side]["rss_bytes"] = None
        return out
    cpus = None
    if args.threads is not None and hasattr(os, "sched_getaffinity"):
        cpus = sorted(os.sched_getaffinity(0))[:args.threads]
    out = _in_fresh_process("paired", timing_kwargs, cpus, workdir)
    sides = ("ours", "torch") if with_torch else ("ours",)
    for side in sides:
        out[side]["rss_bytes"] = out[side]["alone_step_s"] = None
        if args.memory_steps > 0:
            kwargs = {**common, "repeats": args.memory_steps, "warmup": 1}
            if side == "torch":
                kwargs.update(threads=args.threads, device=args.torch_device)
            alone = _in_fresh_process(side, kwargs, cpus, workdir)
            for key in ("rss_bytes", "device_peak_bytes"):
                out[side][key] = alone[key]
            out[side]["alone_step_s"] = alone["step_s"]
    return out


def compute_text(compute: str) -> str:
    """How the table's header names the compute precision of both sides."""
    if compute == "float32":
        return "float32"
    scale = " + dynamic loss scale" if compute == "float16" else ""
    return f"{compute} compute (ours: float32 master weights; PyTorch: torch.autocast){scale}"


def device_name() -> str:
    d = jax.local_devices()[0]
    return f"{jax.default_backend()} ({getattr(d, 'device_kind', d.platform)})"


def safe_ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _mib(x: int | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:.0f}"


def fmt_or_na(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def run(argv: list[str]) -> dict[str, Any]:
    """Runs the benchmark, prints the table, returns every measurement and ratio.

    Ratios: ``torch_over_ours`` = PyTorch median step time / ours (> 1: we are faster), from the paired
    (alternating) steps; ``torch_over_ours_pairs`` = the median of the per-pair ratios, ``..._min`` of the minima;
    ``ours_over_full`` = our median step time / our full fine-tuning's (< 1: cheaper than full fine-tuning),
    and the same for both memory measures.
    """
    args = _parser().parse_args(argv)
    names = parse_methods(args.methods, METHODS, "bench train")
    for option, value, low in (("repeats", args.repeats, 1), ("warmup", args.warmup, 0),
                               ("memory-steps", args.memory_steps, 0)):
        if value < low:
            raise ConfigError(f"bench train --{option}={value}; must be >= {low}")
    if args.threads is not None and not 1 <= args.threads <= usable_cores():
        raise ConfigError(f"bench train --threads={args.threads}; must be in [1, {usable_cores()}] (the cores "
                          f"available)")
    if args.no_torch:
        args.torch_device = "cpu"
    else:
        import torch

        args.torch_device = resolve_torch_device(args.torch_device, jax.default_backend(), torch.cuda.is_available())
    shapes = {k: int(getattr(args, k)) for k in ("layers", "width", "heads", "vocab", "batch", "seq")}
    check_shapes(shapes)
    skipped = [n for n in names if not _available(n)]
    names = [n for n in names if n not in skipped]
    load_before = os.getloadavg()
    print(f"bench train: GPT-2 {shapes['layers']} layers, width {shapes['width']}, {shapes['heads']} heads, vocab "
          f"{shapes['vocab']}, batch {shapes['batch']} x {shapes['seq']} tokens, "
          f"{compute_text(args.precision)}, AdamW; "
          f"{args.repeats} timed steps after {args.warmup} warm-up; JAX on {device_name()}, PyTorch on "
          f"{args.torch_device}, float32 matmul precision {args.matmul_precision}; "
          f"{args.threads or usable_cores()} of {usable_cores()} cores, load average "
          f"{', '.join(f'{x:.2f}' for x in load_before)}")
    if skipped:
        print(f"not available in this version (skipped): {', '.join(skipped)}")
    results: dict[str, dict[str, Any]] = {}
    with timing.Monitor() as machine, tempfile.TemporaryDirectory(prefix="vlpeft_bench_train_") as workdir:
        model_dir = os.path.join(workdir, "gpt2")
        write_checkpoint(model_dir, shapes)
        for name in names:
            results[name] = r = measure_method(name, model_dir, shapes, args, workdir)
            print(f"  {name}: ours {1000 * r['ours']['step_s']:.1f} ms"
                  + ("" if r["torch"] is None else f", PyTorch {1000 * r['torch']['step_s']:.1f} ms"), flush=True)
    load_after = os.getloadavg()

    full = results.get("full", {}).get("ours")
    for r in results.values():
        ours, torch_side = r["ours"], r["torch"]
        r["ratios"] = {
            "torch_over_ours": None if torch_side is None else safe_ratio(torch_side["step_s"], ours["step_s"]),
            "torch_over_ours_pairs": statistics.median(r["pair_ratios"]) if r["pair_ratios"] else None,
            "torch_over_ours_min": None if torch_side is None else safe_ratio(torch_side["step_min_s"],
                                                                              ours["step_min_s"]),
            "torch_over_ours_rss": None if torch_side is None else safe_ratio(torch_side["rss_bytes"],
                                                                              ours["rss_bytes"]),
            "torch_over_ours_device_peak": None if torch_side is None else safe_ratio(torch_side["device_peak_bytes"],
                                                                                    ours["device_peak_bytes"]),
            "ours_over_full": None if full is None else safe_ratio(ours["step_s"], full["step_s"]),
            "ours_over_full_xla_bytes": None if full is None else safe_ratio(ours["xla_bytes"], full["xla_bytes"]),
            "ours_over_full_rss": None if full is None else safe_ratio(ours["rss_bytes"], full["rss_bytes"]),
        }

    device_memory = any(r[side] is not None and r[side].get("device_peak_bytes") is not None
                        for r in results.values() for side in ("ours", "torch"))
    print()
    print("| method | trainable | ours ms/step | PyTorch ms/step | PyTorch/ours (>1: we are faster) | median of "
          "pair ratios | ours/full FT | ours XLA MiB | ours RSS MiB | PyTorch RSS MiB |"
          + (" ours device peak MiB | PyTorch device peak MiB |" if device_memory else ""))
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if device_memory else ""))
    for name, r in results.items():
        ours, torch_side, ratios = r["ours"], r["torch"], r["ratios"]
        torch_ms = "-" if torch_side is None else f"{1000 * torch_side['step_s']:.1f}"
        if torch_side is not None and not torch_side["uses_peft"]:
            torch_ms += " (plain torch)"
        print(f"| {name} | {ours['trainable']:,} | {1000 * ours['step_s']:.1f} | {torch_ms} | "
              f"{fmt_or_na(ratios['torch_over_ours'])} | {fmt_or_na(ratios['torch_over_ours_pairs'])} | "
              f"{fmt_or_na(ratios['ours_over_full'])} | {_mib(ours['xla_bytes'])} | "
              f"{_mib(ours['rss_bytes'])} | {_mib(None if torch_side is None else torch_side['rss_bytes'])} |"
              + (f" {_mib(ours.get('device_peak_bytes'))} | "
                 f"{_mib(None if torch_side is None else torch_side.get('device_peak_bytes'))} |"
                 if device_memory else ""))
    print()
    print("Step times: medians over steps run alternately (ours, PyTorch, ours, ...) in one process, so that both "
          "sides see the same load; a pair ratio is one PyTorch step / the our step before it. " + MEMORY_NOTE)
    other = "n/a" if machine.other_cpu_share is None else f"{100 * machine.other_cpu_share:.0f} %"
    print(f"load average before {', '.join(f'{x:.2f}' for x in load_before)}, after "
          f"{', '.join(f'{x:.2f}' for x in load_after)} (1, 5, 15 min; {os.cpu_count()} cores); other processes' "
          f"CPU share while it ran {other}")
    for w in machine.warnings:
        print(w)

    import importlib.metadata as md

    versions = {}
    for pkg in ("jax", "jaxlib", "torch", "transformers", "peft"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "settings": {**shapes, "repeats": args.repeats, "warmup": args.warmup, "isolate": args.isolate,
                     "memory_steps": args.memory_steps,
                     "threads": args.threads or usable_cores(), "torch_device": args.torch_device,
                     "matmul_precision": args.matmul_precision, "precision": args.precision,
                     "methods": names, "lora_rank": LORA_RANK, "lora_alpha": LORA_ALPHA,
                     "virtual_tokens": VIRTUAL_TOKENS, "learning_rate": LEARNING_RATE, "weight_decay": WEIGHT_DECAY,
                     "dtype": "float32"},
        "environment": {"backend": jax.default_backend(), "device": device_name(), "cpu_count": os.cpu_count(),
                        "versions": versions,
                        "load_average_before": list(load_before), "load_average_after": list(load_after),
                        "machine": machine.record(),
                        "threads": timing.thread_settings(sys.modules.get("torch"))},
        "skipped": skipped,
        "results": results,
        "memory_note": MEMORY_NOTE,
    }


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
