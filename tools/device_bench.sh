#!/usr/bin/env bash
# `run.py bench train` on an accelerator: JAX and peft + PyTorch on the same GPU, every method, the issue's
# shapes (GPT-2, 6 layers, width 512, vocab 8192, batch 8 x 128, AdamW), float32, then TensorFloat-32.
#
# Runs from the source tree with the machine's own jax / flax / optax / torch / transformers / peft: no pip,
# no network (the benchmark needs none of ml_collections, tensorboardX, pycocoevalcap or orbax).
#
#   tools/device_bench.sh [OUT_DIR]        (default: $OUT, else runs/device_bench)
#
# BENCH_ARGS is appended to every benchmark call, e.g. a dry run on a CPU at toy shapes:
#   BENCH_ARGS="--layers 1 --width 32 --heads 2 --vocab 64 --batch 2 --seq 8" tools/device_bench.sh /tmp/x
#
# DECODE_ARGS is appended to every decode call, e.g. DECODE_ARGS="--layers 1 --width 32 --heads 2 --vocab 64
# --batch 2 --new-tokens 4 --repeats 1".
#
# Writes environment.txt, bench_train_fp32.{txt,json}, bench_train_tf32.{txt,json},
# bench_train_bf16.{txt,json} (bfloat16 compute, float32 master weights; PyTorch under torch.autocast),
# bench_train_memory.{txt,json} (LoRA and full fine-tuning, each side alone in a fresh process),
# bench_train_memory_bf16.{txt,json} (the same in bfloat16), and bench_decode_{greedy_b8,greedy_b1,beam4}.{txt,json}
# (our jitted KV-cache loop against transformers' generate, float32).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-runs/device_bench}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
py="${PYTHON:-python3}"

"$py" - <<'PY' 2>&1 | tee "$out/environment.txt"
import importlib.metadata as md
import jax
import torch
print("devices:", jax.devices(), "| torch.cuda:", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft", "safetensors", "tokenizers"):
    try:
        print(f"{pkg} {md.version(pkg)}")
    except md.PackageNotFoundError:
        print(f"{pkg} MISSING")
PY

bench() {  # NAME ARGS...: one benchmark run, its table in NAME.txt and results in NAME.json
  local name="$1"; shift
  # shellcheck disable=SC2086  # BENCH_ARGS is split into words on purpose
  "$py" run.py bench train "$@" ${BENCH_ARGS:-} --out "$out/$name.json" 2>&1 | tee "$out/$name.txt"
}
# timing of every method, both sides in one process (fast; XLA MiB is exact for our step)
bench bench_train_fp32 --isolate none --repeats 30 --warmup 5
bench bench_train_tf32 --isolate none --repeats 30 --warmup 5 --matmul-precision tf32
bench bench_train_bf16 --isolate none --repeats 30 --warmup 5 --precision bfloat16
# device-memory peaks, each side alone in a fresh process
bench bench_train_memory --methods lora,full --repeats 10 --warmup 3 --memory-steps 5
bench bench_train_memory_bf16 --methods lora,full --repeats 10 --warmup 3 --memory-steps 5 --precision bfloat16

decode() {  # NAME ARGS...: one decoding benchmark (greedy or beam search), table and JSON as above
  local name="$1"; shift
  # shellcheck disable=SC2086  # DECODE_ARGS is split into words on purpose
  "$py" run.py bench decode "$@" ${DECODE_ARGS:-} --out "$out/$name.json" 2>&1 | tee "$out/$name.txt"
}
decode bench_decode_greedy_b8 --batch 8 --repeats 10
decode bench_decode_greedy_b1 --batch 1 --repeats 10
decode bench_decode_beam4 --batch 8 --num-beams 4 --repeats 5
