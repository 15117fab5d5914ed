"""Sparse multi-task training on the shapes world (thesis ch. 6, Tables 6.1-6.3 and Fig. 6.5 at small scale).

Four tasks on one small ViT: three image-level ones, ``count`` (4 classes), ``dominant_color`` (6) and
``position`` (9, the cell of the first object), and one patch-level dense one, ``patch_shape`` (each of the 16
patches: background or the shape covering it, 6 classes). The tower is shared; each task has its own linear
head (``heads/<task>``: task-specific, always fully trained).

``python run.py train --config configs/shapes_mtl.py:VARIANT[,options]``; variants:

- a gradient-manipulation method of :mod:`vlpeft_jax.mtl`: ``ls`` (Joint Train, the mean of the task losses,
  Eq. 6.2), ``pcgrad``, ``cagrad`` (c = 0.4), ``graddrop``, ``mgda``, ``imtlg``, ``nashmtl``, ``famo``, and the
  extras ``uw``, ``dwa``, ``rlw``, ``aligned``;
- ``stl_<task>``: single-task learning of one task (the Δm% reference).

Options: ``st`` sparse training with the PSN mask (top-``k`` ``|w|`` per neuron of the tower's kernels, biases
trained, norms and position embeddings frozen; chosen once before training); ``deltas`` (with ``st``) the same
entries trained through NeuroAda's sparse deltas instead of a dense masked gradient (the sparse path: no dense
gradient of a frozen weight; conflicts are then counted over the trained entries only, i.e. the masked stream);
``k=N`` (default: the k giving
about 30% trainable on the pretrained tower and about 60% on the random one, the thesis' budgets, Sec. 6.4.4);
``select=top|reverse|random|global`` (the selection ablation, Fig. 6.5c / Table 18); ``mode=pre|post`` (mask the
task gradients before the method, or its output after: spec A1); ``random`` a randomly initialised tower instead
of the pretrained one; ``lr=X``, ``steps=N``, ``smoke``.

The pretrained tower: the same ViT trained for 600 steps on three *other* labels of the world
(``shape_presence``, ``color_presence``, ``largest_shape``) with its own heads; only ``vision_tower`` is kept
(``pretrain.keep``), the task heads start fresh.

Choices (documented in the README's sparse-MTL section):
- Dense runs record the conflict counts under the PSN mask too (``mtl.sparse.monitor_k``), so every run reports
  p% of the full and of the masked gradients.
- One learning rate (Adam, 1e-3, constant after 20 warm-up steps, no weight decay) for dense and sparse runs; the
  thesis tuned it per setting (App. D.4), we do not.
- The clipping preset is FAMO's codebase (PCGrad, CAGrad, GradDrop, Nash-MTL clip the shared direction to 1.0:
  spec A6); no stage-level clipping.

Sweeps (``python run.py sweep --config configs/shapes_mtl.py --sweep NAME --seeds 0,1,2 --out DIR``):
``table`` (STL for every task, then each method without and with ST, pretrained tower), ``table_random`` (the
same on a random tower), ``selection`` (Joint Train + ST with each selection variant), ``budget`` (Joint Train
+ ST over k), ``st_lr`` (Joint Train dense and sparse at a 3x higher learning rate). The sweep summary adds
p% (all steps / last half, full / masked), per-task metrics and Δm%.

Example:
    >>> c = get_config("pcgrad,st")
    >>> c.mtl.method, c.mtl.sparse.k > 0, c.heads
    ('pcgrad', True, ['count', 'dominant_color', 'position', 'patch_shape'])
"""

import ml_collections

from configs import common
from vlpeft_jax.data import shapes
from vlpeft_jax.errors import ConfigError

HEADS = ["count", "dominant_color", "position", "patch_shape"]
PRETRAIN_HEADS = ["shape_presence", "color_presence", "largest_shape"]
METHODS = ("ls", "pcgrad", "cagrad", "graddrop", "mgda", "imtlg", "nashmtl", "famo", "uw", "dwa", "rlw", "aligned")
TABLE_METHODS = ("ls", "pcgrad", "cagrad", "graddrop", "mgda", "imtlg", "nashmtl", "famo")
STL = tuple(f"stl_{h}" for h in HEADS)
# k giving ~30% (pretrained) / ~60% (random) of all parameters trainable on this tower (thesis Sec. 6.4.4 budgets);
# tests/experiments/test_mtl_runs.py checks the fractions with vlpeft_jax.mtl.psn
K_PRETRAINED, K_RANDOM = 39, 79
K_SMOKE = 8  # the smoke tower is 32 wide
SWEEPS = {
    "table": [*STL, *TABLE_METHODS, *(f"{m},st" for m in TABLE_METHODS)],
    "table_random": [*(f"{s},random" for s in STL), *(f"{m},random" for m in TABLE_METHODS),
                     *(f"{m},st,random" for m in TABLE_METHODS)],
    "selection": ["ls,st", "ls,st,select=reverse", "ls,st,select=random", "ls,st,select=global", *STL],
    "budget": ["ls", "ls,st,k=4", "ls,st,k=12", "ls,st", "ls,st,k=48", *STL],
    # one learning rate 3x higher, dense and sparse (the thesis tuned the rate per setting, higher for ST)
    "st_lr": [*STL, "ls,lr=0.003", "ls,st,lr=0.003"],
}
VISION = dict(family="vit", image_size=64, patch_size=16, hidden_size=96, num_hidden_layers=4, num_attention_heads=4,
              intermediate_size=192, add_pooling_layer=False)
DATA = dict(kind="shapes", cache_dir=".cache/shapes", seed=0, image_size=64, num_train=2000, num_val=200,
            num_test=200, num_ood=200, num_captions=5)


def base_config(name: str, heads: list[str], smoke: bool) -> ml_collections.ConfigDict:
    """A classification run of ``heads`` on the shared ViT (no stages yet)."""
    c = ml_collections.ConfigDict()
    c.task = "classification"
    c.name = name
    c.seed = 0
    c.run_dir = ""
    c.data = dict(DATA)
    c.heads = list(heads)
    c.model = dict(family="vision_classifier", vision=dict(VISION), pool="cls")
    c.peft = {}
    c.train = dict(batch_size=32, checkpoint_every=0, progress=False)
    c.eval = dict(split="val", max_examples=0, batch_size=100, zero_shot=False)
    c.pretrain = dict(config="", cache_dir=".cache/pretrained")
    return c


def get_config(variant: str = "ls") -> ml_collections.ConfigDict:
    names = (*METHODS, *STL, "pretrain")
    options = {"st": False, "deltas": False, "random": False, "smoke": False, "k": 0, "select": "top", "mode": "pre",
               "lr": 1e-3, "steps": 300}
    name, opts = common.parse_variant(variant, "configs/shapes_mtl.py", names, options, default="ls")
    smoke = opts["smoke"]
    if name == "pretrain":  # the tower's pretraining on other labels (its own heads); only the tower is kept
        c = base_config("shapes_mtl_pretrain", PRETRAIN_HEADS, smoke)
        c.train.batch_size = 64
        c.stages = [dict(name="pretrain", steps=600, trainable=[[".*", "all"]],
                         optimizer=common.adamw(1e-3, warmup_steps=30, clip_norm=None), methods=[])]
        return finish(c, smoke)
    heads = [name[len("stl_"):]] if name in STL else HEADS
    tags = [name] + [t for t in ("st", "deltas", "random") if opts[t]]
    if opts["select"] != "top":
        tags.append(opts["select"])
    if opts["k"]:
        tags.append(f"k{opts['k']}")
    if opts["mode"] != "pre":
        tags.append(opts["mode"])
    c = base_config("shapes_mtl_" + "_".join(tags), heads, smoke)
    if opts["select"] not in ("top", "reverse", "random", "global") or opts["mode"] not in ("pre", "post"):
        raise ConfigError(f"configs/shapes_mtl.py:{variant}: select must be top|reverse|random|global and "
                                 f"mode pre|post")
    if not opts["random"]:
        c.pretrain = dict(config=common.path("shapes_mtl.py") + (":pretrain,smoke" if smoke else ":pretrain"),
                          cache_dir=".cache/pretrained", keep=["vision_tower"])
    k = opts["k"] or (K_SMOKE if smoke else K_RANDOM if opts["random"] else K_PRETRAINED)
    optimizer = dict(name="adam", learning_rate=opts["lr"], warmup_steps=20, schedule="constant", clip_norm=None)
    c.stages = [dict(name="train", steps=opts["steps"], trainable=[[".*", "all"]], optimizer=optimizer, methods=[])]
    group = "random" if opts["random"] else "pretrained"
    if opts["deltas"] and (not opts["st"] or opts["select"] != "top" or opts["mode"] != "pre" or name in STL):
        raise ConfigError(f"configs/shapes_mtl.py:{variant}: 'deltas' is the sparse path of PSN sparse training: use "
                          f"it with 'st' (top-k selection, pre mode) and a multi-task method")
    if opts["deltas"]:
        # PSN through NeuroAda's sparse deltas: the same entries (top-k |w| per neuron of every tower kernel), trained
        # as zero-initialised (values, indices) added in activation space, so no dense gradient of a frozen weight is
        # formed; biases (not the norms') and the heads train as in the GPS rules
        c.peft = dict(psn=dict(method="neuroada", targets=[r"vision_tower/.*"], k=k, selection="magnitude"))
        c.stages[0]["trainable"] = [["peft/psn/.*/values", "all"], [r"base/vision_tower/(?!.*layernorm).*/bias", "all"],
                                    ["base/heads/.*", "all"]]
        c.stages[0]["methods"] = ["psn"]
        c.mtl = dict(method=name, clip="famo_codebase", group=group)
    elif name not in STL:
        sparse = dict(k=k, variant=opts["select"], mask_mode=opts["mode"]) if opts["st"] else dict(monitor_k=k)
        c.mtl = dict(method=name, clip="famo_codebase", group=group, sparse=sparse)
    else:
        c.mtl = dict(method="", group=group)
    return finish(c, smoke)


def finish(c: ml_collections.ConfigDict, smoke: bool) -> ml_collections.ConfigDict:
    if smoke:
        common.shrink_for_smoke(c)
        c.model.vision.num_hidden_layers = 2
    world = {k: v for k, v in c.data.to_dict().items() if k not in ("kind", "cache_dir")}
    classes = {**shapes.ShapesWorldConfig(**world).label_classes(), **shapes.PATCH_LABEL_CLASSES}
    c.model.heads = {h: len(classes[h]) for h in c.heads}  # what the task fills in (for `run.py params`)
    patch = [h for h in c.heads if h in shapes.PATCH_LABEL_CLASSES]
    if patch:
        c.model.patch_heads = patch
    return c
