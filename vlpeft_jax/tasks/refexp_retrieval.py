"""The learned image-based fact retriever of CK-Transformer (thesis ``004_21d0d480fe4006f4.txt`` §3.3.1, App. A.9;
spec ``specs/ckt.md`` §2, B1-B4, B17, §11.7) and its text-only variant CK-T-Uw/oImage.

Fact search ranks, for every candidate, *all* facts of its category (spec §2.1) by the cosine between the
cross-modality ([CLS]) outputs of (image, expression) and (image, fact) (spec §2.2):
``sim(e, phi | I) = cos(UNITER_cls(I, e), UNITER_cls(I, phi))``. The similarity extractor is
:class:`vlpeft_jax.models.ckt.FactRetriever`, a bi-modal encoder of its own (spec B2), trained here first:

- **Pairs and the 50 % trick** (spec §2.3, B1, B4): each training expression is paired with its ground-truth
  fact (target ``y = 1``) or, with probability 1/2, with a random fact of the whole KB (any category; ``y = 0``).
  The random fact is drawn among the facts other than the ground truth (our choice: a draw of the ground truth
  itself would carry the contradicting label 0). The loss is ``(cos - y)^2``
  (:func:`~vlpeft_jax.models.ckt.retriever_loss`, spec B1), optimised with AdamW (weight decay 0.01, spec B12).
  ``negatives="category"`` draws the random fact from the ground truth's own category instead (the hard-negative
  option of spec B4; not in the thesis). With negatives from any category a pair can be told apart by whether
  the fact's category is in the image at all, which says little about ranking *within* a category. On the shapes
  world (200 training expressions) 300 steps leave the within-category ranking near chance in either setting;
  about 1500 steps bring recall@1 on the kbref KB above 0.9.
- **Visual input** (spec B3): the whole image, i.e. every candidate's region feature (``roi_features`` of the
  box) and 7-d geometry (App. Eq. (1), spec B15). So candidates of the same category in one image get the same
  ranking. ``mode="text"`` is CK-T-Uw/oImage (Table 3.1; footnote 4, after Frank et al. 2021b): every
  candidate's region feature is replaced by the mean of the image's candidate features, the geometry is kept
  (spec B17); this applies in training and in ranking.
- **Ranking**: per image, one encoder call scores every fact of the image's categories (deduplicated); each
  candidate gets its category's fact ids sorted by cosine, best first, ties by fact id. ``recall@k`` is the
  share of examples whose ground-truth fact is among the target's top-k (spec §11.7, a diagnostic not in the
  thesis).

Example (a tiny untrained retriever on the contextual shapes KB):
    >>> from vlpeft_jax.data.refexp import RefExpConfig, build_refexp
    >>> from vlpeft_jax.data.tokenizer import WordTokenizer
    >>> data = build_refexp(RefExpConfig(variant="contextual", num_train=4, num_val=0, num_test=0))
    >>> tok = WordTokenizer.train(data.texts())
    >>> r = Retriever(RetrieverSettings(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    ...                                 intermediate_size=32), data.fact_base, tok, grid=2)
    >>> ex = data["train"][0]
    >>> ranks = r.rank(ex)
    >>> len(ranks) == len(ex.boxes), sorted(ranks[0]) == sorted(f.fact_id for f in
    ...                                                          data.fact_base.of_category(ex.categories[0]))
    (True, True)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlpeft_jax.data import refexp as rx
from vlpeft_jax.errors import ConfigError, InputError
from vlpeft_jax.models.ckt import CKTConfig, FactRetriever, retriever_loss
from vlpeft_jax.tasks.base import check_numbers
from vlpeft_jax.tasks.refexp import roi_features

MODES = ("image", "text")
NEGATIVES = ("any", "category")
MIN_CANDIDATES = 9
"""Candidates are padded to at least this many (the shapes world's 3 x 3 grid), so most images share one shape."""


@dataclasses.dataclass(frozen=True)
class RetrieverSettings:
    """Settings of :class:`Retriever`.

    Attributes:
        mode: ``"image"`` (CK-T's image-based search) or ``"text"`` (CK-T-Uw/oImage: candidate features replaced
            by the image's mean candidate feature, geometry kept; spec B17).
        steps, batch_size, learning_rate: AdamW training of the similarity extractor (weight decay 0.01).
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: the encoder (a CKTConfig).
        seed: parameter init, batch order and the 50 % sampler.
        negatives: where the 50 % trick's random facts come from: ``"any"`` fact of the KB (spec B4, as the
            thesis says) or the ground truth's own ``"category"`` (hard negatives, the option B4 offers; not in
            the thesis).

    Example:
        >>> RetrieverSettings(mode="text").mode
        'text'
    """

    mode: str = "image"
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 1e-3
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 128
    seed: int = 0
    negatives: str = "any"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"RetrieverSettings.mode={self.mode!r}; valid: {', '.join(MODES)}")
        if self.negatives not in NEGATIVES:
            raise ConfigError(f"RetrieverSettings.negatives={self.negatives!r}; valid: {', '.join(NEGATIVES)}")
        check_numbers(self, {"steps": 0, "batch_size": 1})


def replace_half(gt: np.ndarray, num_facts: int, rng: np.random.Generator,
                 pools: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 50 % trick (spec §2.3, B1, B4): ``(fact index, label)`` per ground-truth fact index in ``gt``.

    With probability 1/2 the pair keeps its ground-truth fact (label 1), else it gets a uniformly random fact of
    the KB other than the ground truth (label 0). ``pools`` (optional, one per fact index: the facts a negative
    of that ground truth is drawn from, e.g. its category's; it must hold a fact other than the ground truth)
    replaces "the whole KB".

    Example:
        >>> idx, y = replace_half(np.array([0, 1, 2, 3]), 5, np.random.default_rng(0))
        >>> bool(((y == 1) == (idx == np.array([0, 1, 2, 3]))).all())
        True
    """
    gt = np.asarray(gt, np.int64)
    if num_facts < 2:
        raise InputError(f"the 50% sampler needs a KB of at least 2 facts; got {num_facts}")
    keep = rng.random(gt.shape) < 0.5
    other = rng.integers(0, num_facts - 1, gt.shape)
    other = other + (other >= gt)  # uniform over the facts other than the ground truth
    if pools is not None:
        for i, g in enumerate(gt.ravel()):
            pool = pools[g][pools[g] != g]
            if len(pool) == 0:
                raise InputError(f"no negative for fact {g}: its pool holds only the ground truth")
            other.flat[i] = pool[rng.integers(len(pool))]
    return np.where(keep, gt, other), keep.astype(np.float32)


def recall_from_rankings(rankings: Sequence[Sequence[Sequence[str]]], targets: Sequence[int],
                         gt_facts: Sequence[str | None], k: int) -> float:
    """The share of examples (with a ground-truth fact) whose fact is among their target's top-``k``.

    Example:
        >>> recall_from_rankings([[["a", "b"]], [["c", "d"]]], [0, 0], ["b", "c"], 1)
        0.5
    """
    if k < 1:
        raise ConfigError(f"recall@k: k={k} must be >= 1")
    hits = [gt in ranks[t][:k] for ranks, t, gt in zip(rankings, targets, gt_facts, strict=True) if gt is not None]
    return sum(hits) / len(hits) if hits else float("nan")


def _round_up(x: int, m: int) -> int:
    return max(m, int(math.ceil(x / m)) * m)


@functools.lru_cache(maxsize=16)
def _init(cfg: CKTConfig, text_len: int) -> Any:
    """A jitted parameter initialiser (key -> params) for a config."""
    n = MIN_CANDIDATES
    dummy = (jnp.zeros((1, n, cfg.region_feature_size)), jnp.zeros((1, n, cfg.geometry_size)), jnp.ones((1, n), bool),
             jnp.zeros((1, text_len), jnp.int32), None, jnp.zeros((1, text_len), jnp.int32), None)
    return jax.jit(lambda key: FactRetriever(cfg).init(key, *dummy)["params"])


@functools.lru_cache(maxsize=16)
def _functions(cfg: CKTConfig, learning_rate: float) -> tuple[Any, Any, Any]:
    """Jitted (train step, cosine, loss) for a config; cached so equal settings share one compile."""
    model = FactRetriever(cfg)
    opt = optax.adamw(learning_rate, weight_decay=0.01)

    def loss_fn(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        cos = model.apply({"params": params}, batch["regions"], batch["geometry"], batch["region_mask"],
                          batch["expr_ids"], batch["expr_mask"], batch["fact_ids"], batch["fact_mask"])
        return retriever_loss(cos, batch["y"])

    @jax.jit
    def step(params: Any, opt_state: Any, batch: dict[str, jax.Array]) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def cos(params: Any, regions: jax.Array, geometry: jax.Array, region_mask: jax.Array, expr_ids: jax.Array,
            expr_mask: jax.Array, fact_ids: jax.Array, fact_mask: jax.Array) -> jax.Array:
        return model.apply({"params": params}, regions, geometry, region_mask, expr_ids, expr_mask, fact_ids,
                           fact_mask)

    return step, cos, jax.jit(loss_fn)


class Retriever:
    """CK-T's learned fact retriever (see the module docstring); ``mode="text"`` is CK-T-Uw/oImage.

    ``fit(examples)`` trains the similarity extractor, ``rank(ex)`` returns per candidate its category's fact ids
    best first, ``rank_many(examples)`` does the same with batched forwards, ``recall_at_k(examples, k)`` scores
    the target's top-k against the ground-truth fact.

    Example:
        >>> from vlpeft_jax.data.refexp import Fact, FactBase
        >>> from vlpeft_jax.data.tokenizer import WordTokenizer
        >>> kb = FactBase([Fact("c0", "circle", "a circle is sacred"), Fact("s0", "square", "a square floats")])
        >>> tok = WordTokenizer.train(kb.texts())
        >>> r = Retriever(RetrieverSettings(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        ...                                 intermediate_size=32), kb, tok, grid=1)
        >>> r.model_config.region_feature_size, r.fact_ids.shape[0]
        (3, 2)
    """

    def __init__(self, settings: RetrieverSettings, fact_base: rx.FactBase, tokenizer: Any, grid: int) -> None:
        if not isinstance(settings, RetrieverSettings):
            raise ConfigError(f"settings must be a RetrieverSettings, got {type(settings).__name__}")
        if settings.mode not in MODES:  # a settings object built around __post_init__
            raise ConfigError(f"RetrieverSettings.mode={settings.mode!r}; valid: {', '.join(MODES)}")
        if not isinstance(grid, int) or grid < 1:
            raise ConfigError(f"grid={grid!r} must be a positive integer (RoI pooling cells per side)")
        self.settings, self.fact_base, self.tokenizer, self.grid = settings, fact_base, tokenizer, grid
        self.pad_id = tokenizer.token_to_id("<pad>") or 0
        facts = fact_base.facts
        self.fact_index = {f.fact_id: i for i, f in enumerate(facts)}
        by_category = {c: np.array([self.fact_index[f.fact_id] for f in fact_base.of_category(c)], np.int64)
                       for c in fact_base.categories}
        self.negative_pools = ([by_category[f.category] for f in facts] if settings.negatives == "category"
                               else None)
        tokens = [tokenizer.encode(f.text) for f in facts]
        tf = max(len(t) for t in tokens)
        self.fact_ids = np.full((len(facts), tf), self.pad_id, np.int32)
        self.fact_mask = np.zeros((len(facts), tf), bool)
        for i, t in enumerate(tokens):
            self.fact_ids[i, :len(t)] = t
            self.fact_mask[i, :len(t)] = True
        self.model_config = CKTConfig(
            vocab_size=tokenizer.vocab_size, region_feature_size=grid * grid * 3, hidden_size=settings.hidden_size,
            num_hidden_layers=settings.num_hidden_layers, num_attention_heads=settings.num_attention_heads,
            intermediate_size=settings.intermediate_size, max_position_embeddings=max(64, _round_up(tf, 8)),
            pad_token_id=self.pad_id)
        self._step, self._cos, self._loss = _functions(self.model_config, float(settings.learning_rate))
        self.text_len = _round_up(tf, 8)
        sizes = sorted((len(fact_base.of_category(c)) for c in fact_base.categories), reverse=True)
        self.max_image_facts = _round_up(min(len(facts), sum(sizes[:MIN_CANDIDATES])), 8)
        """Fact slots of one ranking forward (the facts of the ``MIN_CANDIDATES`` largest categories): one shape."""
        self.params = _init(self.model_config, self.text_len)(jax.random.key(settings.seed))

    # ------------------------------------------------------------------------------------ inputs
    def visual_inputs(self, ex: rx.RefExample) -> tuple[np.ndarray, np.ndarray]:
        """``(regions [n, grid*grid*3], geometry [n, 7])`` of an example's candidates (before the mode applies)."""
        image = ex.pixels()
        return (roi_features(image, ex.boxes, self.grid),
                rx.geometry(ex.boxes, image.shape[1], image.shape[0]))

    def apply_mode(self, regions: np.ndarray) -> np.ndarray:
        """``mode="text"``: every row replaced by the mean row (spec B17; computed in float64); else unchanged."""
        regions = np.asarray(regions, np.float32)
        if self.settings.mode == "image" or len(regions) == 0:
            return regions
        mean = regions.astype(np.float64).mean(0).astype(np.float32)
        return np.broadcast_to(mean, regions.shape).copy()

    def _text(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        if len(ids) > self.model_config.max_position_embeddings:
            raise InputError(f"expression {text!r} has {len(ids)} tokens, more than the retriever's "
                             f"{self.model_config.max_position_embeddings} positions")
        return ids

    def _pack(self, visuals: Sequence[tuple[np.ndarray, np.ndarray]], texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Padded arrays of (mode-applied regions, geometry, mask, expression ids, mask) for several examples."""
        n = max([MIN_CANDIDATES] + [len(r) for r, _ in visuals])
        ids = [self._text(t) for t in texts]
        t = max([self.text_len] + [_round_up(len(i), 8) for i in ids])
        b, f = len(visuals), self.model_config.region_feature_size
        out = {"regions": np.zeros((b, n, f), np.float32), "geometry": np.zeros((b, n, 7), np.float32),
               "region_mask": np.zeros((b, n), bool), "expr_ids": np.full((b, t), self.pad_id, np.int32),
               "expr_mask": np.zeros((b, t), bool)}
        for i, ((regions, geom), e) in enumerate(zip(visuals, ids, strict=True)):
            m = len(regions)
            out["regions"][i, :m] = self.apply_mode(regions)
            out["geometry"][i, :m] = geom
            out["region_mask"][i, :m] = True
            out["expr_ids"][i, :len(e)] = e
            out["expr_mask"][i, :len(e)] = True
        return out

    def _training_arrays(self, examples: Sequence[rx.RefExample]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        usable = [ex for ex in examples if ex.fact_id is not None]
        if not usable:
            raise InputError("the retriever needs examples with a ground-truth fact (fact_id); none were given")
        for ex in usable:
            if ex.fact_id not in self.fact_index:
                raise InputError(f"{ex.expr_id}: ground-truth fact {ex.fact_id!r} is not in the fact base")
        arrays = self._pack([self.visual_inputs(ex) for ex in usable], [ex.expression for ex in usable])
        return arrays, np.array([self.fact_index[ex.fact_id] for ex in usable], np.int64)

    def _pairs(self, arrays: dict[str, np.ndarray], gt: np.ndarray, idx: np.ndarray,
               rng: np.random.Generator) -> dict[str, jax.Array]:
        fact, y = replace_half(gt[idx], len(self.fact_ids), rng, self.negative_pools)
        batch = {k: v[idx] for k, v in arrays.items()}
        batch.update(fact_ids=self.fact_ids[fact], fact_mask=self.fact_mask[fact], y=y)
        return {k: jnp.asarray(v) for k, v in batch.items()}

    # ---------------------------------------------------------------------------------- training
    def fit(self, examples: Sequence[rx.RefExample]) -> dict[str, float]:
        """Trains the similarity extractor on ``examples`` (spec §2.3, B1); returns the loss log.

        Each step draws ``batch_size`` expressions (shuffled epochs) and pairs each with its ground-truth fact or
        a random one (:func:`replace_half`). Returns ``{"loss_first", "loss_last", "steps", "examples"}`` (the
        first and last step's batch loss).
        """
        s = self.settings
        arrays, gt = self._training_arrays(examples)
        size = len(gt)
        rng = np.random.default_rng((s.seed, 1))
        opt_state = optax.adamw(s.learning_rate, weight_decay=0.01).init(self.params)
        order: np.ndarray = np.zeros(0, np.int64)
        losses = []
        for _ in range(s.steps):
            while len(order) < s.batch_size:
                order = np.concatenate([order, rng.permutation(size)])
            idx, order = order[:s.batch_size], order[s.batch_size:]
            self.params, opt_state, loss = self._step(self.params, opt_state, self._pairs(arrays, gt, idx, rng))
            losses.append(float(loss))
        nan = float("nan")
        return {"loss_first": losses[0] if losses else nan, "loss_last": losses[-1] if losses else nan,
                "steps": s.steps, "examples": size}

    def pair_loss(self, examples: Sequence[rx.RefExample], seed: int = 0) -> float:
        """The retriever loss on fixed 50 % pairs of ``examples`` (drawn from ``seed``): a held-out check."""
        arrays, gt = self._training_arrays(examples)
        batch = self._pairs(arrays, gt, np.arange(len(gt)), np.random.default_rng(seed))
        return float(self._loss(self.params, batch))

    # ----------------------------------------------------------------------------------- ranking
    def _unique_facts(self, categories: Sequence[str]) -> list[int]:
        return list(dict.fromkeys(self.fact_index[f.fact_id] for c in dict.fromkeys(categories)
                                  for f in self.fact_base.of_category(c)))

    def fact_scores(self, regions: np.ndarray, geometry: np.ndarray, expression: str,
                    fact_rows: Sequence[int]) -> np.ndarray:
        """Cosines ``[len(fact_rows)]`` of (image, expression) vs (image, fact) for facts given by KB row."""
        return self._scores([(regions, geometry)], [expression], [list(fact_rows)])[0]

    def _scores(self, visuals: Sequence[tuple[np.ndarray, np.ndarray]], texts: Sequence[str],
                rows: Sequence[Sequence[int]], min_facts: int = 0) -> list[np.ndarray]:
        arrays = self._pack(visuals, texts)
        p = _round_up(max([min_facts or self.max_image_facts] + [len(r) for r in rows]), 8)
        idx = np.zeros((len(rows), p), np.int64)
        for i, r in enumerate(rows):
            idx[i, :len(r)] = r  # padding slots score fact 0 and are dropped below
        cos = np.asarray(self._cos(self.params, arrays["regions"], arrays["geometry"], arrays["region_mask"],
                                   arrays["expr_ids"], arrays["expr_mask"], self.fact_ids[idx],
                                   self.fact_mask[idx]))
        return [cos[i, :len(r)] for i, r in enumerate(rows)]

    def rank_features(self, regions: np.ndarray, geometry: np.ndarray, categories: Sequence[str],
                      expression: str) -> list[list[str]]:
        """Per candidate, its category's fact ids by cosine, best first (ties by fact id); see :meth:`rank`."""
        return self._rank_batch([(regions, geometry)], [categories], [expression])[0]

    def _rank_batch(self, visuals: Sequence[tuple[np.ndarray, np.ndarray]], categories: Sequence[Sequence[str]],
                    texts: Sequence[str], min_facts: int = 0) -> list[list[list[str]]]:
        rows = [self._unique_facts(c) for c in categories]
        scores = self._scores(visuals, texts, rows, min_facts)
        out = []
        for cats, r, cos in zip(categories, rows, scores, strict=True):
            by_id = {self.fact_base.facts[j].fact_id: float(c) for j, c in zip(r, cos, strict=True)}
            per_category = {c: sorted((f.fact_id for f in self.fact_base.of_category(c)),
                                      key=lambda fid: (-by_id[fid], fid)) for c in dict.fromkeys(cats)}
            out.append([list(per_category[c]) for c in cats])
        return out

    def rank(self, ex: rx.RefExample) -> list[list[str]]:
        """Per candidate of ``ex``: its category's fact ids sorted by cosine, best first (spec §2.4, B3).

        The visual input is the whole image, so same-category candidates get identical rankings; one forward
        scores every fact of the image's categories.
        """
        return self.rank_features(*self.visual_inputs(ex), ex.categories, ex.expression)

    def rank_many(self, examples: Sequence[rx.RefExample], batch_size: int | None = None) -> list[list[list[str]]]:
        """:meth:`rank` of every example, ``batch_size`` examples (default: the settings') per forward."""
        size = min(batch_size or self.settings.batch_size, max(1, len(examples)))
        out: list[list[list[str]]] = []
        for start in range(0, len(examples), size):
            chunk = list(examples[start:start + size])
            real = len(chunk)
            chunk += [chunk[0]] * (size - real)  # a full last batch (one compile), cut below
            out.extend(self._rank_batch([self.visual_inputs(ex) for ex in chunk], [ex.categories for ex in chunk],
                                        [ex.expression for ex in chunk])[:real])
        return out

    def recall_at_k(self, examples: Sequence[rx.RefExample], k: int) -> float:
        """The share of examples with a ground-truth fact that is among the target's top-``k`` (spec §11.7)."""
        rankings = self.rank_many(examples)
        return recall_from_rankings(rankings, [ex.target for ex in examples], [ex.fact_id for ex in examples], k)
