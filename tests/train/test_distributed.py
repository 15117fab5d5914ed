"""Multi-process ``jax.distributed`` training on this machine matches single-process training.

Two worker processes (``distributed_worker.py``; a local coordinator on a free port, 2 simulated CPU
devices each, gloo collectives, so a 4-device global mesh) train a 1-layer LLaMA of width 32 (full
fine-tuning with AdamW, every parameter and Adam moment sharded by its logical axes) with
:func:`vlpeft_jax.train.loop.train`, each process feeding only its half of every global batch:

* ``hybrid``: mesh data=2 x fsdp=2 (the data axis spans the two processes), a fresh run;
* ``fsdp``: mesh fsdp=4 (parameters sharded across both processes), resumed from a checkpoint that the
  single-process reference run wrote at step 2.

This module computes the reference in its own process (one device, same seed, same data, same global
batch) and checks: both loss curves equal the reference's (relative tolerance 1e-5, float32 with
"highest" matmul precision); the final train states (parameters, Adam moments) equal the reference's
(relative 1e-5 above an absolute floor of 1e-7; measured: at most 4e-6 relative); the checkpoints the
2-process runs wrote (shards from both processes) restore in this single process bit for bit to the state
the workers held in memory; the 2-process run resumed from a single-process checkpoint continues as the
single process did (same tolerances); and each process fed the rows ``sharding.process_rows`` names.

A failing worker ends the test at once with every worker's exit status and stderr tail; the others are
killed (so are all of them after ``TIMEOUT_S``), never left waiting on their peers' collectives.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.train import distributed_worker as dw
from vlpeft_jax.train import sharding, stages
from vlpeft_jax.train.checkpoint import Checkpointer
from vlpeft_jax.train.loop import train

WORKER = Path(__file__).with_name("distributed_worker.py")
REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240  # generous for a loaded CI machine; the workers need ~9 CPU-seconds each
LOSS_RTOL = 1e-5
STATE_RTOL, STATE_ATOL = 1e-5, 1e-7  # parameters ~0.3, Adam second moments ~1e-6: relative, with a small floor


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 3000) -> str:
    text = path.read_text(errors="replace") if path.exists() else "<no output>"
    return text[-n:]


def run_workers(work: Path, n: int = 2, timeout: float = TIMEOUT_S) -> list[dict]:
    """Launches ``n`` worker processes, waits for all (killing every one if any fails or time runs out) and
    returns their JSON outputs; a failure reports each worker's exit status and stderr tail."""
    coordinator = f"localhost:{_free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    env.pop("XLA_FLAGS", None)  # the worker sets its own device count
    procs, logs = [], []
    for i in range(n):
        log = work / f"worker_{i}.log"
        logs.append(log)
        with log.open("w") as f:  # the child keeps its own handle
            procs.append(subprocess.Popen(
                [sys.executable, str(WORKER), "--process-id", str(i), "--num-processes", str(n), "--coordinator",
                 coordinator, "--work", str(work), "--out", str(work / f"worker_{i}.json")],
                stdout=subprocess.DEVNULL, stderr=f, env=env, cwd=REPO))
    deadline = time.monotonic() + timeout
    failed = None
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                failed = "a worker failed"
                break
            if time.monotonic() > deadline:
                failed = f"timed out after {timeout} s"
                break
            time.sleep(0.1)
    finally:
        for p in procs:  # never leave one hanging (a lone survivor would wait on its peer's collectives)
            if p.poll() is None:
                p.kill()
            p.wait()
    if failed or any(p.returncode for p in procs):
        report = "\n".join(f"--- worker {i}: exit status {p.returncode}; stderr tail:\n{_tail(logs[i])}"
                           for i, p in enumerate(procs))
        pytest.fail(f"2-process training: {failed or 'a worker failed'}\n{report}", pytrace=False)
    return [json.loads((work / f"worker_{i}.json").read_text()) for i in range(n)]


def assemble(work: Path, name: str, workers: list[dict], like: list) -> list[np.ndarray]:
    """The global arrays of run ``name``'s final state from every process's addressable shards (checking that
    every element is covered and that replicas of the same element agree)."""
    out = [np.zeros(np.shape(x), np.asarray(x).dtype) for x in like]
    seen = [np.zeros(np.shape(x), bool) for x in like]
    for w in workers:
        data = np.load(work / f"{name}_p{w['process_index']}.npz")
        for leaf, shard, bounds in w["runs"][name]["shards"]:
            where = tuple(slice(a, b) for a, b in bounds)
            value = data[f"{leaf}_{shard}"]
            previous = seen[leaf][where]
            np.testing.assert_array_equal(value[previous], out[leaf][where][previous],
                                          err_msg=f"{name}: replicas of leaf {leaf} differ between devices")
            out[leaf][where] = value
            seen[leaf][where] = True
    for i, s in enumerate(seen):
        assert s.all(), f"{name}: leaf {i} is not fully covered by the processes' shards"
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("distributed")
    start = time.perf_counter()
    params, specs, stage, loss_fn = dw.setup()
    mesh = sharding.make_mesh()  # one device
    ref = train(params, [stage], dw.data_factory(), work / "single", loss_fn=loss_fn, seed=dw.SEED, mesh=mesh,
                param_specs=specs, checkpoint_every=dw.CHECKPOINT_EVERY, keep_checkpoints=3, progress=False,
                verbose=False, tensorboard=False, async_checkpoints=False)
    # the 2-process FSDP run resumes from the single-process checkpoint of step 2
    (work / "fsdp" / "checkpoints").mkdir(parents=True)
    shutil.copytree(work / "single" / "checkpoints" / str(dw.CHECKPOINT_EVERY),
                    work / "fsdp" / "checkpoints" / str(dw.CHECKPOINT_EVERY))
    reference_s = time.perf_counter() - start
    workers = run_workers(work)
    workers_s = time.perf_counter() - start - reference_s
    print(f"single-process reference {reference_s:.1f} s, 2-process workers {workers_s:.1f} s (wall; load average "
          f"{os.getloadavg()[0]:.1f})")
    plan = stages.plan_stages(params, [stage])[0]
    abstract = stages.abstract_stage_state(params, plan, mesh, sharding.tree_shardings(params, mesh, specs))
    return {"work": work, "ref": ref, "workers": workers, "abstract": abstract,
            "ref_leaves": [np.asarray(x) for x in jax.tree.leaves(jax.device_get(ref.state))]}


@pytest.mark.slow
def test_two_processes_train_like_one(runs):
    ref, workers = runs["ref"], runs["workers"]
    ref_losses = np.array([h["loss"] for h in ref.history])
    assert len(ref_losses) == dw.STEPS and np.ptp(ref_losses) > 1e-3  # the curve moves: a real comparison
    assert [(w["process_index"], w["process_count"], w["devices"]) for w in workers] == [(0, 2, 4), (1, 2, 4)]
    for name, first in (("hybrid", 0), ("fsdp", dw.CHECKPOINT_EVERY)):
        curves = [w["runs"][name] for w in workers]
        assert curves[0]["losses"] == curves[1]["losses"], name  # both processes saw the same global loss
        run = curves[0]
        assert run["steps"] == list(range(first + 1, dw.STEPS + 1)), (name, run["steps"])
        assert run["resumed_from"] == (first or None), name
        rel = np.max(np.abs(np.array(run["losses"]) - ref_losses[first:]) / np.abs(ref_losses[first:]))
        print(f"{name}: steps {first + 1}..{dw.STEPS}, max relative |loss - single-process loss| = {rel:.1e}; "
              f"worker seconds {[round(w['runs'][name]['seconds'], 1) for w in workers]}")
        assert rel <= LOSS_RTOL, (name, run["losses"], ref_losses.tolist())
        state = assemble(runs["work"], name, workers, runs["ref_leaves"])
        worst = max(float(np.max(np.abs(got.astype(np.float64) - want), initial=0))
                    for got, want in zip(state, runs["ref_leaves"], strict=True))
        print(f"{name}: max |final state - single-process final state| = {worst:.1e} (parameters, Adam moments)")
        for i, (got, want) in enumerate(zip(state, runs["ref_leaves"], strict=True)):
            np.testing.assert_allclose(got, want, rtol=STATE_RTOL, atol=STATE_ATOL, err_msg=f"{name} leaf {i}")
    # each process fed the rows its devices hold: its half when data x fsdp spans both processes
    half = dw.GLOBAL_BATCH // 2
    for i, w in enumerate(workers):
        assert w["runs"]["hybrid"]["rows"] == w["runs"]["fsdp"]["rows"] == [i * half, (i + 1) * half]
        assert w["rows"] == {"data4": [i * half, (i + 1) * half], "data2_tensor2": [i * half, (i + 1) * half],
                             "tensor4": [0, dw.GLOBAL_BATCH]}  # no batch axis across processes: all rows
        assert "3 rows in process" in w["uneven_local_batch"] and "multiple of 2" in w["uneven_local_batch"]
    # the parameters really were sharded across processes (global 4-device layouts, local shards smaller)
    hybrid, fsdp = workers[0]["runs"]["hybrid"], workers[0]["runs"]["fsdp"]
    assert hybrid["up_kernel_devices"] == fsdp["up_kernel_devices"] == 4
    assert hybrid["up_kernel_spec"] == fsdp["up_kernel_spec"] == ["fsdp", None]
    assert hybrid["up_kernel_local_shape"] == [dw.MODEL["hidden_size"] // 2, dw.MODEL["intermediate_size"]]
    assert fsdp["up_kernel_local_shape"] == [dw.MODEL["hidden_size"] // 4, dw.MODEL["intermediate_size"]]


@pytest.mark.slow
def test_two_process_checkpoints_restore_in_one_process(runs):
    for name in ("hybrid", "fsdp"):
        with Checkpointer(runs["work"] / name / "checkpoints", async_save=False) as ckpt:
            assert ckpt.steps() == [dw.CHECKPOINT_EVERY, dw.STEPS], (name, ckpt.steps())
            restored = ckpt.restore(dw.STEPS, runs["abstract"])
        held = assemble(runs["work"], name, runs["workers"], runs["ref_leaves"])
        for i, (got, want) in enumerate(zip(jax.tree.leaves(restored), held, strict=True)):
            assert len(got.sharding.device_set) == 1
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{name} checkpoint leaf {i}")
