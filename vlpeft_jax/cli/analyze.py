"""``run.py analyze knockout|lens|modules|rank ...``: information-flow and representation analyses of a trained
model (the analysis toolshed, :mod:`vlpeft_jax.analysis`).

- ``knockout``, ``lens``, ``modules``: attention knockout (thesis ch. 7, Eq. 7.7), logit lens (Eq. 7.8) and
  module knockout with the top-k Jaccard (App. E.4) on a run directory or a checkpoint folder;
  ``run.py analyze knockout --help`` lists the options (:mod:`vlpeft_jax.experiments.analyze`).
- ``rank``: the effective rank of last-layer text and image features over runs (seed 002 §2.3, Table 1);
  ``run.py analyze rank --help`` (:mod:`vlpeft_jax.experiments.rank_runs`).
"""

from __future__ import annotations

from vlpeft_jax.errors import ConfigError

KINDS = ("knockout", "lens", "modules", "rank")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    kind = argv[0]
    if kind not in KINDS:
        raise ConfigError(f"analyze {kind!r}: valid analyses are {', '.join(KINDS)}")
    if kind == "rank":
        from vlpeft_jax.experiments import rank_runs

        return int(rank_runs.main(argv[1:]) or 0)
    from vlpeft_jax.experiments import analyze

    return int(analyze.main(argv) or 0)
