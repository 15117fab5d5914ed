"""Referring-expression comprehension with commonsense facts: CK-Transformer's task on the shapes world
(thesis ``004_21d0d480fe4006f4.txt`` ch. 3 and App. A; spec ``specs/ckt.md``).

Every example is an image whose objects are the candidates (ground-truth boxes, spec B11), an expression that
needs at least one fact of the knowledge base to pick its target (KB-Ref's rule; :mod:`vlpeft_jax.data.refexp`
generates and checks them), and the target's index. The task is classification over the candidates (§3.3):
the model scores every candidate and the loss is the cross-entropy over the scores (§4.3); the metric is
accuracy (the share of expressions whose best-scoring candidate is the target), with the fact search's recall
(``fact recall@K``: the ground-truth fact among the target's top K; ``fact recall@1``: ranked first).

Inputs of the model (:class:`vlpeft_jax.models.ckt.CKTransformer`), built here on the host:

- ``regions [B, n, f]``: region features. ``data.regions="pixels"``: the RoI of each box in the image,
  average-pooled to a ``g x g`` grid of RGB values (``data.roi_grid``, default 4: 48 numbers), centred — a stand-in
  for the Faster R-CNN RoI features of the thesis (App. A.5) that keeps colour and coarse shape.
  ``data.regions="tower"``: each box's overlap-weighted mean of the last-layer patch features of a frozen ViT
  trained first on the training images to classify each patch's object category (the VG object/attribute
  supervision of the thesis' detector; :mod:`vlpeft_jax.tasks.refexp_regions`, settings in ``data.tower``,
  e.g. ``concat_pixels=True`` appends the pixel feature); ``geometry
  [B, n, 7]`` the 7-d box geometry of App. Eq. (1) (spec B15); ``region_mask [B, n]``.
- ``expr_ids [B, T]``, ``expr_mask``: ``<bos> expression <eos>`` (``<bos>`` is the [CLS] whose output the
  retriever reads).
- ``fact_ids [B, P, Tf]``, ``fact_mask``, ``fact_index [B, n, K]``: the unique facts of an image (one encoder pass
  each) and, per candidate, which of them are its top-K (-1: none; a category with fewer than K facts, spec B5).

Fact search (``peft``-independent, ``data.facts``):

- ``image``: CK-T's image-based search (§3.3.1): a separate encoder trained first on the training split to give the
  cosine of the [CLS] outputs of (image, expression) and (image, fact) (target 1 for the ground-truth fact, 0 for a
  random fact replacing it half of the time, spec B1-B4), then frozen; each candidate's category facts ranked by
  it (:mod:`vlpeft_jax.tasks.refexp_retrieval`; ``data.retriever`` holds its settings, default 1500 steps);
- ``text``: CK-T-Uw/oImage, the same with every candidate's region feature replaced by the image's mean (B17);
- ``bow``: the facts of the candidate's category ranked by the cosine between bag-of-words vectors of the fact
  and the expression — the Word2Vec-style search of Table 3.1 ("CK-T-Word2Vec": averaged word vectors; counts
  of the world's words are the synthetic stand-in);
- ``none``: CK-T-nf (footnote 2): every fact is one mask token (the tokenizer's ``<unk>``, an id no fact word
  maps to), so the model cannot read facts;
- ``oracle``: the ground-truth fact first, then ``bow`` (an upper bound, not in the thesis).

The retriever is trained when the task first encodes a split, deterministically from its seed (a task built
again, e.g. by ``run.py eval``, trains it again and gets the same rankings). ``fact recall@K`` is the share of
examples whose ground-truth fact is among the target's top-K.

Example (bag-of-words cosine):
    >>> round(bow_cosine("the thing you can eat", "a red circle is something you can eat"), 3)
    0.474
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlpeft_jax.data import refexp as rx
from vlpeft_jax.data.tokenizer import WordTokenizer, split_words
from vlpeft_jax.errors import ConfigError
from vlpeft_jax.peft import base as peft_base
from vlpeft_jax.tasks import base

FACT_MODES = ("image", "text", "bow", "none", "oracle")
REGION_MODES = ("pixels", "tower")
REPORT_METRICS = ("accuracy", "fact recall@K", "fact recall@1")
DETECTION_METRICS = ("target detected", "category correct")
MODEL_FAMILY = "ckt"
_PROCESS_CACHE: dict[Any, Any] = {}  # trained once per process: the retriever's rankings, the BERT encoder
DATA_KEYS = ("kind", "refexp", "facts", "top_k", "regions", "roi_grid", "max_candidates", "retriever", "tower")


def bow_cosine(a: str, b: str) -> float:
    """Cosine between the word-count vectors of two texts (0 when either has no word)."""
    ca, cb = collections.Counter(split_words(a.lower())), collections.Counter(split_words(b.lower()))
    dot = sum(ca[w] * cb[w] for w in ca)
    na, nb = math.sqrt(sum(v * v for v in ca.values())), math.sqrt(sum(v * v for v in cb.values()))
    return dot / (na * nb) if na and nb else 0.0


def roi_features(image: np.ndarray, boxes: np.ndarray, grid: int) -> np.ndarray:
    """``float32 [n, grid*grid*3]``: each box's pixels average-pooled to ``grid x grid`` RGB cells, in [-0.5, 0.5].

    Example (a 4x4 image, left half red; a box over the left half pooled to one cell is pure red):
        >>> im = np.zeros((4, 4, 3), np.uint8); im[:, :2, 0] = 255
        >>> roi_features(im, np.array([[0, 0, 2, 4]], np.float32), 1).round(2).tolist()
        [[0.5, -0.5, -0.5]]
    """
    h, w = image.shape[:2]
    img = image.astype(np.float32) / 255.0 - 0.5
    out = np.zeros((len(boxes), grid * grid * 3), np.float32)
    for i, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, np.float32)):
        xs = np.linspace(max(0.0, x1), min(float(w), x2), grid + 1)
        ys = np.linspace(max(0.0, y1), min(float(h), y2), grid + 1)
        cells = []
        for r in range(grid):
            for c in range(grid):
                r0, r1 = int(ys[r]), max(int(ys[r]) + 1, int(math.ceil(ys[r + 1])))
                c0, c1 = int(xs[c]), max(int(xs[c]) + 1, int(math.ceil(xs[c + 1])))
                cells.append(img[r0:min(r1, h), c0:min(c1, w)].reshape(-1, 3).mean(0))
        out[i] = np.concatenate(cells)
    return out


class RefExpBatches:
    """Shuffled training batches of encoded examples (a :class:`~vlpeft_jax.tasks.base.Batches`)."""

    def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, seed: int) -> None:
        self.arrays, self.batch_size, self.seed = arrays, batch_size, seed
        self.size = len(next(iter(arrays.values())))
        if self.size < batch_size:
            raise ConfigError(f"train.batch_size={batch_size} exceeds the {self.size} training expressions")

    def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        per_epoch = self.size // self.batch_size
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            epoch, k = divmod(step, per_epoch)
            order = np.random.default_rng((self.seed, epoch)).permutation(self.size)
            idx = order[k * self.batch_size:(k + 1) * self.batch_size]
            yield {name: a[idx] for name, a in self.arrays.items()}
            step += 1


class RefExpTask:
    """CK-Transformer's referring-expression task (see the module docstring)."""

    name = "refexp"
    groups: tuple[str, ...] = ("all",)
    group_label = "expressions"
    group_note = "all = every expression of the evaluation split."
    report_metrics = REPORT_METRICS
    primary_metric = "accuracy"

    def __init__(self, cfg: ml_collections.ConfigDict, world: Any = None, tokenizer: Any = None,
                 data: Any = None) -> None:
        del world
        self.cfg = cfg
        d = cfg.data
        unknown = sorted(set(d) - set(DATA_KEYS))
        if unknown:
            raise ConfigError(f"data: unknown key(s) {', '.join(unknown)} for the refexp task; valid: "
                              f"{', '.join(DATA_KEYS)}")
        self.facts = d.get("facts", "bow")
        if self.facts not in FACT_MODES:
            raise ConfigError(f"data.facts={self.facts!r}; valid: {', '.join(FACT_MODES)}")
        self.regions = d.get("regions", "pixels")
        if self.regions not in REGION_MODES:
            raise ConfigError(f"data.regions={self.regions!r}; valid: {', '.join(REGION_MODES)}")
        self.top_k = int(d.get("top_k", 3))
        if self.top_k < 1:
            raise ConfigError(f"data.top_k={self.top_k}: must be >= 1 (facts per candidate)")
        self.grid = int(d.get("roi_grid", 4))
        tower = dict(d.get("tower") or {})
        if self.regions == "tower":
            from vlpeft_jax.tasks.refexp_regions import TowerSettings

            self.tower_settings = TowerSettings(**{"roi_grid": self.grid, **tower})
        elif tower:
            raise ConfigError(f"data.tower is set but data.regions={self.regions!r}; the tower needs regions='tower'")
        self.data = data if data is not None else rx.build_refexp(rx.RefExpConfig(**dict(d.get("refexp") or {})))
        most = max(len(f) for f in (self.data.fact_base.of_category(c) for c in self.data.fact_base.categories))
        if self.facts != "none" and self.top_k > most:
            raise ConfigError(f"data.top_k={self.top_k} exceeds the facts any category has (at most {most})")
        self.max_candidates = int(d.get("max_candidates", 0)) or max(
            len(ex.boxes) for split in self.data.splits.values() for ex in split)
        model = cfg.get("model") or {}
        self.init_from = str(model.get("init_from") or "")
        self.encoder_pretrain = dict(model.get("pretrain") or {})
        if self.encoder_pretrain and not self.init_from:
            raise ConfigError("model.pretrain (MLM + ITM) is set but model.init_from is not: name a BERT checkpoint "
                              "folder or 'minilm'")
        if self.init_from:  # the encoder comes from a BERT checkpoint: its tokenizer, and the base from load_model
            from vlpeft_jax.tasks.refexp_pretrain import BertTokenizerAdapter, resolve_checkpoint

            self.checkpoint = resolve_checkpoint(self.init_from)
            if tokenizer is None:
                tokenizer = BertTokenizerAdapter.from_checkpoint(self.checkpoint)
            self.load_model = self._load_bert_model  # the runner's "the task gives its base" path
        self._pretrain_log: dict[str, Any] = {}
        self.tokenizer = tokenizer if tokenizer is not None else WordTokenizer.train(self.data.texts())
        split = cfg.eval.get("split", "val")
        if split not in self.data.splits:
            raise ConfigError(f"eval.split={split!r}; valid: {', '.join(self.data.splits)}")
        self.detection = rx.DetectionNoise.from_config(dict(cfg.eval.detect)) if cfg.eval.get("detect") else None
        if self.detection is not None and split == "train":
            raise ConfigError("eval.detect replaces the candidates of an evaluation split; eval.split='train' is the "
                              "training split (ground-truth boxes); use val or test")
        self.report_metrics = self.metrics_for(cfg)
        self._encoded: dict[str, dict[str, np.ndarray]] = {}
        self._detected: dict[str, list[Any]] = {}
        self._detection_counts: dict[str, dict[str, float]] = {}
        self._recall: dict[str, float] = {}
        self._recall1: dict[str, float] = {}  # the ground-truth fact ranked first: the search alone, whatever K
        self._ranked: dict[str, list[list[str]]] = {}  # expr_id -> per candidate, its facts best first
        self._retriever_log: dict[str, Any] = {}
        self._tower_log: dict[str, Any] = {}
        given = dict(d.get("retriever") or {})
        if self.facts in ("image", "text"):
            from vlpeft_jax.tasks.refexp_retrieval import RetrieverSettings

            self.retriever_settings = RetrieverSettings(**{"steps": 1500, **given, "mode": self.facts})
        elif given:
            raise ConfigError(f"data.retriever is set but data.facts={self.facts!r} trains no retriever (image, text)")

    @classmethod
    def groups_for(cls, cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
        return cls.groups

    @classmethod
    def metrics_for(cls, cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
        """The report metrics; with ``eval.detect`` also the detector's two counts (Table 3.2's explanation)."""
        return REPORT_METRICS + (DETECTION_METRICS if cfg.eval.get("detect") else ())

    # ------------------------------------------------------------------------------------ data

    def shared_data(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer, "data": self.data}

    def save_assets(self, run_dir: Path) -> None:
        if not self.init_from:  # (a checkpoint's tokenizer is read from the checkpoint named in the config)
            self.tokenizer.save(Path(run_dir) / "tokenizer")

    def model_config(self) -> dict[str, Any]:
        m = self.cfg.model.to_dict()
        if m.get("family") != MODEL_FAMILY:
            raise ConfigError(f"task 'refexp' needs model.family={MODEL_FAMILY!r}; got {m.get('family')!r}")
        m.pop("init_from", None)
        m.pop("pretrain", None)
        if self.init_from:
            return {"family": MODEL_FAMILY, **self._bert_encoder()[0]}
        m.update(vocab_size=self.tokenizer.vocab_size, region_feature_size=self.region_feature_size)
        return m

    def _bert_encoder(self) -> tuple[dict[str, Any], Any]:
        """``(CKTConfig kwargs, encoder params)`` from ``model.init_from`` (:func:`~vlpeft_jax.tasks.refexp_pretrain.
        encoder_from_bert`); the other ``model`` keys set the rest of the CKTConfig (and may not contradict the
        checkpoint's sizes). Read once per process."""
        from vlpeft_jax.tasks.refexp_pretrain import encoder_from_bert

        rest = {k: v for k, v in self.cfg.model.to_dict().items() if k not in ("family", "init_from", "pretrain")}
        key = ("bert", str(self.checkpoint), self.region_feature_size, self.cfg.seed, tuple(sorted(rest.items())))
        if key not in _PROCESS_CACHE:
            _PROCESS_CACHE[key] = encoder_from_bert(self.checkpoint, self.region_feature_size, seed=self.cfg.seed,
                                                    **rest)
        return _PROCESS_CACHE[key]

    def _load_bert_model(self) -> tuple[Any, Any]:
        """The CK-Transformer whose encoder is ``model.init_from``'s BERT, briefly pretrained with MLM + ITM on
        captions of the training images when ``model.pretrain`` is set (:mod:`vlpeft_jax.tasks.refexp_pretrain`);
        the image embedding, the fact-aware blocks and the score are initialised from ``seed``. The pretrained
        encoder is computed once per process (the runner builds the task again to evaluate)."""
        from vlpeft_jax.models import layers, registry
        from vlpeft_jax.models.ckt import CKTConfig
        from vlpeft_jax.tasks.refexp_pretrain import PretrainSettings, encoder_into_ckt, pretrain_encoder

        sizes, encoder = self._bert_encoder()
        if self.encoder_pretrain:
            settings = PretrainSettings(**{"seed": self.cfg.seed, **self.encoder_pretrain})
            key = ("pretrained", str(self.checkpoint), settings, sizes["region_feature_size"], self.regions,
                   repr(self.data.config), self.cfg.seed, repr(self.cfg.data.get("tower")))
            if key not in _PROCESS_CACHE:
                train = self.data.splits["train"]
                table = {ex.expr_id: f for ex, f in zip(train, self.region_features("train", train), strict=True)}
                print(f"encoder: MLM + ITM pretraining of {self.init_from} ({settings.steps} steps)")
                _PROCESS_CACHE[key] = pretrain_encoder(CKTConfig(**sizes), encoder, train, lambda ex: table[ex.expr_id],
                                                  self.tokenizer, settings)
            encoder, log = _PROCESS_CACHE[key]
            self._pretrain_log = {"steps": settings.steps, "seconds": log["seconds"],
                                  **{f"{when}_{k}": float(v) for when in ("eval_before", "eval_after")
                                     for k, v in log[when].items()}}
        module, inputs = registry.build_model(self.model_config())
        params = layers.unbox(jax.jit(module.init)(jax.random.key(self.cfg.seed), **inputs))["params"]
        return module, encoder_into_ckt(params, encoder)

    @property
    def region_feature_size(self) -> int:
        """Numbers per region feature: ``roi_grid² x 3`` pooled pixels, or the tower's (see ``data.regions``)."""
        if self.regions == "tower":
            s = self.tower_settings
            return s.hidden_size + (s.roi_grid * s.roi_grid * 3 if s.concat_pixels else 0)
        return self.grid * self.grid * 3

    def region_features(self, split: str, examples: Sequence[Any]) -> list[np.ndarray]:
        """Per example of ``split`` (``examples``: :meth:`examples`), ``float32 [n_i, region_feature_size]``."""
        if self.regions == "pixels":
            return [roi_features(ex.pixels(), ex.boxes, self.grid) for ex in examples]
        from vlpeft_jax.tasks.refexp_regions import tower_region_features, trained_tower

        if examples is self.data.splits[split]:
            feats, log = tower_region_features(self.data, self.tower_settings)
            self._tower_log = log
            return feats[split]
        return trained_tower(self.data, self.tower_settings).features(examples)  # a detector's boxes

    def learned_rankings(self) -> None:
        """Trains the retriever (``image``/``text`` modes) on the training split and ranks every split's facts."""
        if self._ranked or self.facts not in ("image", "text"):
            return
        from vlpeft_jax.tasks.refexp_retrieval import Retriever

        # the runner builds a task more than once in a process (training, then evaluation): train once per data
        key = (self.retriever_settings, repr(self.data.config), self.grid, tuple(sorted(self.tokenizer.get_vocab())))
        if key not in _PROCESS_CACHE:
            retriever = Retriever(self.retriever_settings, self.data.fact_base, self.tokenizer, self.grid)
            print(f"fact search: training the {self.facts} retriever ({self.retriever_settings.steps} steps)")
            log = retriever.fit(self.data.splits["train"])
            ranked = {ex.expr_id: r for examples in self.data.splits.values()
                      for ex, r in zip(examples, retriever.rank_many(examples), strict=True)}
            _PROCESS_CACHE[key] = (ranked, log, retriever)
        self._ranked, self._retriever_log, self._retriever = _PROCESS_CACHE[key]

    def examples(self, split: str) -> list[Any]:
        """The examples :meth:`encode` encodes: the split's, or with ``eval.detect`` (evaluation splits only) the
        same expressions over the simulated detector's candidates (:func:`vlpeft_jax.data.refexp.detect`)."""
        if self.detection is None or split == "train":
            return self.data.splits[split]
        if split not in self._detected:
            cats = self.data.fact_base.categories
            self._detected[split] = [rx.detect(ex, self.detection, cats) for ex in self.data.splits[split]]
        return self._detected[split]

    def top_facts(self, ex: Any, ranked: list[list[str]] | None = None) -> list[list[str]]:
        """Per candidate, the ids of its top-K facts (fewer when its category has fewer; see the docstring);
        ``ranked``: the learned search's ranking of this example's candidates (default: looked up by its id)."""
        if self.facts in ("image", "text"):
            if ranked is None:
                self.learned_rankings()
                ranked = self._ranked[ex.expr_id]
            return [r[:self.top_k] for r in ranked]
        kb = self.data.fact_base
        out = []
        for cat in ex.categories:
            facts = sorted(kb.of_category(cat), key=lambda f: (-bow_cosine(ex.expression, f.text), f.fact_id))
            if self.facts == "oracle" and ex.fact_id is not None:
                facts = sorted(facts, key=lambda f: f.fact_id != ex.fact_id)
            out.append([f.fact_id for f in facts[:self.top_k]])
        return out

    def encode(self, split: str) -> dict[str, np.ndarray]:
        """The model's inputs and the targets of every example of ``split`` (cached)."""
        if split in self._encoded:
            return self._encoded[split]
        examples = self.examples(split)
        rankings: list[Any] = [None] * len(examples)
        if self.facts in ("image", "text") and examples is not self.data.splits[split]:
            self.learned_rankings()  # the detected candidates' categories are ranked by the same frozen retriever
            rankings = self._retriever.rank_many(examples)
        n, k = max(self.max_candidates, self.detection.max_boxes if self.detection else 0), self.top_k
        kb = self.data.fact_base
        texts = {f.fact_id: f.text for f in kb.facts}
        expr = [self.tokenizer.encode(ex.expression) for ex in examples]
        fact_lists, unique = [], []
        hits = firsts = 0
        for ex, ranked in zip(examples, rankings, strict=True):
            top = [["<mask>"]] * len(ex.categories) if self.facts == "none" else self.top_facts(ex, ranked)
            order = list(dict.fromkeys(f for per in top for f in per))
            unique.append(order)
            fact_lists.append(top)
            hits += ex.fact_id is not None and ex.target >= 0 and ex.fact_id in top[ex.target]
            firsts += ex.fact_id is not None and ex.target >= 0 and top[ex.target][:1] == [ex.fact_id]
        mask_ids = [self.tokenizer.token_to_id("<bos>"), self.tokenizer.token_to_id("<unk>"),
                    self.tokenizer.token_to_id("<eos>")]
        fact_tokens = {fid: self.tokenizer.encode(texts[fid]) for fid in {f for u in unique for f in u} - {"<mask>"}}
        fact_tokens["<mask>"] = mask_ids
        t = max(len(e) for e in expr)
        tf = max(len(v) for v in fact_tokens.values())
        p = max(len(u) for u in unique)
        b = len(examples)
        regions = self.region_features(split, examples)
        arrays = {"regions": np.zeros((b, n, self.region_feature_size), np.float32),
                  "geometry": np.zeros((b, n, 7), np.float32), "region_mask": np.zeros((b, n), bool),
                  "expr_ids": np.zeros((b, t), np.int32), "expr_mask": np.zeros((b, t), bool),
                  "fact_ids": np.zeros((b, p, tf), np.int32), "fact_mask": np.zeros((b, p, tf), bool),
                  "fact_index": np.full((b, n, k), -1, np.int32), "target": np.zeros((b,), np.int32)}
        for i, ex in enumerate(examples):
            m = len(ex.boxes)
            if m > n:
                raise ConfigError(f"{ex.expr_id}: {m} candidates exceed data.max_candidates={n}")
            image = ex.pixels()
            arrays["regions"][i, :m] = regions[i]
            arrays["geometry"][i, :m] = rx.geometry(ex.boxes, image.shape[1], image.shape[0])
            arrays["region_mask"][i, :m] = True
            arrays["expr_ids"][i, :len(expr[i])] = expr[i]
            arrays["expr_mask"][i, :len(expr[i])] = True
            slot = {f: j for j, f in enumerate(unique[i])}
            for j, f in enumerate(unique[i]):
                ids = fact_tokens[f]
                arrays["fact_ids"][i, j, :len(ids)] = ids
                arrays["fact_mask"][i, j, :len(ids)] = True
            for c, per in enumerate(fact_lists[i]):
                arrays["fact_index"][i, c, :len(per)] = [slot[f] for f in per]
            arrays["target"][i] = ex.target
        if examples is not self.data.splits[split]:  # detected: scored by IoU with the ground-truth box (B9)
            arrays["boxes"] = np.zeros((b, n, 4), np.float32)
            arrays["gt_box"] = np.asarray([ex.meta["gt_box"] for ex in examples], np.float32)
            for i, ex in enumerate(examples):
                arrays["boxes"][i, :len(ex.boxes)] = ex.boxes
            found = [ex.meta["target_detected"] for ex in examples]
            self._detection_counts[split] = {
                "target detected": float(np.mean(found)),
                "category correct": (sum(ex.meta["category_correct"] for ex in examples) / sum(found)
                                     if any(found) else float("nan"))}
        self._encoded[split] = arrays
        with_fact = sum(ex.fact_id is not None for ex in examples)
        searched = with_fact and self.facts != "none"
        self._recall[split] = hits / with_fact if searched else float("nan")
        self._recall1[split] = firsts / with_fact if searched else float("nan")
        return arrays

    def train_batches(self, seed: int) -> base.Batches:
        return RefExpBatches(self.encode("train"), self.cfg.train.batch_size, seed)

    def selection_batches(self, settings: Mapping[str, Any], seed: int) -> Iterable[dict[str, Any]]:
        base.check_settings("selection", settings, ("num_batches", "batch_size"))
        batches = RefExpBatches(self.encode("train"), settings.get("batch_size") or self.cfg.train.batch_size, seed)
        return ({k: jnp.asarray(v) for k, v in b.items()} for b in batches.iterate(0, settings["num_batches"]))

    # --------------------------------------------------------------------------- loss, evaluation

    @staticmethod
    def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
        return {k: batch[k] for k in ("regions", "geometry", "region_mask", "expr_ids", "expr_mask", "fact_ids",
                                      "fact_mask", "fact_index")}

    def loss_fn(self, module: Any, methods: base.Methods, loss_weights: Mapping[str, float]) -> base.LossFn:
        """Cross-entropy over the candidates' scores (§4.3), plus the methods' recorded loss terms."""
        from vlpeft_jax.models.ckt import refexp_loss

        def loss_fn(params: Any, batch: Mapping[str, Any], rng: jax.Array) -> tuple[jax.Array, dict]:
            scores, records = peft_base.apply_with(
                module.apply, base.active_methods(methods, params), {"params": params["base"]}, rng=rng,
                train=True, side_inputs=batch.get("side_inputs"), record=True, **self.model_inputs(batch))
            loss, metrics = refexp_loss(scores, batch["target"], batch["region_mask"])
            return base.add_loss_terms(loss, dict(metrics), records, loss_weights)

        return loss_fn

    def predict(self, module: Any, params: Any, methods: base.Methods, split: str) -> np.ndarray:
        """The best-scoring candidate of every example of ``split``."""
        arrays = self.encode(split)
        size = self.cfg.eval.get("batch_size", 64)

        @jax.jit
        def scores(params: Any, batch: Mapping[str, Any]) -> jax.Array:
            return peft_base.apply_with(module.apply, base.active_methods(methods, params),
                                        {"params": params["base"]}, **self.model_inputs(batch))

        out = []
        total = len(arrays["target"])
        inputs = self.model_inputs(arrays)
        for start in range(0, total, size):
            idx = np.arange(start, start + size) % total  # a full last batch (one compile), cut below
            out.append(np.asarray(scores(params, {k: jnp.asarray(v[idx]) for k, v in inputs.items()})).argmax(-1))
        return np.concatenate(out)[:total]

    def evaluate(self, module: Any, params: Any, methods: base.Methods) -> dict[str, Any]:
        split = self.cfg.eval.get("split", "val")
        examples = self.examples(split)
        count = base.eval_count(self.cfg, len(examples))
        pred = self.predict(module, params, methods, split)[:count]
        arrays = self.encode(split)
        if "gt_box" in arrays:  # detected candidates: right when the chosen box has IoU >= 0.5 with the target's
            chosen = arrays["boxes"][np.arange(count), pred]
            correct = np.array([rx.box_iou(c[None], g[None])[0, 0] >= 0.5
                                for c, g in zip(chosen, arrays["gt_box"][:count], strict=True)], bool)
        else:
            correct = pred == arrays["target"][:count]
        metrics = {"accuracy": float(correct.mean()), "fact recall@K": self._recall[split],
                   "fact recall@1": self._recall1[split],
                   **self._detection_counts.get(split, {})}
        outputs = {ex.expr_id: int(p) for ex, p in zip(examples[:count], pred, strict=True)}
        out = {"all": {"metrics": metrics, "count": int(count)}, "outputs": outputs,
               "correct": correct.tolist(), "samples": []}
        for name, log in (("retriever", self._retriever_log), ("region_tower", self._tower_log),
                          ("encoder_pretraining", self._pretrain_log)):
            if log:  # the auxiliary networks trained inside the task: their scalar training records
                out[name] = {k: v for k, v in log.items() if isinstance(v, (int, float, str))}
        return out

    def outputs_file(self, outputs: Mapping[str, Any]) -> tuple[str, list[dict[str, Any]]]:
        return "predictions", [{"expr_id": k, "candidate": v} for k, v in outputs.items()]

    def samples(self, results: Mapping[str, Mapping[str, Any]], n: int) -> list[base.Sample]:
        split = self.cfg.eval.get("split", "val")
        out = []
        for ex in self.examples(split)[:n]:
            lines = [f"expression: {ex.expression}", f"target: candidate {ex.target} ({ex.categories[ex.target]})"
                     if ex.target >= 0 else "target: not detected (no candidate has IoU >= 0.5 with it)"]
            for label, res in results.items():
                choice = res.get("outputs", {}).get(ex.expr_id)
                if choice is not None:
                    lines.append(f"{label}: candidate {choice} ({ex.categories[choice]})")
            out.append(base.Sample(image=ex.pixels(), lines=lines))
        return out



def compare_runs(run_a: str | Path, run_b: str | Path, result: str = "adapted") -> dict[str, Any]:
    """McNemar's test (App. A.8; :func:`vlpeft_jax.eval.mcnemar.mcnemar`) between two finished refexp runs on the
    same evaluation split: each run's per-expression correctness (``results.json``), paired by position.

    Raises:
      ConfigError: a run without per-expression results, or runs evaluated on different numbers of expressions.
    """
    import json

    from vlpeft_jax.eval.mcnemar import mcnemar

    correct = []
    for run in (run_a, run_b):
        try:
            res = json.loads((Path(run) / "results.json").read_text())
            correct.append(np.asarray(res[result]["correct"], bool))
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"{run}: no per-expression results ({result!r} in results.json): {e}") from None
    if correct[0].shape != correct[1].shape:
        raise ConfigError(f"{run_a} and {run_b} were evaluated on {len(correct[0])} and {len(correct[1])} "
                          "expressions; McNemar's test pairs the same expressions")
    out = mcnemar(correct[0], correct[1])
    out.update(accuracy_a=float(correct[0].mean()), accuracy_b=float(correct[1].mean()), n=int(len(correct[0])))
    return out
