"""``run.py bench metrics``: our BLEU, ROUGE-L and CIDEr-D vs pycocoevalcap's, side by side in one process.

On a seeded synthetic caption set (default 5000 images x 5 references, already tokenised, so only the
metrics are timed) it times each metric of ours and of pycocoevalcap (best of ``--repeats`` alternating rounds), checks
that the scores agree, prints a Markdown table with the ratios (pycocoevalcap time / ours: > 1 means
ours is faster) and returns the numbers.

Example:
    >>> import contextlib, io
    >>> with contextlib.redirect_stdout(io.StringIO()) as table:  # a busy machine adds a warning line first
    ...     result = run(["--images", "50", "--repeats", "1"])
    >>> "| metric | pycocoevalcap (s) | ours (s) | speed-up | max abs diff |" in table.getvalue()
    True
    >>> result["max_abs_diff"] < 1e-9
    True
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from vlpeft_jax.benchmarks import timing
from vlpeft_jax.eval import captions

_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "so", "vi", "de", "po", "an", "el", "or", "us", "im")


def synthetic_captions(
    num_images: int, refs_per_image: int = 5, seed: int = 0, vocab_size: int = 2000
) -> tuple[dict[int, list[str]], dict[int, str]]:
    """A seeded, already tokenised caption set with COCO-like statistics.

    Words follow a Zipf law over ``vocab_size`` pseudo-words; every image has a "scene" (a base
    caption of 6-16 words); its references and its candidate are edits of the scene (substitutions,
    deletions, insertions, repeats), so n-gram overlaps, repeated n-grams and length differences look
    like real captioning output. Every 50th candidate is much longer than its references.

    Example:
        >>> refs, cands = synthetic_captions(3, 2, seed=1)
        >>> len(refs), len(refs[0]), isinstance(cands[0], str)
        (3, 2, True)
    """
    rng = np.random.default_rng(seed)
    words = np.array([_pseudo_word(i) for i in range(vocab_size)])
    zipf = 1.0 / np.arange(1, vocab_size + 1) ** 1.1
    zipf /= zipf.sum()

    def edit(scene: np.ndarray) -> str:
        out: list[str] = []
        for w in scene:
            r = rng.random()
            if r < 0.15:
                continue  # deletion
            out.append(words[rng.choice(vocab_size, p=zipf)] if r < 0.35 else w)  # substitution or copy
            if rng.random() < 0.08:
                out.append(words[rng.choice(vocab_size, p=zipf)])  # insertion
            if rng.random() < 0.03:
                out.append(out[-1])  # repeat
        return " ".join(out or [str(scene[0])])

    refs: dict[int, list[str]] = {}
    cands: dict[int, str] = {}
    for image in range(num_images):
        scene = words[rng.choice(vocab_size, size=int(rng.integers(6, 17)), p=zipf)]
        refs[image] = [edit(scene) for _ in range(refs_per_image)]
        cands[image] = edit(scene) if image % 50 else " ".join([edit(scene)] * 4)
    return refs, cands


def _pseudo_word(i: int) -> str:
    parts = []
    while True:
        parts.append(_SYLLABLES[i % len(_SYLLABLES)])
        i //= len(_SYLLABLES)
        if i == 0:
            return "".join(parts)


def _best_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def run(argv: list[str]) -> dict:
    """Runs the benchmark; prints a table and returns ``{"config", "rows", "max_abs_diff"}``."""
    parser = argparse.ArgumentParser(prog="run.py bench metrics", description=__doc__)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--refs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per metric")
    args = parser.parse_args(argv)

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    refs, cands = synthetic_captions(args.images, args.refs, args.seed)
    gts = {i: list(r) for i, r in refs.items()}
    res = {i: [c] for i, c in cands.items()}

    def coco_bleu() -> tuple[np.ndarray, np.ndarray]:
        score, scores = Bleu(4).compute_score(gts, res, verbose=0)
        return np.asarray(score), np.asarray(scores).T

    def coco_rouge() -> tuple[float, np.ndarray]:
        return Rouge().compute_score(gts, res)

    def coco_cider() -> tuple[float, np.ndarray]:
        return Cider().compute_score(gts, res)

    def ours_all() -> tuple:
        table = captions.ngram_table(refs, cands, 4)
        return captions.bleu(refs, cands, table=table), captions.rouge_l(refs, cands), captions.cider_d(
            refs, cands, table=table
        )

    benchmarks = [
        ("BLEU-1..4", coco_bleu, lambda: captions.bleu(refs, cands)),
        ("ROUGE-L", coco_rouge, lambda: captions.rouge_l(refs, cands)),
        ("CIDEr-D", coco_cider, lambda: captions.cider_d(refs, cands)),
    ]
    rows = []
    max_abs_diff = 0.0
    total_ref = total_ours = 0.0
    machine = timing.Monitor().start()
    for name, ref_fn, our_fn in benchmarks:
        # alternating rounds (the order swapped every round), the best time of each side
        times, out = timing.alternate({"ref": ref_fn, "ours": our_fn}, rounds=args.repeats, warmup=0)
        t_ref, (ref_corpus, ref_each) = min(times["ref"]), out["ref"]
        t_ours, (our_corpus, our_each) = min(times["ours"]), out["ours"]
        diff = max(
            float(np.max(np.abs(np.asarray(ref_corpus) - np.asarray(our_corpus)))),
            float(np.max(np.abs(np.asarray(ref_each) - np.asarray(our_each)))),
        )
        max_abs_diff = max(max_abs_diff, diff)
        total_ref += t_ref
        total_ours += t_ours
        rows.append({"metric": name, "pycocoevalcap_s": t_ref, "ours_s": t_ours, "speedup": t_ref / t_ours,
                     "max_abs_diff": diff})
    t_shared, _ = _best_time(ours_all, args.repeats)
    rows.append({"metric": "all three (shared n-gram table)", "pycocoevalcap_s": total_ref, "ours_s": t_shared,
                 "speedup": total_ref / t_shared, "max_abs_diff": max_abs_diff})

    machine.stop()
    print(f"caption metrics on {args.images} images x {args.refs} refs (seed {args.seed}, best of {args.repeats} "
          "alternating rounds)")
    print("| metric | pycocoevalcap (s) | ours (s) | speed-up | max abs diff |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['metric']} | {r['pycocoevalcap_s']:.3f} | {r['ours_s']:.3f} | {r['speedup']:.1f}x "
              f"| {r['max_abs_diff']:.1e} |")
    print(timing.describe(machine))
    return {
        "config": {"images": args.images, "refs": args.refs, "seed": args.seed, "repeats": args.repeats},
        "rows": rows,
        "max_abs_diff": max_abs_diff,
        "machine": machine.record(),
        "threads": timing.thread_settings(),
    }
