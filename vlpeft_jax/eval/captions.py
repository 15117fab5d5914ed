"""Caption metrics that give pycocoevalcap's numbers: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, CIDEr, SPICE.

All metrics take tokenised captions (see :mod:`vlpeft_jax.eval.tokenize`) as
``refs = {image_id: [ref, ...]}`` and ``cands = {image_id: caption}`` (a one-element list is accepted
too, as pycocoevalcap's ``res`` dicts have) and return ``(corpus_score, per_image_scores)`` with
per-image scores in the order of ``cands``. :func:`evaluate_captions` runs the whole COCO pipeline on
raw captions.

What each metric is (and which reference it reproduces):

- **BLEU-n** (Papineni et al. 2002) as pycocoevalcap's ``Bleu``/``BleuScorer``: clipped n-gram
  precisions, brevity penalty against the *closest* reference length (ties: the shorter), the corpus score
  from n-gram counts summed over all images and the per-image scores from each image's own counts, with
  its smoothing constants (``tiny = 1e-15`` added to matches and to the candidate length, ``small = 1e-9``
  to guesses and the reference length).
- **ROUGE-L** (Lin 2004) as pycocoevalcap's ``Rouge``: F-measure with beta = 1.2 from the best LCS
  precision and recall over the references, tokens split on single spaces; corpus = mean over images.
  LCS lengths are computed bit-parallel (Allison-Dix / Hyyro) over all pairs at once with numpy.
- **CIDEr-D** (Vedantam et al. 2015) as pycocoevalcap's ``Cider`` (whose scorer is CIDEr-D): TF-IDF
  vectors of 1..4-grams with document frequencies over the *reference* set of the evaluated images
  (idf = log(#images) - log(max(1, df))), per order the cosine-like similarity with the candidate's
  weights clipped at the reference's (``min(g_c, g_r) * g_r``), times a Gaussian length penalty
  ``exp(-(l_c - l_r)^2 / (2 * 6^2))`` (lengths counted as pycocoevalcap does, as the number of bigrams),
  averaged over orders and references, times 10; corpus = mean over images.
- **CIDEr** ("plain" CIDEr): the paper's Eq. 3-4 (cosine of the TF-IDF vectors, no clipping, no length
  penalty, uniform weights over n = 1..4, mean over references), times 10 as in the authors' reference
  code (``pyciderevalcap.cider`` in github.com/vrama91/cider), with the same corpus document frequencies.
- **METEOR** 1.5 through the jar shipped with pycocoevalcap (needs Java): per-image scores from the jar's
  ``SCORE`` lines and the corpus score from its ``EVAL`` aggregate (not the mean of per-image scores).
- **SPICE** through pycocoevalcap's jar when Stanford CoreNLP 3.6.0 is installed next to it; otherwise
  reported as unavailable (see :func:`spice_status`), never an error.

BLEU, ROUGE-L and the two CIDErs share one n-gram table (:func:`ngram_table`): every sentence is interned
to token ids and every n-gram to an integer id with ``np.unique``, and the metrics become sparse counts,
sorted lookups and ``bincount`` reductions.

Example:
    >>> refs = {1: ["a cat on a mat", "a cat sitting on a mat"], 2: ["two dogs playing", "dogs at play"]}
    >>> cands = {1: "a cat on the mat", 2: "two dogs play"}
    >>> corpus, per_image = bleu(refs, cands)
    >>> [round(float(x), 4) for x in corpus]
    [0.875, 0.6614, 0.4782, 0.0001]
    >>> round(rouge_l(refs, cands)[0], 4)
    0.7333
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import json
import shutil
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlpeft_jax.errors import InputError
from vlpeft_jax.eval import tokenize as tok

Refs = Mapping[Hashable, Sequence[str]]
Cands = Mapping[Hashable, Any]  # str, or a one-element list of str (pycocoevalcap's ``res`` format)

BLEU_SMALL = 1e-9  # pycocoevalcap BleuScorer: added to guesses and to the reference length
BLEU_TINY = 1e-15  # added to matches and to the candidate length ("so that if guess is 0 still return 0")
ROUGE_BETA = 1.2
CIDER_SIGMA = 6.0

METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "CIDEr", "SPICE")
DEFAULT_METRICS = METRIC_NAMES

_SPICE_CORENLP = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
_SPICE_CORENLP_URL = "http://nlp.stanford.edu/software/stanford-corenlp-full-2015-12-09.zip"


class MetricUnavailable(RuntimeError):
    """A metric cannot run on this machine (e.g. no Java); the message says what to install."""


# ---------------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------------


def _ids_text(ids: Sequence[Any], limit: int = 10) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def check_captions(refs: Refs, cands: Cands, *, allow_empty: bool = True) -> tuple[list[Hashable], list[str]]:
    """Validates ``refs``/``cands`` and returns the image ids (order of ``cands``) and candidate strings.

    Raises:
      InputError: naming the image ids that have a candidate but no references, a non-string caption
        (candidate or reference), or (``allow_empty=False``) an empty candidate.

    Example:
        >>> check_captions({1: ["a cat"]}, {1: ["a dog"]})
        ([1], ['a dog'])
    """
    ids = list(cands)
    if not ids:
        raise InputError("no candidate captions to score")
    strings: list[str] = []
    bad_type: list[Hashable] = []
    for image_id in ids:
        cand = cands[image_id]
        if isinstance(cand, (list, tuple)) and len(cand) == 1:
            cand = cand[0]
        if not isinstance(cand, str):
            bad_type.append(image_id)
            cand = ""
        strings.append(cand)
    if bad_type:
        raise InputError(f"candidate captions must be strings (one per image); bad image ids: {_ids_text(bad_type)}")
    missing = [i for i in ids if i not in refs or len(refs[i]) == 0]
    if missing:
        raise InputError(f"candidates for images without references: image ids {_ids_text(missing)}")
    bad_refs = [i for i in ids if isinstance(refs[i], str) or not all(isinstance(r, str) for r in refs[i])]
    if bad_refs:
        raise InputError(f"references must be lists of strings; bad image ids: {_ids_text(bad_refs)}")
    if not allow_empty:
        empty = [i for i, s in zip(ids, strings, strict=True) if not s.strip()]
        if empty:
            raise InputError(f"empty candidate captions for image ids {_ids_text(empty)}")
    return ids, strings


# ---------------------------------------------------------------------------------------------------------
# Sentence layout and n-gram table
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NgramTable:
    """Sparse n-gram counts of all candidates and references of an evaluation, shared by BLEU and CIDEr.

    Sentences are laid out as ``[candidate of image 0..I-1, references of image 0, of image 1, ...]``.

    Attributes:
      image_ids: image ids in candidate order.
      max_n: highest n-gram order.
      lengths: ``[S]`` tokens per sentence (``str.split()``).
      ref_offsets: ``[I+1]``; references of image i are sentences ``I + ref_offsets[i] : I + ref_offsets[i+1]``.
      ref_image: ``[R]`` image index of each reference.
      entry_sentence, entry_gram, entry_count: one entry per (sentence, distinct n-gram), sorted by
        sentence then gram id.
      gram_order: ``[G]`` the order (0-based: 0 = unigram) of each n-gram id.
    """

    image_ids: list[Hashable]
    max_n: int
    lengths: np.ndarray
    ref_offsets: np.ndarray
    ref_image: np.ndarray
    entry_sentence: np.ndarray
    entry_gram: np.ndarray
    entry_count: np.ndarray
    gram_order: np.ndarray

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_grams(self) -> int:
        return len(self.gram_order)


def _layout(refs: Refs, cands: Cands) -> tuple[list[Hashable], list[str], np.ndarray]:
    ids, cand_strings = check_captions(refs, cands)
    sentences = cand_strings + [r for i in ids for r in refs[i]]
    counts = np.fromiter((len(refs[i]) for i in ids), dtype=np.int64, count=len(ids))
    ref_offsets = np.concatenate([[0], np.cumsum(counts)])
    return ids, sentences, ref_offsets


def _intern(sentences: Sequence[str], split_on_space: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """Token ids (flat) and lengths of ``sentences`` split with ``split()`` or, for ROUGE, ``split(" ")``."""
    words = [s.split(" ") for s in sentences] if split_on_space else list(map(str.split, sentences))
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    flat = list(itertools.chain.from_iterable(words))
    vocab = {w: i for i, w in enumerate(dict.fromkeys(flat))}  # C-level loops: this is the hot path
    return np.array(list(map(vocab.__getitem__, flat)), dtype=np.int64), lengths, len(vocab)


def _sorted_unique(x: np.ndarray) -> np.ndarray:
    """``np.unique`` by sorting (numpy >= 2.3's hash-based default is slower on these int64 keys)."""
    x = np.sort(x)
    return x[np.concatenate([[True], x[1:] != x[:-1]])] if len(x) else x


def ngram_table(refs: Refs, cands: Cands, max_n: int = 4) -> NgramTable:
    """Builds the shared :class:`NgramTable` (validates the inputs like :func:`check_captions`).

    Example:
        >>> t = ngram_table({1: ["a b a"]}, {1: "a b"}, max_n=2)
        >>> t.num_grams, t.lengths.tolist()
        (4, [2, 3])
    """
    ids, sentences, ref_offsets = _layout(refs, cands)
    tokens, lengths, vocab_size = _intern(sentences)
    num_sentences = len(sentences)
    sentence_of_token = np.repeat(np.arange(num_sentences, dtype=np.int64), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)])[:-1]
    remaining = lengths[sentence_of_token] - (np.arange(len(tokens), dtype=np.int64) - starts[sentence_of_token])

    sent_parts, gram_parts, order_sizes = [], [], []
    gram_at = tokens  # id of the k-gram starting at each token position (valid where remaining >= k)
    num_prev = vocab_size
    offset = 0
    for k in range(1, max_n + 1):
        if num_prev * vocab_size >= 2**63:
            raise InputError(f"too many distinct {k - 1}-grams x vocabulary for 64-bit n-gram keys")
        if k == 1:
            positions = np.arange(len(tokens), dtype=np.int64)
            local, num_local = tokens, vocab_size
        else:
            positions = np.nonzero(remaining >= k)[0]
            # A k-gram is (its (k-1)-gram prefix, last token): a pair of ints made unique with np.unique.
            keys = gram_at[positions] * np.int64(vocab_size) + tokens[positions + k - 1]
            uniq, local = np.unique(keys, return_inverse=True)
            num_local = len(uniq)
            gram_at = np.full(len(tokens), -1, dtype=np.int64)
            gram_at[positions] = local
        num_prev = num_local
        sent_parts.append(sentence_of_token[positions])
        gram_parts.append(local + offset)
        order_sizes.append(num_local)
        offset += num_local
    num_grams = offset
    sent = np.concatenate(sent_parts) if sent_parts else np.zeros(0, np.int64)
    gram = np.concatenate(gram_parts) if gram_parts else np.zeros(0, np.int64)
    keys, counts = np.unique(sent * np.int64(num_grams) + gram, return_counts=True)
    gram_order = np.repeat(np.arange(max_n, dtype=np.int64), order_sizes)
    num_images = len(ids)
    ref_image = np.repeat(np.arange(num_images, dtype=np.int64), np.diff(ref_offsets))
    return NgramTable(
        image_ids=ids,
        max_n=max_n,
        lengths=lengths,
        ref_offsets=ref_offsets,
        ref_image=ref_image,
        entry_sentence=keys // num_grams,
        entry_gram=keys % num_grams,
        entry_count=counts.astype(np.int64),
        gram_order=gram_order,
    )


def _image_of_sentence(table: NgramTable) -> np.ndarray:
    return np.concatenate([np.arange(table.num_images, dtype=np.int64), table.ref_image])


def _lookup(sorted_keys: np.ndarray, values: np.ndarray, queries: np.ndarray, missing: float = 0) -> np.ndarray:
    """``values[i]`` where ``sorted_keys[i] == query``, else ``missing`` (vectorised dict lookup)."""
    if len(sorted_keys) == 0:
        return np.full(len(queries), missing, dtype=np.result_type(values, type(missing)))
    pos = np.minimum(np.searchsorted(sorted_keys, queries), len(sorted_keys) - 1)
    return np.where(sorted_keys[pos] == queries, values[pos], missing)


# ---------------------------------------------------------------------------------------------------------
# BLEU
# ---------------------------------------------------------------------------------------------------------


def bleu(refs: Refs, cands: Cands, max_n: int = 4, *, table: NgramTable | None = None) -> tuple[np.ndarray, np.ndarray]:
    """BLEU-1..``max_n`` exactly as pycocoevalcap's ``Bleu(max_n).compute_score`` ('closest' ref length).

    Returns:
      ``(corpus [max_n], per_image [num_images, max_n])``.

    Example:
        >>> corpus, per_image = bleu({1: ["a b c d"]}, {1: "a b c d"})
        >>> [round(float(x), 6) for x in corpus]
        [1.0, 1.0, 1.0, 1.0]
    """
    table = table if table is not None and table.max_n >= max_n else ngram_table(refs, cands, max_n)
    num_images, num_grams = table.num_images, table.num_grams
    image_of_sentence = _image_of_sentence(table)
    is_ref = table.entry_sentence >= num_images
    used = table.gram_order[table.entry_gram] < max_n

    # Max count of each n-gram over an image's references: group ref entries by (image, gram).
    ref_sel = is_ref & used
    ref_keys = image_of_sentence[table.entry_sentence[ref_sel]] * num_grams + table.entry_gram[ref_sel]
    order = np.argsort(ref_keys, kind="stable")
    ref_keys = ref_keys[order]
    group_starts = np.flatnonzero(np.diff(ref_keys, prepend=-1))  # keys are >= 0
    max_ref_keys = ref_keys[group_starts]
    ref_counts = table.entry_count[ref_sel][order]
    max_ref_count = np.maximum.reduceat(ref_counts, group_starts) if len(group_starts) else ref_counts

    # Clipped matches of each candidate n-gram.
    cand_sel = ~is_ref & used
    cand_image = table.entry_sentence[cand_sel]
    cand_gram = table.entry_gram[cand_sel]
    max_count = _lookup(max_ref_keys, max_ref_count, cand_image * num_grams + cand_gram, missing=0)
    clipped = np.minimum(table.entry_count[cand_sel], max_count)
    correct = np.bincount(
        cand_image * max_n + table.gram_order[cand_gram], weights=clipped, minlength=num_images * max_n
    ).reshape(num_images, max_n)

    test_len = table.lengths[:num_images]
    guess = np.maximum(test_len[:, None] - np.arange(max_n)[None, :], 0).astype(np.float64)

    # 'closest' reference length: min over refs of (|l - testlen|, l), i.e. ties go to the shorter one.
    ref_len = table.lengths[num_images:]
    width = int(ref_len.max(initial=0)) + 1
    closeness = np.abs(ref_len - test_len[table.ref_image]) * width + ref_len
    ref_len_closest = np.minimum.reduceat(closeness, table.ref_offsets[:-1]) % width

    per_image = _bleu_from_counts(correct, guess, test_len.astype(np.float64), ref_len_closest.astype(np.float64))
    corpus = _bleu_from_counts(
        correct.sum(0, keepdims=True), guess.sum(0, keepdims=True),
        np.array([float(test_len.sum())]), np.array([float(ref_len_closest.sum())]),
    )[0]
    return corpus, per_image


def _bleu_from_counts(correct: np.ndarray, guess: np.ndarray, test_len: np.ndarray, ref_len: np.ndarray) -> np.ndarray:
    """BleuScorer.compute_score's formula, row-wise, in its operation order."""
    max_n = correct.shape[1]
    out = np.empty_like(guess)
    running = np.ones(len(correct))
    for k in range(max_n):
        running = running * ((correct[:, k] + BLEU_TINY) / (guess[:, k] + BLEU_SMALL))
        out[:, k] = running ** (1.0 / (k + 1))
    ratio = (test_len + BLEU_TINY) / (ref_len + BLEU_SMALL)
    with np.errstate(divide="ignore", over="ignore"):
        penalty = np.where(ratio < 1, np.exp(1 - 1 / ratio), 1.0)
    return out * penalty[:, None]


# ---------------------------------------------------------------------------------------------------------
# ROUGE-L
# ---------------------------------------------------------------------------------------------------------

_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def _popcount64(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x).astype(np.int64)
    return _POPCOUNT8[x.view(np.uint8).reshape(-1, 8)].sum(1)


def lcs_lengths(tokens: np.ndarray, lengths: np.ndarray, pairs_a: np.ndarray, pairs_b: np.ndarray) -> np.ndarray:
    """Longest-common-subsequence lengths of many sentence pairs.

    Sentences are given flat (``tokens`` ids, ``lengths``); pair p compares sentence ``pairs_a[p]`` with
    sentence ``pairs_b[p]``. Where the shorter sentence has <= 64 tokens the bit-parallel algorithm
    (Allison & Dix 1986; Hyyro 2004) runs for all such pairs at once: the shorter sentence's positions
    are the bits of an unsigned integer ``V`` (all ones at the start), each token of the longer one
    updates ``U = V & M; V = (V + U) | (V & ~M)`` with ``M`` the positions where it matches, and the LCS
    is the number of zero bits left. Pairs are bucketed by width (16/32/64 bits) and sorted by the longer
    length, so each step touches only the pairs still running. Longer pairs use the quadratic programme.

    Example:
        >>> lcs_lengths(np.array([0, 1, 2, 0, 2, 3]), np.array([3, 3]), np.array([0]), np.array([1])).tolist()
        [2]
    """
    starts = np.concatenate([[0], np.cumsum(lengths)])[:-1]
    len_a, len_b = lengths[pairs_a], lengths[pairs_b]
    a_shorter = len_a <= len_b
    short_start = np.where(a_shorter, starts[pairs_a], starts[pairs_b])
    long_start = np.where(a_shorter, starts[pairs_b], starts[pairs_a])
    short_len = np.minimum(len_a, len_b)
    long_len = np.maximum(len_a, len_b)
    out = np.zeros(len(pairs_a), dtype=np.int64)
    last_token = max(len(tokens) - 1, 0)
    for low, width, dtype in ((0, 16, np.dtype("<u2")), (16, 32, np.dtype("<u4")), (32, 64, np.dtype("<u8"))):
        sel = np.nonzero((short_len > low) & (short_len <= width))[0]
        if len(sel) == 0:
            continue
        sel = sel[np.argsort(-long_len[sel], kind="stable")]
        cols = np.arange(width)
        valid = cols[None, :] < short_len[sel][:, None]
        bit_tokens = np.where(valid, tokens[np.minimum(short_start[sel][:, None] + cols[None, :], last_token)], -1)
        scan_start, neg_len = long_start[sel], -long_len[sel]
        v = np.full(len(sel), np.iinfo(dtype).max, dtype=dtype)
        for j in range(int(-neg_len[0])):
            active = int(np.searchsorted(neg_len, -j, side="left"))  # pairs whose longer sentence has > j tokens
            eq = bit_tokens[:active] == tokens[scan_start[:active] + j][:, None]
            match = np.packbits(eq, axis=1, bitorder="little").view(dtype).ravel()
            va = v[:active]
            v[:active] = (va + (va & match)) | (va & ~match)
        n = short_len[sel].astype(np.uint64)
        low_bits = np.where(n >= 64, np.uint64(2**64 - 1), (np.uint64(1) << np.minimum(n, 63)) - np.uint64(1))
        out[sel] = short_len[sel] - _popcount64(v.astype(np.uint64) & low_bits)
    for p in np.nonzero(short_len > 64)[0]:
        a = tokens[starts[pairs_a[p]] : starts[pairs_a[p]] + len_a[p]].tolist()
        b = tokens[starts[pairs_b[p]] : starts[pairs_b[p]] + len_b[p]].tolist()
        out[p] = _lcs_dp(a, b)
    return out


def _lcs_dp(a: list[int], b: list[int]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(refs: Refs, cands: Cands, beta: float = ROUGE_BETA) -> tuple[float, np.ndarray]:
    """ROUGE-L as pycocoevalcap's ``Rouge().compute_score``: ``(mean over images, per_image [num_images])``.

    Example:
        >>> round(rouge_l({1: ["a b c d"]}, {1: "a c d"})[0], 4)
        0.8356
    """
    ids, sentences, ref_offsets = _layout(refs, cands)
    tokens, lengths, _ = _intern(sentences, split_on_space=True)  # pycocoevalcap splits on " "
    num_images = len(ids)
    ref_image = np.repeat(np.arange(num_images, dtype=np.int64), np.diff(ref_offsets))
    ref_sentence = num_images + np.arange(len(ref_image), dtype=np.int64)
    lcs = lcs_lengths(tokens, lengths, ref_image, ref_sentence).astype(np.float64)
    prec = lcs / lengths[ref_image]
    rec = lcs / lengths[ref_sentence]
    prec_max = np.maximum.reduceat(prec, ref_offsets[:-1])
    rec_max = np.maximum.reduceat(rec, ref_offsets[:-1])
    b2 = beta**2
    with np.errstate(divide="ignore", invalid="ignore"):
        score = ((1 + b2) * prec_max * rec_max) / (rec_max + b2 * prec_max)
    score = np.where((prec_max != 0) & (rec_max != 0), score, 0.0)
    return float(np.mean(score)), score


# ---------------------------------------------------------------------------------------------------------
# CIDEr-D and CIDEr
# ---------------------------------------------------------------------------------------------------------


def _cider(table: NgramTable, clipped: bool, sigma: float | None) -> tuple[float, np.ndarray]:
    num_images, num_grams, max_n = table.num_images, table.num_grams, table.max_n
    image_of_sentence = _image_of_sentence(table)
    is_ref = table.entry_sentence >= num_images

    # Document frequency: the number of images whose references contain the n-gram.
    ref_pairs = _sorted_unique(image_of_sentence[table.entry_sentence[is_ref]] * num_grams + table.entry_gram[is_ref])
    df = np.bincount(ref_pairs % num_grams, minlength=num_grams).astype(np.float64)
    log_num_images = np.log(float(num_images))
    weight = table.entry_count * (log_num_images - np.log(np.maximum(1.0, df[table.entry_gram])))
    order = table.gram_order[table.entry_gram]
    num_sentences = len(table.lengths)
    norm = np.sqrt(
        np.bincount(table.entry_sentence * max_n + order, weights=weight * weight, minlength=num_sentences * max_n)
    ).reshape(num_sentences, max_n)

    # Candidate weight of each reference n-gram (0 when the candidate lacks it): sorted lookup by (image, gram).
    cand_keys = table.entry_sentence[~is_ref] * num_grams + table.entry_gram[~is_ref]  # sorted by construction
    cand_weight = weight[~is_ref]
    ref_sentence = table.entry_sentence[is_ref]
    ref_keys = image_of_sentence[ref_sentence] * num_grams + table.entry_gram[is_ref]
    w_cand = _lookup(cand_keys, cand_weight, ref_keys, missing=0.0)
    w_ref = weight[is_ref]
    contrib = (np.minimum(w_cand, w_ref) if clipped else w_cand) * w_ref
    num_refs = len(table.ref_image)
    val = np.bincount(
        (ref_sentence - num_images) * max_n + order[is_ref], weights=contrib, minlength=num_refs * max_n
    ).reshape(num_refs, max_n)
    denom = norm[table.ref_image] * norm[num_images:]
    val = np.where(denom != 0, val / np.where(denom != 0, denom, 1.0), val)
    if sigma is not None:
        # pycocoevalcap counts length as the number of bigrams (its ``n == 1`` branch).
        bigrams = np.maximum(table.lengths - 1, 0).astype(np.float64)
        delta = bigrams[table.ref_image] - bigrams[num_images:]
        val = val * np.e ** (-(delta**2) / (2 * sigma**2))[:, None]
    sums = np.add.reduceat(val, table.ref_offsets[:-1], axis=0).mean(axis=1)
    per_image = sums / np.diff(table.ref_offsets) * 10.0
    return float(np.mean(per_image)), per_image


def cider_d(refs: Refs, cands: Cands, sigma: float = CIDER_SIGMA, *, table: NgramTable | None = None
            ) -> tuple[float, np.ndarray]:
    """CIDEr-D exactly as pycocoevalcap's ``Cider().compute_score``: ``(mean, per_image)``.

    Example:
        >>> refs = {1: ["a cat on a mat"], 2: ["two dogs playing"]}
        >>> round(cider_d(refs, {1: "a cat on a mat", 2: "a dog"})[0], 4)
        5.0
    """
    table = table if table is not None and table.max_n == 4 else ngram_table(refs, cands, 4)
    return _cider(table, clipped=True, sigma=sigma)


def cider(refs: Refs, cands: Cands, *, table: NgramTable | None = None) -> tuple[float, np.ndarray]:
    """Plain CIDEr (paper Eq. 3-4, no clipping or length penalty, x10 as the authors' code): ``(mean, per_image)``.

    Example:
        >>> refs = {1: ["a cat on a mat"], 2: ["two dogs playing"]}
        >>> round(cider(refs, {1: "a cat on a mat", 2: "a dog"})[0], 4)
        5.0
    """
    table = table if table is not None and table.max_n == 4 else ngram_table(refs, cands, 4)
    return _cider(table, clipped=False, sigma=None)


# ---------------------------------------------------------------------------------------------------------
# METEOR and SPICE (Java, through pycocoevalcap)
# ---------------------------------------------------------------------------------------------------------


def meteor_status() -> tuple[bool, str]:
    """Whether METEOR can run here, and why not: ``(available, reason)``."""
    if shutil.which("java") is None:
        return False, "METEOR needs Java (a 'java' executable on PATH, e.g. apt-get install openjdk-17-jre)"
    try:
        from pycocoevalcap.meteor import meteor as meteor_module
    except ImportError:
        return False, "METEOR needs pycocoevalcap (pip install pycocoevalcap)"
    jar = Path(meteor_module.__file__).with_name(meteor_module.METEOR_JAR)
    if not jar.is_file():
        return False, f"METEOR jar not found at {jar}; reinstall pycocoevalcap"
    return True, ""


_METEOR_SCORER: Any = None  # the jar of this process (see meteor)


def _meteor_scorer() -> Any:
    """The process's METEOR jar, started on first use (and again if it died); stopped at interpreter exit."""
    global _METEOR_SCORER
    if _METEOR_SCORER is None or _METEOR_SCORER.meteor_p.poll() is not None:
        from pycocoevalcap.meteor.meteor import Meteor

        _METEOR_SCORER = Meteor()
        atexit.register(_close_meteor, _METEOR_SCORER)
    return _METEOR_SCORER


def meteor(refs: Refs, cands: Cands) -> tuple[float, np.ndarray]:
    """METEOR 1.5 via pycocoevalcap's jar: ``(corpus score from the jar's aggregate, per_image)``.

    The jar (a JVM that loads its paraphrase tables, ~5 s) is started once per process and reused by every
    later call: a sweep or a test session evaluating many runs pays for it once. Each call sends its own
    ``EVAL`` line, so the scores do not depend on earlier calls. A jar that fails is stopped and the next call
    starts a fresh one.

    Raises:
      MetricUnavailable: without Java or the jar, or when the jar fails (its error attached).
    """
    global _METEOR_SCORER
    available, reason = meteor_status()
    if not available:
        raise MetricUnavailable(reason)
    ids, cand_strings = check_captions(refs, cands)
    # '|||' separates fields in the jar's protocol; pycocoevalcap strips it from hypotheses only.
    gts = {i: [r.replace("|||", "") for r in refs[i]] for i in ids}
    res = {i: [c] for i, c in zip(ids, cand_strings, strict=True)}
    try:
        score, scores = _meteor_scorer().compute_score(gts, res)
    except Exception as e:  # the JVM failed to start or died (memory, Java version): report, don't crash
        if _METEOR_SCORER is not None:
            _close_meteor(_METEOR_SCORER)
            _METEOR_SCORER = None
        raise MetricUnavailable(f"METEOR failed: {type(e).__name__}: {e}") from e
    return float(score), np.asarray(scores, dtype=np.float64)


def _close_meteor(scorer: Any) -> None:
    """Stops a jar (pycocoevalcap's ``__del__`` later finds it stopped). The lock is waited for briefly only:
    a call that failed half-way leaves it held."""
    held = scorer.lock.acquire(timeout=5)
    try:
        if scorer.meteor_p.stdin is not None:
            scorer.meteor_p.stdin.close()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
    except OSError:
        pass
    finally:
        if held:
            scorer.lock.release()


def spice_status() -> tuple[bool, str]:
    """Whether SPICE can run here, and if not what to install: ``(available, reason)``.

    SPICE needs Java and Stanford CoreNLP 3.6.0 (``stanford-corenlp-3.6.0.jar`` and
    ``stanford-corenlp-3.6.0-models.jar``) in pycocoevalcap's ``spice/lib`` folder; pycocoevalcap would try
    to download them on first use, which we never do.

    Example:
        >>> available, reason = spice_status()
        >>> isinstance(available, bool) and (available or "SPICE" in reason)
        True
    """
    if shutil.which("java") is None:
        return False, "SPICE needs Java (a 'java' executable on PATH)"
    try:
        from pycocoevalcap.spice import spice as spice_module
    except ImportError:
        return False, "SPICE needs pycocoevalcap (pip install pycocoevalcap)"
    spice_dir = Path(spice_module.__file__).parent
    lib = spice_dir / "lib"
    missing = [name for name in _SPICE_CORENLP if not (lib / name).is_file()]
    if missing:
        return False, (
            f"SPICE needs Stanford CoreNLP 3.6.0: put {' and '.join(missing)} in {lib} "
            f"(both are in {_SPICE_CORENLP_URL})"
        )
    if not (spice_dir / spice_module.SPICE_JAR).is_file():
        return False, f"SPICE jar {spice_module.SPICE_JAR} not found in {spice_dir}; reinstall pycocoevalcap"
    return True, ""


def spice(refs: Refs, cands: Cands) -> tuple[float, np.ndarray]:
    """SPICE F-score via pycocoevalcap's jar: ``(mean, per_image)``.

    Raises:
      MetricUnavailable: when :func:`spice_status` says so, or when the jar fails (its error attached).
    """
    available, reason = spice_status()
    if not available:
        raise MetricUnavailable(reason)
    from pycocoevalcap.spice.spice import Spice

    ids, cand_strings = check_captions(refs, cands)
    gts = {i: list(refs[i]) for i in ids}
    res = {i: [c] for i, c in zip(ids, cand_strings, strict=True)}
    try:
        score, scores = Spice().compute_score(gts, res)
    except Exception as e:  # the jar runs out of our control (memory, Java version): report, don't crash
        raise MetricUnavailable(f"SPICE failed: {type(e).__name__}: {e}") from e
    by_id = dict(zip(sorted(gts), scores, strict=True))
    return float(score), np.array([by_id[i]["All"]["f"] for i in ids], dtype=np.float64)


# ---------------------------------------------------------------------------------------------------------
# The COCO pipeline
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CaptionEvaluation:
    """Result of :func:`evaluate_captions`.

    Attributes:
      scores: corpus score per metric name (``METRIC_NAMES`` order), as pycocoevalcap reports (0..1 for
        BLEU/METEOR/ROUGE-L/SPICE, CIDEr-D/CIDEr on its x10 scale).
      per_image: per-image scores per metric, aligned with ``image_ids``.
      unavailable: metric name -> why it could not run (nothing else failed because of it).
      image_ids: the evaluated images (those with a candidate).
      tokenizer: the tokenizer backend used ("java", "python" or "none").
    """

    scores: dict[str, float]
    per_image: dict[str, np.ndarray]
    unavailable: dict[str, str]
    image_ids: list[Hashable]
    tokenizer: str

    def to_markdown(self) -> str:
        """A Markdown table (metric, score, score x 100 as papers report); unavailable metrics with the reason."""
        lines = ["| metric | score | x100 |", "|---|---:|---:|"]
        for name in METRIC_NAMES:
            if name in self.scores:
                lines.append(f"| {name} | {self.scores[name]:.4f} | {100 * self.scores[name]:.1f} |")
            elif name in self.unavailable:
                lines.append(f"| {name} | n/a | n/a |")
        lines += [f"\n{name} unavailable: {reason}" for name, reason in self.unavailable.items()]
        return "\n".join(lines)

    def to_json(self, per_image: bool = False) -> dict[str, Any]:
        """JSON-ready dict: ``metrics``, ``unavailable``, ``num_images``, ``tokenizer`` (and ``per_image``)."""
        out: dict[str, Any] = {
            "metrics": dict(self.scores),
            "unavailable": dict(self.unavailable),
            "num_images": len(self.image_ids),
            "tokenizer": self.tokenizer,
        }
        if per_image:
            out["per_image"] = [
                {"image_id": i, **{m: float(v[k]) for m, v in self.per_image.items()}}
                for k, i in enumerate(self.image_ids)
            ]
        return out


def evaluate_captions(
    refs: Refs,
    cands: Cands,
    metrics: Sequence[str] = DEFAULT_METRICS,
    tokenizer: str = "auto",
) -> CaptionEvaluation:
    """Tokenises raw captions as the COCO evaluation does and computes ``metrics`` on the candidates' images.

    Args:
      refs: raw reference captions per image id (images without a candidate are ignored, as in COCO
        evaluation with ``params['image_id'] = cocoRes.getImgIds()``).
      cands: one raw candidate caption per image id.
      metrics: names from ``METRIC_NAMES``.
      tokenizer: "auto", "java", "python" (see :mod:`vlpeft_jax.eval.tokenize`) or "none" (captions are
        already tokenised).

    Raises:
      InputError: candidates without references, non-string or empty candidates (naming the ids), or an
        unknown metric name.

    Example:
        >>> result = evaluate_captions({1: ["A cat."]}, {1: "a cat"}, metrics=["BLEU-1"], tokenizer="python")
        >>> round(result.scores["BLEU-1"], 6)
        1.0
    """
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        raise InputError(f"unknown metrics {unknown}; valid: {', '.join(METRIC_NAMES)}")
    ids, cand_strings = check_captions(refs, cands, allow_empty=False)
    if tokenizer == "none":
        backend = "none"
        gts = {i: list(refs[i]) for i in ids}
        res = dict(zip(ids, cand_strings, strict=True))
    else:
        backend = tok.resolve_backend(tokenizer)  # type: ignore[arg-type]
        # One tokenizer run (one JVM start) for references and candidates together.
        keyed = {("ref", i): refs[i] for i in ids} | {("cand", i): [c] for i, c in zip(ids, cand_strings, strict=True)}
        both = tok.ptb_tokenize(keyed, backend=backend)
        gts = {i: both[("ref", i)] for i in ids}
        res = {i: both[("cand", i)][0] for i in ids}

    scores: dict[str, float] = {}
    per_image: dict[str, np.ndarray] = {}
    unavailable: dict[str, str] = {}
    wanted = set(metrics)
    table = ngram_table(gts, res, 4) if wanted & {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr-D", "CIDEr"} else None
    if wanted & {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"}:
        corpus, each = bleu(gts, res, 4, table=table)
        for n in range(4):
            scores[f"BLEU-{n + 1}"], per_image[f"BLEU-{n + 1}"] = float(corpus[n]), each[:, n]
    for name, fn in (("METEOR", meteor), ("ROUGE-L", rouge_l), ("SPICE", spice)):
        if name not in wanted:
            continue
        try:
            scores[name], per_image[name] = fn(gts, res)
        except MetricUnavailable as e:
            unavailable[name] = str(e)
    if "CIDEr-D" in wanted:
        scores["CIDEr-D"], per_image["CIDEr-D"] = cider_d(gts, res, table=table)
    if "CIDEr" in wanted:
        scores["CIDEr"], per_image["CIDEr"] = cider(gts, res, table=table)
    keep = [m for m in METRIC_NAMES if m in scores and m in wanted]
    return CaptionEvaluation(
        scores={m: scores[m] for m in keep},
        per_image={m: per_image[m] for m in keep},
        unavailable=unavailable,
        image_ids=ids,
        tokenizer=backend,
    )


# ---------------------------------------------------------------------------------------------------------
# COCO-format files
# ---------------------------------------------------------------------------------------------------------


def coco_references(annotations: Mapping[str, Any], source: str = "annotations") -> dict[Hashable, list[str]]:
    """``{image_id: [caption, ...]}`` from a COCO caption annotation dict (``images`` + ``annotations``).

    Raises:
      InputError: missing keys, non-string captions, duplicate image or annotation ids (naming them).

    Example:
        >>> coco_references({"images": [{"id": 1}], "annotations": [{"id": 5, "image_id": 1, "caption": "a cat"}]})
        {1: ['a cat']}
    """
    if not isinstance(annotations, Mapping) or "annotations" not in annotations:
        raise InputError(f"{source}: expected a COCO caption file with an 'annotations' list (and 'images')")
    refs: dict[Hashable, list[str]] = {}
    images = annotations.get("images")
    if images is not None:
        image_ids = [img.get("id") if isinstance(img, Mapping) else None for img in images]
        if any(i is None for i in image_ids):
            raise InputError(f"{source}: every entry of 'images' needs an 'id'")
        dup = _duplicates(image_ids)
        if dup:
            raise InputError(f"{source}: duplicate image ids in 'images': {_ids_text(dup)}")
        refs = {i: [] for i in image_ids}
    ann_ids, bad_type, bad_entry, unknown_image = [], [], [], []
    for k, ann in enumerate(annotations["annotations"]):
        if not isinstance(ann, Mapping) or "image_id" not in ann or "caption" not in ann:
            bad_entry.append(k)
            continue
        if "id" in ann:
            ann_ids.append(ann["id"])
        if not isinstance(ann["caption"], str):
            bad_type.append(ann["image_id"])
            continue
        if images is not None and ann["image_id"] not in refs:
            unknown_image.append(ann["image_id"])
            continue
        refs.setdefault(ann["image_id"], []).append(ann["caption"])
    if bad_entry:
        raise InputError(f"{source}: annotations need 'image_id' and 'caption'; bad entries at {_ids_text(bad_entry)}")
    if bad_type:
        raise InputError(f"{source}: non-string captions for image ids {_ids_text(bad_type)}")
    if unknown_image:
        raise InputError(f"{source}: annotations for image ids not in 'images': {_ids_text(unknown_image)}")
    dup = _duplicates(ann_ids)
    if dup:
        raise InputError(f"{source}: duplicate annotation ids: {_ids_text(dup)}")
    return refs


def coco_results(results: Any, source: str = "results") -> dict[Hashable, str]:
    """``{image_id: caption}`` from a COCO results list ``[{"image_id", "caption"}, ...]``.

    Raises:
      InputError: not a list of such dicts, non-string captions or duplicate image ids (naming them).

    Example:
        >>> coco_results([{"image_id": 1, "caption": "a cat"}])
        {1: 'a cat'}
    """
    if not isinstance(results, list):
        raise InputError(f"{source}: expected a list of {{'image_id', 'caption'}} objects")
    bad_entry = [
        k for k, r in enumerate(results) if not isinstance(r, Mapping) or "image_id" not in r or "caption" not in r
    ]
    if bad_entry:
        raise InputError(f"{source}: entries need 'image_id' and 'caption'; bad entries at {_ids_text(bad_entry)}")
    ids = [r["image_id"] for r in results]
    dup = _duplicates(ids)
    if dup:
        raise InputError(f"{source}: duplicate image ids (one caption per image): {_ids_text(dup)}")
    bad_type = [r["image_id"] for r in results if not isinstance(r["caption"], str)]
    if bad_type:
        raise InputError(f"{source}: non-string captions for image ids {_ids_text(bad_type)}")
    return {r["image_id"]: r["caption"] for r in results}


def _duplicates(ids: Sequence[Any]) -> list[Any]:
    seen: set[Any] = set()
    dup: list[Any] = []
    for i in ids:
        key = json.dumps(i, sort_keys=True) if not isinstance(i, Hashable) else i
        if key in seen and i not in dup:
            dup.append(i)
        seen.add(key)
    return dup

