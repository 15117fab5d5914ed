"""Sharded training on 8 simulated CPU devices gives the same loss curve as one device.

The device count of a process is fixed when jax initialises, so the test runs this file as a script in
a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (running the whole test suite
in one process leaves jax with one device). The worker trains the same model and data for 5 steps on
four meshes (1 device; data-parallel 8; FSDP 8; data 2 x fsdp 2 x tensor 2), with the parameters'
logical axis names mapped to the mesh, and prints the loss curves, final parameters' distance to the
single-device run and the shardings actually used. It also trains NeuroAda's sparse deltas and GPS's
masked kernels on the 2 x 2 x 2 mesh (thesis ch. 4-5): the deltas and their indices shard with their
kernel's output axis, the GPS masks like their kernel, and both match the single-device loss curve.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # before jax is imported
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlpeft_jax.models import layers
from vlpeft_jax.peft import base as peft_base
from vlpeft_jax.peft.gps import GPS
from vlpeft_jax.peft.neuroada import NeuroAda
from vlpeft_jax.train import labels, optim, sharding, stages
from vlpeft_jax.train.loop import train
from vlpeft_jax.tree import path_str

jax.config.update("jax_default_matmul_precision", "highest")

IN, HIDDEN, MLP, OUT, VOCAB, BATCH, STEPS = 16, 32, 64, 3, 16, 16, 5


class TinyNet(nn.Module):
    @nn.compact
    def __call__(self, x, ids, deterministic=True):
        h = layers.Linear(HIDDEN, axes=(None, "embed"), name="layers_0")(x)
        h = h + layers.Embed(VOCAB, HIDDEN, name="embed")(ids)
        h = nn.Dropout(0.1)(jax.nn.gelu(h), deterministic=deterministic)
        m = layers.Linear(MLP, axes=("embed", "mlp"), name="up")(h)
        h = h + layers.Linear(HIDDEN, axes=("mlp", "embed"), name="down")(jax.nn.gelu(m))
        h = layers.LayerNorm(name="norm")(h)
        return layers.Linear(OUT, axes=("embed", None), name="head")(h)  # 3 outputs: not divisible, replicated


MODEL = TinyNet()


def loss_fn(params, batch, rng):
    pred = MODEL.apply({"params": params["base"]}, batch["x"], batch["ids"], deterministic=False,
                       rngs={"dropout": rng})
    return jnp.mean((pred - batch["y"]) ** 2), {}


SPARSE = NeuroAda(targets=("up", "down"), k=2, mode="gather")


def sparse_loss_fn(params, batch, rng):
    pred = peft_base.apply_with(MODEL.apply, [(SPARSE, params["peft"]["neuroada"])], {"params": params["base"]},
                                batch["x"], batch["ids"], deterministic=False, rngs={"dropout": rng}, rng=rng,
                                train=True)
    return jnp.mean((pred - batch["y"]) ** 2), {}


def sparse_runs(base, boxed) -> dict:
    """NeuroAda (deltas) and GPS (masks) with the same top-2 |W| selection, single device vs 2 x 2 x 2."""
    base_specs = sharding.logical_specs(boxed["params"])
    peft = {"neuroada": SPARSE.init(jax.random.PRNGKey(1), base)}
    ada_specs = {"base": base_specs, "peft": {"neuroada": SPARSE.logical_specs(peft["neuroada"], base_specs)}}
    gps = GPS(targets=("up", "down"), k=2, selection="magnitude")
    masks = gps.masks(jax.random.PRNGKey(1), base)
    opt = optim.OptimizerConfig(optim.GroupOptimizer(learning_rate=1e-2, warmup_steps=1))
    ada_stage = stages.Stage("ada", steps=STEPS, trainable=SPARSE.trainable_rules(), optimizer=opt)
    gps_stage = stages.Stage("gps", steps=STEPS, trainable=gps.trainable_rules(masks), optimizer=opt)
    out = {}
    for name, mesh in {"single": sharding.make_mesh(), "data2_fsdp2_tensor2": sharding.make_mesh(2, 2, 2)}.items():
        common = dict(mesh=mesh, progress=False, verbose=False, tensorboard=False, async_checkpoints=False)
        ada = train({"base": base, "peft": peft}, [ada_stage], data_factory, tempfile.mkdtemp(),
                    loss_fn=sparse_loss_fn, param_specs=ada_specs, **common)
        g = train({"base": base, "peft": {}}, [gps_stage], data_factory, tempfile.mkdtemp(), loss_fn=loss_fn,
                  param_specs={"base": base_specs, "peft": {}},
                  optimizer_wrappers={"gps": lambda tx: gps.optimizer(tx, masks)}, **common)
        up = ada.state.trainable["peft"]["neuroada"]["up"]
        gps_mask = g.state.opt_state.mask["base"]["up"]["kernel"]
        out[name] = {"ada_losses": [h["loss"] for h in ada.history], "gps_losses": [h["loss"] for h in g.history],
                     "values_spec": _spec(up["values"]),
                     "indices_spec": _spec(ada.state.frozen["peft"]["neuroada"]["up"]["indices"]),
                     "up_kernel_spec": _spec(g.state.trainable["base"]["up"]["kernel"]),
                     "gps_mask_spec": _spec(gps_mask)}
    return out


def data_factory(stage_index, start_step):
    for k in range(start_step, STEPS):
        rng = np.random.default_rng([stage_index, k])
        x = rng.normal(size=(BATCH, IN)).astype(np.float32)
        ids = rng.integers(0, VOCAB, size=(BATCH,)).astype(np.int32)
        yield {"x": x, "ids": ids, "y": np.sin(x[:, :OUT]) + 0.1 * ids[:, None].astype(np.float32)}


def _spec(x: jax.Array) -> list:
    """A mesh PartitionSpec as JSON: one entry per dimension (None, an axis name or a list of names)."""
    spec = list(x.sharding.spec) + [None] * (x.ndim - len(x.sharding.spec))
    return [list(a) if isinstance(a, tuple) else a for a in spec]


def worker() -> dict:
    assert jax.device_count() == 8, jax.devices()
    boxed = jax.eval_shape(MODEL.init, jax.random.PRNGKey(0), jnp.zeros((1, IN)), jnp.zeros((1,), jnp.int32))
    specs = {"base": sharding.logical_specs(boxed["params"]), "peft": {}}
    base = jax.jit(MODEL.init)(jax.random.PRNGKey(0), jnp.zeros((1, IN)), jnp.zeros((1,), jnp.int32))["params"]
    params = {"base": layers.unbox(base), "peft": {}}
    stage = stages.Stage("full", steps=STEPS, trainable=labels.full_finetuning_rules(),
                         optimizer=optim.OptimizerConfig(optim.GroupOptimizer(learning_rate=1e-2, warmup_steps=1),
                                                         accumulation_steps=2))
    meshes = {"single": sharding.make_mesh(), "data8": sharding.make_mesh(data=8),
              "fsdp8": sharding.make_mesh(fsdp=8), "data2_fsdp2_tensor2": sharding.make_mesh(2, 2, 2)}
    out = {}
    for name, mesh in meshes.items():
        start = time.perf_counter()
        result = train(params, [stage], data_factory, tempfile.mkdtemp(), loss_fn=loss_fn, mesh=mesh,
                       param_specs=specs, progress=False, verbose=False, tensorboard=False, async_checkpoints=False)
        up_kernel = result.state.trainable["base"]["up"]["kernel"]
        mu = result.state.opt_state[1].inner_states["full"].inner_state[0].mu["base"]["up"]["kernel"]
        out[name] = {
            "losses": [h["loss"] for h in result.history],
            "params": {k: np.asarray(v).tolist() for k, v in
                       ((path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(result.params)[0])},
            "devices": len(up_kernel.sharding.device_set),
            "up_kernel_spec": _spec(up_kernel),
            "up_kernel_mu_spec": _spec(mu),
            "head_kernel_spec": _spec(result.state.trainable["base"]["head"]["kernel"]),
            "seconds": time.perf_counter() - start,
        }
    out["sparse"] = sparse_runs(layers.unbox(base), boxed)
    return out


def test_sharded_training_matches_single_device():
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "worker"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    single = runs["single"]
    assert len(single["losses"]) == STEPS and single["losses"][-1] < single["losses"][0]
    for name in ("data8", "fsdp8", "data2_fsdp2_tensor2"):
        diff = np.max(np.abs(np.array(runs[name]["losses"]) - np.array(single["losses"])))
        print(f"{name}: max |loss - single-device loss| over {STEPS} steps = {diff:.2e}")
        assert diff <= 1e-5, (name, runs[name]["losses"], single["losses"])
        for path, value in single["params"].items():
            np.testing.assert_allclose(runs[name]["params"][path], value, atol=1e-5, err_msg=f"{name} {path}")
    # the layouts really differ: replicated, FSDP-sharded, FSDP x tensor-sharded (optimizer state alike)
    assert single["devices"] == 1 and runs["data8"]["devices"] == 8
    assert runs["data8"]["up_kernel_spec"] == [None, None]
    assert runs["fsdp8"]["up_kernel_spec"] == runs["fsdp8"]["up_kernel_mu_spec"] == ["fsdp", None]
    assert runs["data2_fsdp2_tensor2"]["up_kernel_spec"] == ["fsdp", "tensor"]
    assert runs["data2_fsdp2_tensor2"]["up_kernel_mu_spec"] == ["fsdp", "tensor"]
    assert runs["fsdp8"]["head_kernel_spec"] == ["fsdp", None]  # its 3 outputs are not divisible: replicated
    print({name: round(r["seconds"], 1) for name, r in runs.items() if "seconds" in r})
    sparse = runs["sparse"]
    one, mesh = sparse["single"], sparse["data2_fsdp2_tensor2"]
    assert one["ada_losses"][-1] < one["ada_losses"][0]
    for key in ("ada_losses", "gps_losses"):
        diff = np.max(np.abs(np.array(mesh[key]) - np.array(one[key])))
        print(f"sparse {key}: max |2x2x2 mesh - single device| = {diff:.2e}")
        assert diff <= 1e-5, (key, mesh[key], one[key])
    # same selection, same update rule: deltas and masked kernels train identically (no weight decay here)
    np.testing.assert_allclose(one["ada_losses"], one["gps_losses"], rtol=1e-5)
    # up's kernel is [embed, mlp] -> (fsdp, tensor): its neurons (outputs) are on "tensor"
    assert mesh["up_kernel_spec"] == mesh["gps_mask_spec"] == ["fsdp", "tensor"]
    assert mesh["values_spec"] == mesh["indices_spec"] == ["tensor", None]


if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    print(json.dumps(worker()))
