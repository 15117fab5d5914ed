"""The shapes-world VQA model the information-flow analysis studies (thesis ch. 7; ``run.py analyze``).

The recipe of ``configs/shapes_vqa_pretrain.py`` (two stages from a random initialisation: ``align`` trains the
Mapping Layer and the decoder over a frozen random vision tower, then ``pretrain`` trains everything), with two
changes for the analysis: the decoder has 6 layers instead of 3, so the knockout curves over the centre layer
have some length (the thesis' LLaVA-1.5-13b has 40), and the model answers **every** question type of the
world (colour, shape, count, position, relation, existence), so that curves per question type exist, as the
thesis' per-task panels (Figs. 7.3-7.5).

``python run.py train --config configs/shapes_knockout.py`` trains and evaluates it (about ten minutes on 2 CPU
cores); ``python run.py analyze knockout --run RUN_DIR`` then runs the thesis' knockout experiments on it.
``:smoke`` is seconds long (tests); ``align=N`` and ``pretrain=N`` set the two stages' steps (default 2000 and 1000,
as the VQA base).

Example:
    >>> from vlpeft_jax.config import load_config_file
    >>> c = load_config_file("configs/shapes_knockout.py")
    >>> c.model.decoder.num_hidden_layers, c.train.question_types
    (6, [])
"""

import ml_collections

from configs import common


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    _, opts = common.parse_variant(variant, "configs/shapes_knockout.py", (),
                                   {"smoke": False, "align": 2000, "pretrain": 1000})
    c = common.load("shapes_vqa_pretrain.py")
    c.name = "shapes_knockout"
    c.stages[0]["steps"], c.stages[1]["steps"] = int(opts["align"]), int(opts["pretrain"])
    c.model.decoder.num_hidden_layers = 6
    c.train.question_types = []  # every question type
    if opts["smoke"]:
        common.shrink_for_smoke(c)
    return c
