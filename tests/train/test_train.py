"""Tests of the train system: labels, optimizer groups, steps, stages, checkpoints/resume, divergence stop.

The model is a tiny MLP built from our layers with Hugging-Face-style paths (``base/model/embed``,
``base/model/layers_0``, ``base/model/layers_1``, ``base/model/norm``, ``base/head``) and dropout, so that
the PRNG stream matters; the data are a synthetic regression task generated deterministically from
``(seed, stage, step)``.

Run as a script (``python tests/test_train.py worker RUN_DIR SLEEP``) it trains the resume scenario; the
SIGKILL test starts it in a subprocess and kills it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlpeft_jax.errors import CheckpointError, ConfigError
from vlpeft_jax.models import layers
from vlpeft_jax.train import labels, optim, sharding, stages
from vlpeft_jax.train.checkpoint import Checkpointer
from vlpeft_jax.train.loop import TrainingDivergedError, train
from vlpeft_jax.train.state import TrainState
from vlpeft_jax.train.step import make_eval_step, make_train_step
from vlpeft_jax.tree import layer_stacks, leaf_paths, path_str

jax.config.update("jax_default_matmul_precision", "highest")
# Every train() call builds fresh closures, so jax retraces and XLA recompiles identical programs; a
# persistent compilation cache (shared with the worker subprocess through the environment) makes the
# repeated runs of the same configuration cheap. It does not change what is computed.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="vlpeft_jax_test_cache_"))
if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

IN, HIDDEN, OUT, VOCAB, BATCH = 6, 8, 3, 5, 8


class Backbone(nn.Module):
    @nn.compact
    def __call__(self, x, ids, deterministic):
        h = layers.Linear(HIDDEN, axes=(None, "embed"), name="layers_0")(x)
        h = h + layers.Embed(VOCAB, HIDDEN, name="embed")(ids)
        h = nn.Dropout(0.2)(jax.nn.gelu(h), deterministic=deterministic)
        h = h + layers.Linear(HIDDEN, axes=("embed", "mlp"), name="layers_1")(h)
        return layers.LayerNorm(name="norm")(h)


class TinyNet(nn.Module):
    @nn.compact
    def __call__(self, x, ids, deterministic=True):
        return layers.Linear(OUT, axes=("embed", None), name="head")(Backbone(name="model")(x, ids, deterministic))


MODEL = TinyNet()


@functools.cache
def init_params(seed: int = 0) -> dict:
    init = jax.jit(MODEL.init)  # one compile instead of many eager op dispatches
    base = init(jax.random.PRNGKey(seed), jnp.zeros((1, IN)), jnp.zeros((1,), jnp.int32))["params"]
    return {"base": layers.unbox(base), "peft": {}}


def loss_fn(params, batch, rng):
    pred = MODEL.apply({"params": params["base"]}, batch["x"], batch["ids"], deterministic=False,
                       rngs={"dropout": rng})
    err = jnp.mean((pred - batch["y"]) ** 2, axis=-1) * batch.get("scale", 1.0)
    return jnp.mean(err), {"mean_abs_pred": jnp.mean(jnp.abs(pred))}


def make_batch(seed: int, stage: int, step: int, batch_size: int = BATCH) -> dict:
    rng = np.random.default_rng([seed, stage, step])
    x = rng.normal(size=(batch_size, IN)).astype(np.float32)
    ids = rng.integers(0, VOCAB, size=(batch_size,)).astype(np.int32)
    w = np.linspace(-1, 1, IN * OUT, dtype=np.float32).reshape(IN, OUT)
    y = np.tanh(x @ w) + 0.1 * ids[:, None].astype(np.float32)
    return {"x": x, "ids": ids, "y": y.astype(np.float32)}


def data_factory(stage_steps, seed=0, sleep=0.0, nan_at=None, batch_size=BATCH):
    """``(stage_index, start_step) -> batches``; ``nan_at=(stage, step)`` makes that batch's loss NaN."""

    def factory(stage_index, start_step):
        for k in range(start_step, stage_steps[stage_index]):
            if sleep:
                time.sleep(sleep)
            batch = make_batch(seed, stage_index, k, batch_size)
            batch["scale"] = np.full((batch_size,), np.nan if nan_at == (stage_index, k) else 1.0, np.float32)
            yield batch

    return factory


def sgd(lr, **kw):
    return optim.GroupOptimizer("sgd", learning_rate=lr, schedule="constant", **kw)


def adamw(lr=1e-2, **kw):
    return optim.GroupOptimizer("adamw", learning_rate=lr, **kw)


def leaves_by_path(tree) -> dict[str, np.ndarray]:
    return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def quiet(**kw):
    return {"progress": False, "verbose": False, "tensorboard": False, **kw}


# --------------------------------------------------------------------------------------------------
# labels


def test_labels_presets_counts_and_errors():
    params = init_params()
    paths = leaf_paths(params)
    head = labels.make_labels(params, labels.head_rules(["base/head"]))
    assert {p for p, g in zip(paths, jax.tree.leaves(head), strict=True) if g != labels.FROZEN} == {
        "base/head/bias", "base/head/kernel"}

    last = labels.make_labels(params, labels.last_k_layers_rules(params, 1, label="last"))
    assert {p for p, g in zip(paths, jax.tree.leaves(last), strict=True) if g == "last"} == {
        "base/model/layers_1/bias", "base/model/layers_1/kernel"}
    assert layer_stacks(params) == {"base/model": {0: "layers_0", 1: "layers_1"}}

    probe = labels.make_labels(params, labels.linear_probe_rules("head"))
    assert jax.tree.leaves(probe).count("probe") == 2
    full = labels.make_labels(params, labels.full_finetuning_rules())
    assert set(jax.tree.leaves(full)) == {"full"}

    # first match wins: an explicit "frozen" rule carves the bias out of the head group
    rules = [("base/head/bias", labels.FROZEN), ("base/head/.*", "head")]
    carved = labels.make_labels(params, rules)
    assert carved["base"]["head"]["bias"] == labels.FROZEN and carved["base"]["head"]["kernel"] == "head"

    counts = labels.count_params(params, last)
    expected_last = HIDDEN * HIDDEN + HIDDEN
    total = sum(x.size for x in jax.tree.leaves(params))
    assert counts == {"frozen": total - expected_last, "last": expected_last, "total": total,
                      "trainable": expected_last}

    trainable, frozen = labels.split(params, last)
    assert trainable["base"]["head"]["kernel"] is None and frozen["base"]["model"]["layers_1"]["kernel"] is None
    merged = labels.merge(trainable, frozen)
    assert jax.tree.all(jax.tree.map(lambda a, b: a is b, merged, params))

    with pytest.raises(ConfigError, match=r"'base/lm_head/\.\*'.*matches no parameter.*base/model/layers_0"):
        labels.make_labels(params, [("base/lm_head/.*", "head")])
    with pytest.raises(ConfigError, match="must be an integer in \\[1, 2\\]"):
        labels.last_k_layers_rules(params, 3)
    with pytest.raises(ConfigError, match="invalid regular expression"):
        labels.make_labels(params, [("base/(", "x")])
    with pytest.raises(ConfigError, match="several layer stacks"):
        two = {"vision": {"layers_0": {"w": np.ones(1)}}, "text": {"h_0": {"w": np.ones(1)}}}
        labels.last_k_layers_rules(two, 1)
    assert labels.last_k_layers_rules(two, 1, stack="text") == [("text/h_0/.*", "last_layers")]


# --------------------------------------------------------------------------------------------------
# optimizer and step


def _recording_tx() -> optax.GradientTransformation:
    """An 'optimizer' whose state is the last gradient it saw (so the test can look at the gradients)."""
    return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p), lambda g, s, p=None: (g, g))


def test_gradients_and_optimizer_state_only_for_trainable_leaves(tmp_path):
    params = init_params()
    rules = labels.head_rules(["base/head"]) + labels.last_k_layers_rules(params, 1, label="last")
    lab = labels.make_labels(params, rules)

    # the gradient the train step computes has leaves exactly at the trainable parameters
    tx = _recording_tx()
    state = TrainState.create(params, lab, tx, jax.random.PRNGKey(0))
    state, _ = jax.jit(make_train_step(loss_fn, tx))(state, make_batch(0, 0, 0))
    grad_paths = set(leaves_by_path(state.opt_state))
    assert grad_paths == {"base/head/bias", "base/head/kernel", "base/model/layers_1/bias",
                          "base/model/layers_1/kernel"}

    # a real run: frozen leaves bit-identical, trainable ones changed, Adam state only for trainable ones
    stage = stages.Stage("s", steps=3, trainable=rules, optimizer=optim.OptimizerConfig(adamw(1e-2)))
    result = train(params, [stage], data_factory([3]), tmp_path, loss_fn=loss_fn, **quiet())
    before, after = leaves_by_path(params), leaves_by_path(result.params)
    for path in before:
        changed = not np.array_equal(before[path], after[path])
        trainable = path.startswith(("base/head/", "base/model/layers_1/"))
        assert changed == trainable, path
    n_trainable = labels.count_params(params, lab)["trainable"]
    moment_sizes = [x.size for x in jax.tree.leaves(result.state.opt_state) if x.ndim > 0]
    assert sum(moment_sizes) == 2 * n_trainable  # mu and nu, nothing for frozen leaves
    assert all(x is None for x in jax.tree.leaves(result.state.trainable["base"]["model"]["layers_0"],
                                                  is_leaf=lambda v: v is None))


def test_per_group_learning_rates(tmp_path):
    params = init_params()
    rules = labels.head_rules(["base/head"]) + labels.last_k_layers_rules(params, 1, label="last")
    config = optim.OptimizerConfig(sgd(0.1), groups={"last": sgd(0.01)}, clip_norm=None)
    stage = stages.Stage("s", steps=1, trainable=rules, optimizer=config)
    result = train(params, [stage], data_factory([1]), tmp_path, loss_fn=loss_fn, **quiet())
    assert result.history[0]["lr/head"] == pytest.approx(0.1) and result.history[0]["lr/last"] == pytest.approx(0.01)

    # the reference gradient: plain jax.grad of the full loss with the same batch and rng
    batch = next(data_factory([1])(0, 0))
    rng = jax.random.fold_in(jax.random.PRNGKey(0), 0)
    grads = leaves_by_path(jax.jit(jax.grad(lambda p: loss_fn(p, batch, rng)[0]))(params))
    before, after = leaves_by_path(params), leaves_by_path(result.params)
    for path, lr in [("base/head/kernel", 0.1), ("base/head/bias", 0.1), ("base/model/layers_1/kernel", 0.01)]:
        np.testing.assert_allclose(after[path] - before[path], -lr * grads[path], atol=1e-6, rtol=1e-5)


def test_weight_decay_mask():
    params = init_params()
    lab = labels.make_labels(params, labels.full_finetuning_rules())
    config = optim.OptimizerConfig(optim.GroupOptimizer("adamw", learning_rate=0.1, weight_decay=0.5,
                                                        schedule="constant"), clip_norm=None)
    opt = optim.build_optimizer(config, lab, total_steps=1)
    state = TrainState.create(params, lab, opt.tx, jax.random.PRNGKey(0))

    def zero_loss(p, batch, rng):  # zero gradient: Adam's step is 0, only decoupled decay moves weights
        return 0.0 * sum(jnp.sum(x) for x in jax.tree.leaves(p)), {}

    state, _ = jax.jit(make_train_step(zero_loss, opt.tx))(state, make_batch(0, 0, 0))
    before, after = leaves_by_path(params), leaves_by_path(state.params)
    for path in before:
        decayed = path.rsplit("/", 1)[-1] == "kernel"
        factor = 1 - 0.1 * 0.5 if decayed else 1.0
        np.testing.assert_allclose(after[path], factor * before[path], rtol=1e-6, err_msg=path)
    assert {p for p in before if p.rsplit("/", 1)[-1] in ("bias", "scale", "embedding")}  # the mask was exercised

    # SGD's weight decay (added to the gradient, as torch.optim.SGD) uses the same mask
    sgd_opt = optim.build_optimizer(optim.OptimizerConfig(sgd(0.1, weight_decay=0.5), clip_norm=None), lab, 1)
    trainable, _ = labels.split(params, lab)
    zeros = jax.tree.map(jnp.zeros_like, trainable)
    updates, _ = sgd_opt.tx.update(zeros, sgd_opt.tx.init(trainable), trainable)
    for path, update in leaves_by_path(updates).items():
        decayed = path.rsplit("/", 1)[-1] == "kernel"
        np.testing.assert_allclose(update, -0.1 * 0.5 * before[path] if decayed else 0.0, rtol=1e-6, err_msg=path)


def test_schedules_and_config_errors():
    g = optim.GroupOptimizer(learning_rate=2.0, warmup_steps=4, schedule="cosine", final_lr_ratio=0.1)
    s = optim.learning_rate_schedule(g, total_steps=14)
    for t in range(14):
        if t < 4:
            want = 2.0 * t / 4
        else:
            frac = (t - 4) / 10
            want = 2.0 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * frac)))
        assert float(s(t)) == pytest.approx(want, rel=1e-5), t
    lin = optim.learning_rate_schedule(optim.GroupOptimizer(learning_rate=1.0, schedule="linear"), total_steps=10)
    assert [round(float(lin(t)), 5) for t in (0, 5, 10)] == [1.0, 0.5, 0.0]

    lab = {"a": "head", "b": labels.FROZEN}
    with pytest.raises(ConfigError, match="'lora' is not a trainable group; groups: head"):
        optim.build_optimizer(optim.OptimizerConfig(groups={"lora": sgd(0.1)}), lab, 10)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        optim.build_optimizer(optim.OptimizerConfig(), {"a": labels.FROZEN}, 10)
    with pytest.raises(ConfigError, match="unknown optimizer 'lion'"):
        optim.OptimizerConfig.from_dict({"name": "lion"})
    with pytest.raises(ConfigError, match="unknown key.*'lr'.*valid keys"):
        optim.OptimizerConfig.from_dict({"lr": 0.1})
    with pytest.raises(ConfigError, match="unknown key.*'epochs'"):
        stages.Stage.from_dict({"name": "a", "steps": 1, "trainable": [], "epochs": 3})
    params = init_params()
    with pytest.raises(ConfigError, match="stage 'b'.*matches no parameter"):
        stages.plan_stages(params, [stages.Stage("a", 1, labels.head_rules(["base/head"])),
                                    stages.Stage("b", 1, [("base/typo/.*", "x")])])
    with pytest.raises(ConfigError, match="unique"):
        stages.plan_stages(params, [stages.Stage("a", 1, labels.head_rules(["base/head"]))] * 2)


def test_gradient_accumulation_equals_large_batch():
    params = init_params()
    lab = labels.make_labels(params, labels.full_finetuning_rules())
    opt = optim.build_optimizer(optim.OptimizerConfig(adamw(1e-2), clip_norm=None), lab, total_steps=3)

    def deterministic_loss(p, batch, rng):  # dropout masks would differ between micro-batches and the batch
        pred = MODEL.apply({"params": p["base"]}, batch["x"], batch["ids"])
        return jnp.mean((pred - batch["y"]) ** 2), {}

    finals = []
    for accumulation in (1, 4):
        state = TrainState.create(params, lab, opt.tx, jax.random.PRNGKey(0))
        step = jax.jit(make_train_step(deterministic_loss, opt.tx, accumulation_steps=accumulation))
        losses = []
        for k in range(3):
            state, metrics = step(state, make_batch(0, 0, k, batch_size=16))
            losses.append(float(metrics["loss"]))
        finals.append((losses, leaves_by_path(state.params)))
    np.testing.assert_allclose(finals[0][0], finals[1][0], atol=1e-6)
    print("accumulation 4 x 4 vs batch 16: max |param diff| =",
          max(np.abs(finals[1][1][p] - v).max() for p, v in finals[0][1].items()))
    for path, value in finals[0][1].items():
        np.testing.assert_allclose(finals[1][1][path], value, atol=1e-6, err_msg=path)
    moved = max(np.abs(finals[0][1][p] - v).max() for p, v in leaves_by_path(params).items())
    assert moved > 1e-3  # the comparison is not between untrained parameters


# --------------------------------------------------------------------------------------------------
# The two-stage scenario shared by the stage, determinism, logging and resume tests

SCENARIO_STEPS = (4, 6)
SCENARIO_METHODS = {"head": ("probe",), "last": ("finetune",)}


def scenario_stages() -> list[stages.Stage]:
    """Stage 1 trains the head (AdamW with warm-up); stage 2 the last layer only (its own AdamW with weight
    decay and 2-step gradient accumulation), with the head frozen again."""
    params = init_params()
    return [
        stages.Stage("head", steps=SCENARIO_STEPS[0], trainable=labels.head_rules(["base/head"]),
                     methods=SCENARIO_METHODS["head"], optimizer=optim.OptimizerConfig(adamw(2e-2, warmup_steps=1))),
        stages.Stage("last", steps=SCENARIO_STEPS[1], trainable=labels.last_k_layers_rules(params, 1),
                     methods=SCENARIO_METHODS["last"],
                     optimizer=optim.OptimizerConfig(adamw(1e-2, weight_decay=0.1), accumulation_steps=2)),
    ]


def run_scenario(run_dir: Path, *, seed: int = 3, sleep: float = 0.0, stage_list=None, **kw):
    stage_list = scenario_stages() if stage_list is None else stage_list
    calls = []

    def build_loss_fn(methods):
        calls.append(methods)
        return loss_fn

    snapshots = {}

    def eval_fn(params, step):  # also snapshots the parameters, for the stage carry-over test
        snapshots[step] = leaves_by_path(params)
        return {"loss": EVAL_STEP(TrainState(step=jnp.int32(step), trainable=params,
                                             frozen=jax.tree.map(lambda _: None, params), opt_state=(),
                                             rng=jax.random.PRNGKey(0)), EVAL_BATCH)["loss"]}

    kw = {"checkpoint_every": 2, "keep_checkpoints": 2, "eval_fn": eval_fn, "eval_every": 4, **quiet(), **kw}
    steps = [s.steps for s in stage_list]
    result = train(init_params(), stage_list, data_factory(steps, sleep=sleep), run_dir, build_loss_fn=build_loss_fn,
                   seed=seed, **kw)
    return result, calls, snapshots


EVAL_STEP = make_eval_step(loss_fn)
EVAL_BATCH = make_batch(9, 0, 0)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    """One uninterrupted run of the scenario (the reference of several tests)."""
    return run_scenario(tmp_path_factory.mktemp("scenario"), tensorboard=True)


def test_two_stages_carry_state_over(scenario, tmp_path):
    result, calls, snapshots = scenario
    assert calls == [SCENARIO_METHODS["head"], SCENARIO_METHODS["last"]]  # build_loss_fn gets each stage's methods
    assert [h["stage"] for h in result.history] == ["head"] * 4 + ["last"] * 6
    assert [h["step"] for h in result.history] == list(range(1, 11)) and int(result.state.step) == 10
    assert set(result.history[-1]) >= {"lr/last_layers", "loss", "grad_norm", "mean_abs_pred", "examples_per_s"}

    p0, p1, p2 = leaves_by_path(init_params()), snapshots[4], leaves_by_path(result.params)
    for path in p0:
        if path.startswith("base/head/"):  # trained in stage 1, frozen (carried unchanged) in stage 2
            assert not np.array_equal(p1[path], p0[path]) and np.array_equal(p2[path], p1[path]), path
        elif path.startswith("base/model/layers_1/"):  # frozen in stage 1, trained in stage 2
            assert np.array_equal(p1[path], p0[path]) and not np.array_equal(p2[path], p1[path]), path
        else:
            assert np.array_equal(p2[path], p0[path]), path
    # the state is split by the last stage's labels and its optimizer covers only that stage's leaves
    n_last = labels.count_params(init_params(), labels.make_labels(init_params(), scenario_stages()[1].trainable))
    assert sum(x.size for x in jax.tree.leaves(result.state.opt_state) if x.ndim > 0) == 2 * n_last["trainable"]

    # stage 1 alone ends exactly where the two-stage run was after stage 1
    first, _, _ = run_scenario(tmp_path, stage_list=scenario_stages()[:1])
    for path, value in leaves_by_path(first.params).items():
        np.testing.assert_array_equal(value, p1[path], err_msg=path)


def test_same_seed_gives_identical_loss_curve_and_logs(scenario, tmp_path):
    reference, _, _ = scenario
    again, _, _ = run_scenario(tmp_path / "again")
    other, _, _ = run_scenario(tmp_path / "other", seed=4)
    curve = [h["loss"] for h in reference.history]
    assert [h["loss"] for h in again.history] == curve  # bit-identical
    assert [h["loss"] for h in other.history] != curve  # the seed drives dropout: the test can tell runs apart
    assert curve[-1] < curve[0]
    assert [e["step"] for e in reference.evals] == [4, 8] and again.evals == reference.evals

    lines = [json.loads(x) for x in (reference.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["loss"] for x in lines if "loss" in x] == curve
    assert [x["step"] for x in lines if "eval/loss" in x] == [4, 8]
    assert any(f.name.startswith("events.out.tfevents") for f in (reference.run_dir / "tb").iterdir())


# --------------------------------------------------------------------------------------------------
# checkpoints: resume after SIGKILL, corrupt fallback, NaN stop


class _Interrupted(Exception):
    pass


def test_resume_at_a_stage_boundary(scenario, tmp_path):
    """A run that stops right after stage 1's final checkpoint resumes into stage 2 (re-split, new optimizer)."""
    factory = data_factory(list(SCENARIO_STEPS))

    def interrupted_factory(stage_index, start_step):
        if stage_index == 1:
            raise _Interrupted
        return factory(stage_index, start_step)

    with pytest.raises(_Interrupted):
        train(init_params(), scenario_stages(), interrupted_factory, tmp_path, build_loss_fn=lambda m: loss_fn, seed=3,
              checkpoint_every=3, **quiet())
    assert Checkpointer(tmp_path / "checkpoints").steps() == [3, 4]  # every 3 steps, and the end of stage 1
    resumed, calls, _ = run_scenario(tmp_path, checkpoint_every=3)
    assert resumed.resumed_from == 4 and calls == [SCENARIO_METHODS["last"]]
    for path, value in leaves_by_path(scenario[0].params).items():
        np.testing.assert_array_equal(leaves_by_path(resumed.params)[path], value, err_msg=path)


def _worker(run_dir: str, sleep: str) -> None:
    result, _, _ = run_scenario(Path(run_dir), sleep=float(sleep))
    np.savez(Path(run_dir) / "final.npz", **leaves_by_path(result.params))


def test_resume_after_sigkill_matches_uninterrupted_run(scenario, tmp_path):
    run_dir = tmp_path / "killed"
    log_path = tmp_path / "worker.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, __file__, "worker", str(run_dir), "0.4"], stdout=log,
                                stderr=subprocess.STDOUT)
    ckpt_dir = run_dir / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"worker ended before it could be killed:\n{log_path.read_text()[-3000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "final.npz").exists()

    resumed, _, _ = run_scenario(run_dir)
    reference, _, _ = scenario
    assert resumed.resumed_from is not None and 2 <= resumed.resumed_from < sum(SCENARIO_STEPS)
    assert resumed.history[0]["step"] == resumed.resumed_from + 1
    print(f"killed after checkpoint; resumed from global step {resumed.resumed_from} of {sum(SCENARIO_STEPS)}")
    got, want = leaves_by_path(resumed.params), leaves_by_path(reference.params)
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg=path)
    # the resumed loss curve continues the uninterrupted one exactly
    losses = {h["step"]: h["loss"] for h in reference.history}
    assert all(h["loss"] == losses[h["step"]] for h in resumed.history)
    steps_logged = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
                    if "loss" in json.loads(x)]
    assert steps_logged == list(range(1, sum(SCENARIO_STEPS) + 1))  # no duplicates from the killed run


FULL_STAGE = stages.Stage("full", steps=8, trainable=labels.full_finetuning_rules(),
                          optimizer=optim.OptimizerConfig(adamw(1e-2)))


def _abstract_for(params, stage_list):
    plans = stages.plan_stages(params, stage_list)
    mesh = sharding.make_mesh()
    param_sh = sharding.tree_shardings(params, mesh)
    return lambda meta: stages.abstract_stage_state(params, plans[meta["stage_index"]], mesh, param_sh)


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, caplog, capsys):
    params = init_params()
    kw = dict(loss_fn=loss_fn, checkpoint_every=2, keep_checkpoints=3, async_checkpoints=False, **quiet())
    first = train(params, [FULL_STAGE], data_factory([8]), tmp_path, **kw)
    ckpt_dir = tmp_path / "checkpoints"
    assert sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) == [4, 6, 8]
    for f in (ckpt_dir / "8" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")

    with caplog.at_level(logging.WARNING, logger="vlpeft_jax.train.checkpoint"):
        again = train(params, [FULL_STAGE], data_factory([8]), tmp_path, **kw)
    assert again.resumed_from == 6
    assert any("unreadable" in r.getMessage() and "falling back" in r.getMessage() for r in caplog.records)
    assert "WARNING: checkpoint" in capsys.readouterr().err
    assert (tmp_path / "checkpoints.corrupt" / "8").is_dir()
    # resumed from step 6, it retrains steps 7-8 to the same parameters as the original run
    for path, value in leaves_by_path(first.params).items():
        np.testing.assert_array_equal(leaves_by_path(again.params)[path], value, err_msg=path)

    # every checkpoint unreadable -> a clear CheckpointError
    for f in ckpt_dir.rglob("*"):
        if f.is_file() and f.parent != ckpt_dir:
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        Checkpointer(ckpt_dir).restore_latest(_abstract_for(params, [FULL_STAGE]))


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(tmp_path):
    params = init_params()
    with pytest.raises(TrainingDivergedError, match=r"global step 5 .*loss=nan.*last good checkpoint is step 4"):
        train(params, [FULL_STAGE], data_factory([8], nan_at=(0, 4)), tmp_path, loss_fn=loss_fn, checkpoint_every=2,
              keep_checkpoints=3, **quiet())
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt.steps() == [2, 4]
    state, meta = ckpt.restore_latest(_abstract_for(params, [FULL_STAGE]))
    assert meta["step_in_stage"] == 4 and int(state.step) == 4
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))
    ckpt.close()

    with pytest.raises(ConfigError, match="already has checkpoints"):
        train(params, [FULL_STAGE], data_factory([8]), tmp_path, loss_fn=loss_fn, resume=False, **quiet())
    other = stages.Stage("other", steps=8, trainable=labels.full_finetuning_rules())
    with pytest.raises(ConfigError, match="written for stages"):
        train(params, [other], data_factory([8]), tmp_path, loss_fn=loss_fn, **quiet())
    with pytest.raises(ConfigError, match="written with seed 0, this run has seed 1"):
        train(params, [FULL_STAGE], data_factory([8]), tmp_path, loss_fn=loss_fn, seed=1, **quiet())


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "worker":
    _worker(sys.argv[2], sys.argv[3])


def test_integer_leaves_are_always_frozen():
    params = {"peft": {"m": {"values": jnp.zeros((3, 2)), "indices": jnp.zeros((3, 2), jnp.int32)}}}
    lab = labels.make_labels(params, [("peft/.*", "m")])
    assert lab["peft"]["m"] == {"values": "m", "indices": labels.FROZEN}
    assert labels.count_params(params, lab)["trainable"] == 6


def test_closed_loop_callbacks_after_a_failed_restore_are_quiet(monkeypatch):
    # a failed orbax restore can leave tensorstore callbacks that fire on a closed event loop: Python reports each
    # as an unraisable traceback, dozens of them around the one warning; exactly those are dropped
    import sys
    import types

    from vlpeft_jax.train import checkpoint

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(str(u.exc_value)))
    checkpoint._quiet_closed_loop_callbacks()
    checkpoint._quiet_closed_loop_callbacks()  # idempotent: one filter, not a chain
    for error in (RuntimeError("Event loop is closed"), RuntimeError("something else"), ValueError("x")):
        sys.unraisablehook(types.SimpleNamespace(exc_type=type(error), exc_value=error))
    assert seen == ["something else", "x"]
