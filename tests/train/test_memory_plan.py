"""Memory plans scale as the sharding says (``vlpeft_jax.train.memory``), on a 2-layer width-64 LLaMA.

A subprocess with 8 simulated CPU devices compiles the train step of ``configs/llama_plan.py:7b_full,tiny``
and ``:7b_lora,tiny`` on several meshes; the per-device state bytes are compared with a count written here
from the architecture (every matrix has one dimension named ``embed``, sharded over fsdp, and one named
``heads``/``kv``/``mlp``/``vocab``, sharded over tensor; norm scales are replicated), and the compiled
executable's argument and alias sizes with the state and batch bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.train.memory import parse_bytes, parse_mesh

ROOT = Path(__file__).resolve().parents[2]
# the state bytes do not depend on code generation: compile with LLVM's cheap settings (about 2x faster)
FAST_COMPILE = " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
SEQ = 8
# the tiny model (configs/llama_plan.py TINY): vocab 128, hidden 64, intermediate 128, 2 layers, untied head
V, H, FF, L = 128, 64, 128, 2
MATRICES = [(V, H), (H, V)] + L * [(H, H)] * 4 + L * [(H, FF), (H, FF), (FF, H)]  # embed, head, q k v o, mlp
NORMS = [H] * (2 * L + 1)
LORA_RANK, LORA_TARGETS = 16, 2  # q_proj and v_proj
RUNS = {"full/fsdp=4": ("7b_full", "fsdp=4"),
        "full/data=4": ("7b_full", "data=4"), "full/2x2x2": ("7b_full", "data=2,fsdp=2,tensor=2"),
        "lora/fsdp=4": ("7b_lora", "fsdp=4")}


def worker() -> dict:
    import jax

    from configs.llama_plan import get_config
    from vlpeft_jax.cli.plan import build_plan

    assert jax.device_count() == 8, jax.devices()
    out = {}
    for name, (variant, mesh) in RUNS.items():
        plan, details = build_plan(get_config(f"{variant},tiny"), parse_mesh(mesh), seq=SEQ,
                                   device_memory=parse_bytes("1GiB"))
        out[name] = {**plan.to_dict(), **details}
    return out


@pytest.fixture(scope="module")
def plans() -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8" + FAST_COMPILE}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "worker"], env=env, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def expected_param_bytes(fsdp: int, tensor: int) -> int:
    """Per-device float32 bytes of the base: each matrix divided by fsdp x tensor (all sizes divide), norms whole."""
    return 4 * (sum(a * b for a, b in MATRICES) // (fsdp * tensor) + sum(NORMS))


def test_parameter_count_is_the_architecture(plans):
    assert plans["full/data=4"]["base_parameters"] == sum(a * b for a, b in MATRICES) + sum(NORMS)
    assert plans["lora/fsdp=4"]["trainable_parameters"] == L * LORA_TARGETS * 2 * H * LORA_RANK


def test_parameter_bytes_shard_as_declared(plans):
    assert plans["full/data=4"]["params_bytes"] == expected_param_bytes(1, 1)  # data parallel: replicated
    assert plans["full/fsdp=4"]["params_bytes"] == expected_param_bytes(4, 1)
    assert plans["full/2x2x2"]["params_bytes"] == expected_param_bytes(2, 2)
    matrices = 4 * sum(a * b for a, b in MATRICES)
    assert plans["full/data=4"]["params_bytes"] - plans["full/fsdp=4"]["params_bytes"] == matrices - matrices // 4
    # LoRA: the base is frozen (sharded like the base); on q and v ([embed, heads] kernels) A [H, r] shards its
    # embed axis over fsdp=4 and B [r, H] its heads axis over tensor (size 1: whole)
    lora = plans["lora/fsdp=4"]
    assert lora["frozen_bytes"] == expected_param_bytes(4, 1)
    assert lora["trainable_bytes"] == 4 * L * LORA_TARGETS * (H * LORA_RANK // 4 + LORA_RANK * H)


def test_optimizer_state_follows_the_trainable_parameters(plans):
    # AdamW: mu and nu shaped and sharded like the trainable leaves, plus a few int32 step counters
    for name, p in plans.items():
        extra = p["opt_state_bytes"] - 2 * p["trainable_bytes"]
        assert 0 <= extra <= 16, (name, p["opt_state_bytes"], p["trainable_bytes"])
    assert plans["full/fsdp=4"]["opt_state_bytes"] < plans["full/data=4"]["opt_state_bytes"] / 3
    assert plans["lora/fsdp=4"]["opt_state_bytes"] < plans["full/fsdp=4"]["opt_state_bytes"] / 3


def test_compiled_sizes_agree_with_the_state(plans):
    for name, p in plans.items():
        devices = p["mesh"]["data"] * p["mesh"]["fsdp"]
        assert p["batch"] == [devices, SEQ]
        assert p["batch_bytes"] == 4 * SEQ  # one int32 sequence per batch shard
        # the executable's arguments are this device's state and batch shard; the donated state is aliased
        assert p["argument_bytes"] == p["state_bytes"] + p["batch_bytes"], name
        assert p["alias_bytes"] == p["state_bytes"], name
        assert p["temp_bytes"] > 0 and p["output_bytes"] >= p["state_bytes"]
        assert p["total_bytes"] == p["argument_bytes"] + p["output_bytes"] - p["alias_bytes"] + p["temp_bytes"] \
            + p["code_bytes"]
        assert p["fits"] is True and p["device_memory"] == 2**30
        assert p["platform"] == "cpu" and p["num_devices"] == devices * p["mesh"]["tensor"]


@pytest.mark.parametrize("text, value", [("16GiB", 16 * 2**30), ("80GB", 80 * 10**9), ("1.5TiB", 3 * 2**39),
                                         ("512 mib", 512 * 2**20), ("1000", 1000)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["16 GiBs", "lots", "-1GB", "0", ""])
def test_parse_bytes_refuses(text):
    with pytest.raises(ConfigError, match="valid: .*GiB"):
        parse_bytes(text)


def test_parse_mesh():
    assert parse_mesh("data=2, tensor=4") == {"data": 2, "fsdp": 1, "tensor": 4}
    for bad in ("model=2", "data=0", "data=-1", "data=x", "data", "data=2,data=2", ""):
        with pytest.raises(ConfigError, match="data, fsdp, tensor"):
            parse_mesh(bad)


if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    print(json.dumps(worker()))
