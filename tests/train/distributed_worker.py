"""One process of a 2-process ``jax.distributed`` training run on CPU (driven by ``test_distributed.py``).

Run as ``python tests/train/distributed_worker.py --process-id i --num-processes 2 --coordinator
localhost:PORT --work DIR --out DIR/worker_i.json``. Each process gets 2 simulated CPU devices, so the
global mesh has 4; cross-process collectives go through gloo. Each process trains a 1-layer LLaMA of width
32 (full fine-tuning, AdamW) with :func:`vlpeft_jax.train.loop.train` and feeds only the rows of every
global batch that its devices hold (``sharding.process_rows``); ``sharding.put_batch`` assembles the global batch
from the processes' parts. Two runs, in run directories shared by the processes:

* ``hybrid``: mesh data=2 x fsdp=2 (the data axis spans the processes), a fresh run in ``DIR/hybrid``;
* ``fsdp``: mesh fsdp=4 (parameters and Adam moments sharded across both processes) in ``DIR/fsdp``, which
  the test pre-filled with a checkpoint written by a single-process run: training continues from it.

Each process writes its addressable shards of each run's final train state to ``DIR/<run>_p<i>.npz``
(nothing gathered, nothing compiled) and the loss curves, shard indices and layouts to ``--out``. The model,
data and loss live here so that the test's single-process reference uses the same ones (:func:`setup`,
:func:`data_factory`). A failing process exits at once (a normal exit would wait in the shutdown barrier).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

if __name__ == "__main__":  # before jax is imported: 2 CPU devices per process, CPU only
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

import jax
import numpy as np

from vlpeft_jax.errors import InputError
from vlpeft_jax.models import layers, registry
from vlpeft_jax.train import labels, losses, optim, sharding, stages

MODEL = {"family": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 4, "num_key_value_heads": 2}
GLOBAL_BATCH, SEQ, STEPS, CHECKPOINT_EVERY, SEED = 8, 12, 4, 2, 0
RUNS = {"hybrid": {"data": 2, "fsdp": 2}, "fsdp": {"fsdp": 4}}


def setup() -> tuple[dict, dict, stages.Stage, object]:
    """(params, logical specs, stage, loss_fn), identical in every process.

    The parameters are drawn with NumPy from a fixed seed (no compiled init: compiling it would cost each
    process seconds); each process holds the same host copy and the loop places it on the global mesh.
    """
    module, inputs = registry.build_model(MODEL)
    boxed = jax.eval_shape(module.init, jax.random.PRNGKey(0), **inputs)
    specs = {"base": sharding.logical_specs(boxed["params"]), "peft": {}}
    shapes = layers.unbox(boxed["params"])
    rng = np.random.default_rng(SEED)
    flat, treedef = jax.tree.flatten(shapes)
    base = jax.tree.unflatten(treedef, [(1.0 if len(x.shape) == 1 else 0.0)  # norm scales around 1
                                        + 0.1 * rng.standard_normal(x.shape).astype(np.float32) for x in flat])
    stage = stages.Stage("full", steps=STEPS, trainable=labels.full_finetuning_rules(),
                         optimizer=optim.OptimizerConfig(optim.GroupOptimizer(learning_rate=1e-2, warmup_steps=1)))
    return {"base": base, "peft": {}}, specs, stage, losses.lm_loss(module, [])


def global_batch(k: int) -> dict[str, np.ndarray]:
    """Update ``k``'s global batch (a pure function of ``k``), with a few padded positions."""
    rng = np.random.default_rng([SEED, k])
    ids = rng.integers(0, MODEL["vocab_size"], size=(GLOBAL_BATCH, SEQ)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::3, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def data_factory(rows: slice = slice(None)):
    """``(stage_index, start_step) -> batches``: rows ``rows`` of every global batch (all of it by default)."""

    def factory(stage_index: int, start_step: int):
        for k in range(start_step, STEPS):
            yield {name: x[rows] for name, x in global_batch(k).items()}

    return factory


def _rows(rows: slice) -> list[int]:
    return [rows.start, rows.stop]


def _spec(x: jax.Array) -> list:
    spec = list(x.sharding.spec) + [None] * (x.ndim - len(x.sharding.spec))
    return [list(a) if isinstance(a, tuple) else a for a in spec]


def save_local_shards(state, path: Path) -> list[list]:
    """Writes every addressable shard of every leaf of ``state`` to ``path`` (``.npz``, key ``<leaf>_<shard>``);
    returns each shard's ``[leaf, shard, [[start, stop] per dimension]]``. Nothing is compiled or gathered:
    the test reassembles the global arrays from both processes' files."""
    arrays, index = {}, []
    for i, leaf in enumerate(jax.tree.leaves(state)):
        for j, shard in enumerate(leaf.addressable_shards):
            arrays[f"{i}_{j}"] = np.asarray(shard.data)
            bounds = [[sl.start or 0, leaf.shape[d] if sl.stop is None else sl.stop]
                      for d, sl in enumerate(shard.index)]
            index.append([i, j, bounds])
    np.savez(path, **arrays)
    return index


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    start = time.perf_counter()
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the default in current JAX; explicit
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id,
                               initialization_timeout=60)
    from vlpeft_jax.train.loop import train

    pid = jax.process_index()
    assert jax.process_count() == args.num_processes and jax.local_device_count() == 2, jax.devices()
    params, specs, stage, loss_fn = setup()
    out: dict = {"process_index": pid, "process_count": jax.process_count(), "devices": jax.device_count(),
                 "setup_seconds": time.perf_counter() - start, "runs": {}}
    out["rows"] = {name: _rows(sharding.process_rows(sharding.make_mesh(**axes), GLOBAL_BATCH))
                   for name, axes in {"data4": {"data": 4}, "data2_tensor2": {"data": 2, "tensor": 2},
                                      "tensor4": {"tensor": 4}}.items()}
    try:  # a local part that does not split over this process's 2 batch blocks: refused before any collective
        sharding.put_batch({"x": np.zeros((3, 2), np.float32)}, sharding.make_mesh(data=4))
    except InputError as e:
        out["uneven_local_batch"] = str(e)
    for name, axes in RUNS.items():
        t0 = time.perf_counter()
        mesh = sharding.make_mesh(**axes)
        rows = sharding.process_rows(mesh, GLOBAL_BATCH)
        result = train(params, [stage], data_factory(rows), args.work / name, loss_fn=loss_fn, seed=SEED,
                       mesh=mesh, param_specs=specs, checkpoint_every=CHECKPOINT_EVERY,
                       progress=False, verbose=False, tensorboard=False)  # asynchronous checkpoints (the default)
        kernel = result.state.trainable["base"]["model"]["layers_0"]["mlp"]["up_proj"]["kernel"]
        out["runs"][name] = {
            "losses": [h["loss"] for h in result.history], "steps": [h["step"] for h in result.history],
            "rows": _rows(rows), "resumed_from": result.resumed_from,
            "last_checkpoint": result.last_checkpoint,
            "up_kernel_spec": _spec(kernel), "up_kernel_local_shape": list(kernel.addressable_shards[0].data.shape),
            "up_kernel_devices": len(kernel.sharding.device_set),
            "shards": save_local_shards(result.state, args.work / f"{name}_p{pid}.npz"),
            "seconds": time.perf_counter() - t0}
    out["seconds"] = time.perf_counter() - start
    args.out.write_text(json.dumps(out))
    jax.distributed.shutdown()


if __name__ == "__main__":
    try:
        main()
    except BaseException:  # exit at once: a normal exit would wait (minutes) in jax.distributed's shutdown barrier
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
