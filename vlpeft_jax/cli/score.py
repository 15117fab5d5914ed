"""``run.py score --refs ANNOTATIONS.json --results RESULTS.json [--out METRICS.json]``.

Scores a COCO-format results file (``[{"image_id": ..., "caption": ...}, ...]``) against COCO-format caption
annotations (``{"images": [...], "annotations": [{"image_id", "caption", ...}]}``) as pycocoevalcap's
``COCOEvalCap`` does with ``params['image_id'] = cocoRes.getImgIds()``: PTB tokenisation, then BLEU-1..4,
METEOR, ROUGE-L, CIDEr-D (and plain CIDEr) and SPICE on the images that have a result. Prints a Markdown
table; metrics that cannot run here (SPICE without Stanford CoreNLP, METEOR without Java) are listed with
the reason. Bad input (a result for an image without references, empty or non-string captions, duplicate
ids) fails with a message naming the ids.

Example::

    python run.py score --refs captions_val2014.json --results results.json --out metrics.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vlpeft_jax.errors import InputError
from vlpeft_jax.eval import captions


def _load_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(f"{what} file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{what} file {path} is not valid JSON: {e}") from None


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
    args = parser.parse_args(argv)

    refs = captions.coco_references(_load_json(args.refs, "annotations"), source=str(args.refs))
    results = captions.coco_results(_load_json(args.results, "results"), source=str(args.results))
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
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(out, indent=2))
        tmp.replace(args.out)
        print(f"wrote {args.out}")
    return 0
