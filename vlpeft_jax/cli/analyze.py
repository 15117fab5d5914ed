"""``run.py analyze knockout|lens|modules|rank|mcnemar ...``: information-flow and representation analyses of a trained
model (the analysis toolshed, :mod:`vlpeft_jax.analysis`).

- ``knockout``, ``lens``, ``modules``: attention knockout (thesis ch. 7, Eq. 7.7), logit lens (Eq. 7.8) and
  module knockout with the top-k Jaccard (App. E.4) on a run directory or a checkpoint folder;
  ``run.py analyze knockout --help`` lists the options (:mod:`vlpeft_jax.experiments.analyze`).
- ``rank``: the effective rank of last-layer text and image features over runs (seed 002 §2.3, Table 1);
  ``run.py analyze rank --help`` (:mod:`vlpeft_jax.experiments.rank_runs`).
- ``mcnemar RUN_A RUN_B``: McNemar's test (seed 004 App. A.8; exact below 25 discordant pairs, else
  chi-square) between two finished runs evaluated on the same expressions (their per-example correctness in
  ``results.json``), e.g. CK-T against CK-T-nf on the conventional split (Table 3.3 / App. Table 2); ``--json``
  prints the numbers as JSON.
"""

from __future__ import annotations

from vlpeft_jax.errors import ConfigError

KINDS = ("knockout", "lens", "modules", "rank", "mcnemar")


def mcnemar_main(argv: list[str]) -> int:
    """``run.py analyze mcnemar RUN_A RUN_B [--result adapted] [--json]``."""
    import argparse
    import json

    from vlpeft_jax.tasks.refexp import compare_runs

    parser = argparse.ArgumentParser(prog="run.py analyze mcnemar", description=__doc__.split("- ``mcnemar")[1])
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument("--result", default="adapted", help="which evaluation of results.json (default: adapted)")
    parser.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    args = parser.parse_args(argv)
    out = compare_runs(args.run_a, args.run_b, args.result)
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        print(f"A = {args.run_a}: accuracy {100 * out['accuracy_a']:.1f} %\n"
              f"B = {args.run_b}: accuracy {100 * out['accuracy_b']:.1f} %\n"
              f"{out['n']} paired examples; only A right {out['b']}, only B right {out['c']}; "
              f"McNemar's test ({out['method']}) two-sided p = {out['p']:.3g}")
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    kind = argv[0]
    if kind not in KINDS:
        raise ConfigError(f"analyze {kind!r}: valid analyses are {', '.join(KINDS)}")
    if kind == "mcnemar":
        return mcnemar_main(argv[1:])
    if kind == "rank":
        from vlpeft_jax.experiments import rank_runs

        return int(rank_runs.main(argv[1:]) or 0)
    from vlpeft_jax.experiments import analyze

    return int(analyze.main(argv) or 0)
