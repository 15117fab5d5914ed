"""``run.py score --refs ANNOTATIONS.json --results RESULTS.json [--out METRICS.json]``.

Scores a COCO-format results file (``[{"image_id": ..., "caption": ...}, ...]``) against COCO-format caption
annotations (``{"images": [...], "annotations": [{"image_id", "caption", ...}]}``) as pycocoevalcap's
``COCOEvalCap`` does with ``params['image_id'] = cocoRes.getImgIds()``: PTB tokenisation, then BLEU-1..4,
METEOR, ROUGE-L, CIDEr-D (and plain CIDEr) and SPICE on the images that have a result. Prints a Markdown
table; metrics that cannot run here (SPICE without Stanford CoreNLP, METEOR without Java) are listed with
the reason. Bad input (a result for an image without references, empty or non-string captions, duplicate
ids, a caption longer than ``--max-caption-words``) fails with a message naming the ids.

Caption length cap: METEOR's jar (and the PTB tokenizer) take minutes on a pathological caption (a
1,000,000-word one hangs METEOR for over 5 minutes), so every result and reference caption is checked first:
one over ``--max-caption-words`` (default 1000 whitespace-separated words, far above any real caption) is an
error naming the file, the image ids and the cap. Raise the cap to score such captions anyway.
``--out`` is checked (not a directory, its folder writable) before any metric is computed; the file is written
atomically.

Example::

    python run.py score --refs captions_val2014.json --results results.json --out metrics.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from vlpeft_jax import files
from vlpeft_jax.errors import ConfigError, InputError
from vlpeft_jax.eval import captions

MAX_CAPTION_WORDS = 1000


def _load_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(f"{what} file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{what} file {path} is not valid JSON: {e}") from None


def check_caption_lengths(captions_by_id: dict[Any, Any], cap: int, source: str) -> None:
    """Raises :class:`InputError` naming the image ids whose caption has more than ``cap`` words."""
    too_long = {}
    for image_id, caps in captions_by_id.items():
        for caption in [caps] if isinstance(caps, str) else caps:
            words = len(caption.split()) if isinstance(caption, str) else 0
            if words > cap:
                too_long[image_id] = max(words, too_long.get(image_id, 0))
    if too_long:
        worst = sorted(too_long, key=lambda i: -too_long[i])
        listed = ", ".join(f"{i!r} ({too_long[i]} words)" for i in worst[:10])
        more = f" and {len(worst) - 10} more" if len(worst) > 10 else ""
        raise InputError(f"{source}: captions over the length cap of {cap} words for image id(s) {listed}{more}; "
                         "shorten them, or raise the cap with --max-caption-words")


def check_output_file(path: Path, name: str, example: str = "metrics.json") -> None:
    """Raises :class:`ConfigError` if ``path`` cannot be written as a file (a directory, or an unwritable
    or impossible folder), before any work."""
    if path.is_dir():
        raise ConfigError(f"{name}: {path} is a directory; give a file name (e.g. {path / example})")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"{name}: {path} cannot be created ({folder} is a file, not a directory)")
    files.check_writable_dir(path.parent, name)
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{name}: {path} exists and is not writable")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="run.py score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--refs", type=Path, required=True, help="COCO caption annotations JSON")
    parser.add_argument("--results", type=Path, required=True, help="COCO results JSON [{image_id, caption}]")
    parser.add_argument("--out", type=Path, default=None, help="write metrics JSON here")
    parser.add_argument("--metrics", default=",".join(captions.DEFAULT_METRICS),
                        help=f"comma-separated subset of {','.join(captions.METRIC_NAMES)}")
    parser.add_argument("--tokenizer", choices=("auto", "java", "python", "none"), default="auto",
                        help="PTB tokenizer backend (auto: Java when available); none = already tokenised")
    parser.add_argument("--per-image", action="store_true", help="also write per-image scores to --out")
    parser.add_argument("--max-caption-words", type=int, default=MAX_CAPTION_WORDS,
                        help=f"refuse captions longer than this many words (default {MAX_CAPTION_WORDS}; METEOR "
                             "takes minutes on pathological lengths)")
    args = parser.parse_args(argv)
    if args.max_caption_words < 1:
        raise ConfigError(f"--max-caption-words {args.max_caption_words}: must be >= 1")
    if args.out is not None:
        check_output_file(args.out, "--out")

    refs = captions.coco_references(_load_json(args.refs, "annotations"), source=str(args.refs))
    results = captions.coco_results(_load_json(args.results, "results"), source=str(args.results))
    check_caption_lengths(results, args.max_caption_words, str(args.results))
    check_caption_lengths(refs, args.max_caption_words, str(args.refs))
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    evaluation = captions.evaluate_captions(refs, results, metrics=metrics, tokenizer=args.tokenizer)

    annotated = sum(1 for caps in refs.values() if caps)
    print(f"scored {len(evaluation.image_ids)} images ({annotated} annotated) from {args.results} "
          f"(tokenizer: {evaluation.tokenizer})")
    if len(evaluation.image_ids) < annotated:
        print(f"note: {annotated - len(evaluation.image_ids)} annotated images have no result and are not scored",
              file=sys.stderr)
    print(evaluation.to_markdown())
    if args.out is not None:
        out = evaluation.to_json(per_image=args.per_image)
        out.update({"refs": str(args.refs), "results": str(args.results), "num_annotated_images": annotated})
        files.write_text(args.out, json.dumps(out, indent=2))
        print(f"wrote {args.out}")
    return 0
