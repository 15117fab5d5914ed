"""Seed 002's comparisons on the shapes world: which runs of ``configs/shapes_ptpeft.py`` make each table.

``SWEEPS`` maps a table to the variants whose results fill it; every entry is a runnable config on its own
(``python run.py train --config configs/shapes_compare_002.py:VARIANT`` is the same as
``configs/shapes_ptpeft.py:VARIANT``). Runs that differ only in ``eval=...`` train identically (same seed and
stages) and differ in how the trained prefix is replaced at evaluation, so a sweep driver may train once and
evaluate several times. Seed 002 reports mean ± std over three seeds for Tables 3-4: run each entry with
``--config.seed=0,1,2``.

- ``table2``: PEFT alone vs PT-PEFT (prefix → X) vs the reverse order (X → prefix), X in {LoRA, S-Adapter,
  P-Adapter}, plus prefix tuning and full fine-tuning alone and prefix → full fine-tuning (Table 3).
- ``table5``: sequential (prefix → full) vs parallel (both at once), each evaluated with the learned prefix,
  without it, and with noise in its place.
- ``table6``: stage lengths at a fixed budget of 400 updates (prefix / fine-tuning 120/280, 200/200, 280/120).
- ``table9``: 1 to 4 alternations of 100 prefix updates and 100 fine-tuning updates.

Example:
    >>> [v for v in SWEEPS["table6"]]
    ['full,pt=120,ft=280', 'full,pt=200,ft=200', 'full,pt=280,ft=120']
"""

import ml_collections

from configs import common

ADAPTED = ("lora", "s_adapter", "p_adapter")

SWEEPS: dict[str, list[str]] = {
    "table2": ["prefix", *(f"only_{x}" for x in ADAPTED), *ADAPTED, *(f"reverse_{x}" for x in ADAPTED),
               "only_full", "full"],
    "table5": [f"{mode}{ev}" for mode in ("full", "parallel") for ev in ("", ",eval=remove", ",eval=noise")],
    "table6": [f"full,pt={pt},ft={400 - pt}" for pt in (120, 200, 280)],
    "table9": [f"alternate,rounds={n},pt={100 * n},ft={100 * n}" for n in (1, 2, 3, 4)],
    # Table 1 (effective rank, ``run.py analyze rank``): each method alone, then PT → X
    "table1": ["only_full", "prefix", "only_s_adapter", "only_p_adapter", "only_lora", "s_adapter", "p_adapter",
               "lora", "full"],
}


def get_config(variant: str = "lora") -> ml_collections.ConfigDict:
    return common.load("shapes_ptpeft.py", variant)
