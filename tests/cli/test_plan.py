"""``run.py plan``: the verdict against ``--device-memory``, the simulated-devices subprocess, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlpeft_jax.cli import plan
from vlpeft_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--config", "configs/llama_plan.py:7b_lora,tiny", "--seq", "8"]
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def run_py(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_COMPILE}
    env.pop(plan.CHILD_ENV, None)
    return subprocess.run([sys.executable, "run.py", "plan", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def verdicts() -> dict[str, str]:
    """The table printed for a roomy and an absurdly small budget (one device: no subprocess)."""
    import contextlib
    import io

    out = {}
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        for name, budget in (("roomy", "1GiB"), ("tiny", "1KiB")):
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                assert plan.main([*TINY, "--mesh", "data=1", "--device-memory", budget]) == 0
            out[name] = buffer.getvalue()
    finally:
        os.chdir(cwd)
    return out


def test_fits_and_does_not_fit(verdicts):
    roomy, tiny = verdicts["roomy"], verdicts["tiny"]
    assert "FITS:" in roomy and "DOES NOT FIT" not in roomy
    assert "DOES NOT FIT:" in tiny and "<= 1.00 KiB" not in tiny and "> 1.00 KiB device memory" in tiny
    for text in (roomy, tiny):
        assert "mesh data=1,fsdp=1,tensor=1" in text and "| optimizer state |" in text
        assert "compile time (host):" in text and "simulated" not in text


def test_simulated_mesh_in_a_subprocess_json():
    proc = run_py(*TINY, "--mesh", "fsdp=2", "--device-memory", "80GB", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--xla_force_host_platform_device_count=2" in proc.stderr  # said where the devices came from
    out = json.loads(proc.stdout)
    assert out["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1} and out["num_devices"] == 2
    assert out["fits"] is True and out["device_memory"] == 80 * 10**9 and out["batch"] == [2, 8]


@pytest.mark.parametrize("args, needle", [(["--mesh", "model=2"], "data, fsdp, tensor"),
                                          (["--mesh", "fsdp=0"], "data, fsdp, tensor"),
                                          (["--device-memory", "16 gigs"], "16GiB, 80GB, 1.5TiB")])
def test_bad_values_are_one_line(args, needle):
    with pytest.raises(ConfigError, match=needle):
        plan.main([*TINY, *args])


def test_bad_mesh_exit_code_2():
    proc = run_py(*TINY, "--mesh", "data=2,pipeline=4")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: mesh") and "pipeline" in lines[0], proc.stderr
    assert "data, fsdp, tensor" in lines[0] and proc.stdout == ""
