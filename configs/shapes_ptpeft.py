"""PT-PEFT on the shapes world (seed 002: prefix tuning first, then LoRA / adapters / full fine-tuning).

Adapts the source-pretrained shapes VLM (``configs/shapes_pretrain.py``) to the target caption style.
``python run.py train --config configs/shapes_ptpeft.py:VARIANT`` where VARIANT is a mode followed by
comma-separated options. ``X`` is one of ``lora``, ``s_adapter``, ``p_adapter``, ``full``.

Modes (stages are data: each mode is only a different list of stages):

- ``X``: PT-PEFT, prefix tuning then X with the prefix still active (Table 2 / 3 rows "Prefix → X");
- ``reverse`` / ``reverse_X``: X then prefix tuning, X still active (Table 2 "X → Prefix"; default X: lora);
- ``parallel`` / ``parallel_X``: prefix and X trained together in one stage (Table 5b; default X: full);
- ``alternate`` / ``alternate_X``: ``rounds`` alternations of a prefix stage and an X stage (Table 9;
  default X: full);
- ``prefix``, ``only_X``: one method alone (Table 2's PEFT rows).

Options: ``smoke`` (a seconds-long run); ``train_prefix`` (the prefix keeps training in the stages after its
own; default frozen, so each stage trains one thing as in the paper's sequential tuning); ``pt=N`` and
``ft=N`` (optimizer steps of the prefix stage and of the X stage; Table 6's stage-length ablation is
``pt=120,ft=280`` / ``pt=200,ft=200`` / ``pt=280,ft=120``); ``rounds=N`` (alternation rounds; the steps are
split evenly); ``eval=keep|remove|zeros|noise`` (what replaces the trained prefix at evaluation, Table 5's
"-Prefix" and "-Prefix +Noise").

Settings follow the seed where it gives them: LoRA r=16, α=32, dropout 0.05 on Q, K, V (App. B.5); a
prefix of 8 tokens through the prefix encoder with the prefix-type embedding (Table 8, App. B); full
fine-tuning keeps the word embeddings (= the tied LM head here) frozen (App. B.5, PT-PEFT). Every run has
the same total budget (400 updates by default), as Table 6 compares.

Example:
    >>> from vlpeft_jax.config import load_config_file
    >>> cfg = load_config_file("configs/shapes_ptpeft.py:lora,pt=300,ft=100")
    >>> [(s["name"], s["steps"], s["methods"]) for s in cfg.stages]
    [('prefix', 300, ['prefix']), ('lora', 100, ['prefix', 'lora'])]
"""

import ml_collections

from configs import common
from vlpeft_jax.errors import ConfigError
from vlpeft_jax.train import presets

SECOND = ("lora", "s_adapter", "p_adapter", "full")
EVAL_REPLACEMENTS = ("keep", "remove", "zeros", "noise")
LM = "language_model/model/layers_\\d+"


def method_settings(x: str, smoke: bool) -> dict:
    """``config.peft`` entries of the second-stage method ``x`` (none for full fine-tuning)."""
    bottleneck = 8 if smoke else None
    if x == "lora":
        return {"lora": dict(method="lora", targets=[f"{LM}/self_attn/(?:q_proj|k_proj|v_proj)"], rank=16,
                             alpha=32.0, dropout=0.05)}
    if x == "s_adapter":  # Houlsby's positions: after the attention output and after the feed-forward
        return {"s_adapter": dict(method="adapter", placement="sequential",
                                  targets=[f"{LM}/(?:self_attn/o_proj|mlp/down_proj)"],
                                  bottleneck_size=bottleneck or 32)}
    if x == "p_adapter":  # He et al.: beside the feed-forward block
        return {"p_adapter": dict(method="adapter", placement="parallel", targets=[f"{LM}/mlp"],
                                  bottleneck_size=bottleneck or 64)}
    return {}


def method_rules(x: str) -> list:
    """The trainable rules of the second-stage method ``x``."""
    if x == "full":  # seed 002 App. B.5: word embeddings and head frozen throughout
        return [["base/language_model/model/embed_tokens/.*", "frozen"], *presets.full_finetuning()]
    return presets.method(x)


def _parse(variant: str) -> tuple[str, str, dict]:
    mode, *options = [v.strip() for v in (variant or "lora").split(",") if v.strip()]
    valid = (f"{', '.join(SECOND)}, prefix, only_X, reverse[_X], parallel[_X], alternate[_X] (X in "
             f"{', '.join(SECOND)}), then options smoke, train_prefix, pt=N, ft=N, rounds=N, eval=MODE")
    kind, x = mode, None
    for prefix, default in (("reverse", "lora"), ("parallel", "full"), ("alternate", "full"), ("only", None)):
        if mode == prefix or mode.startswith(prefix + "_"):
            kind, x = prefix, mode[len(prefix) + 1:] or default
    if kind in SECOND:
        kind, x = "sequential", mode
    if kind not in ("sequential", "reverse", "parallel", "alternate", "only", "prefix") or (
            kind != "prefix" and x not in SECOND):
        raise ConfigError(f"configs/shapes_ptpeft.py:{variant}: unknown mode {mode!r}; valid: {valid}")
    opts = {"smoke": False, "train_prefix": False, "pt": 200, "ft": 200, "rounds": 4, "eval": "keep"}
    for o in options:
        key, _, value = o.partition("=")
        if key in ("smoke", "train_prefix") and not value:
            opts[key] = True
        elif key in ("pt", "ft", "rounds") and value.isdigit() and int(value) > 0:
            opts[key] = int(value)
        elif key == "eval" and value in EVAL_REPLACEMENTS:
            opts[key] = value
        else:
            raise ConfigError(f"configs/shapes_ptpeft.py:{variant}: bad option {o!r}; valid: {valid}")
    return kind, x or "", opts


def get_config(variant: str = "lora") -> ml_collections.ConfigDict:
    kind, x, opts = _parse(variant)
    smoke = opts["smoke"]
    c = common.load("shapes_pretrain.py", "smoke" if smoke else None)
    c.name = "shapes_ptpeft_" + "_".join(v.strip().replace("=", "") for v in (variant or "lora").split(",")
                                         if v.strip() and v.strip() != "smoke")
    c.pretrain.config = common.path("shapes_pretrain.py", smoke)
    dec = c.model.decoder
    prefix = dict(method="prefix", num_virtual_tokens=8, num_kv_heads=dec.num_key_value_heads,
                  targets=[f"{LM}/self_attn"], projection=True, type_embedding=True,
                  eval_replacement=opts["eval"])
    c.peft = {**({} if kind == "only" else {"prefix": prefix}), **(method_settings(x, smoke) if x else {})}

    pt_opt = common.adamw(3e-3)
    x_opt = dict(pt_opt, learning_rate=5e-4, weight_decay=0.01) if x == "full" else dict(pt_opt)
    x_methods = [x] if x in c.peft else []
    total = opts["pt"] + opts["ft"]

    def prefix_stage(name: str, steps: int, active: list) -> dict:
        return dict(name=name, steps=steps, trainable=presets.method("prefix"), optimizer=dict(pt_opt),
                    methods=[*active, "prefix"])

    def x_stage(name: str, steps: int, with_prefix: bool) -> dict:
        rules = method_rules(x) + (presets.method("prefix") if with_prefix and opts["train_prefix"] else [])
        return dict(name=name, steps=steps, trainable=rules, optimizer=dict(x_opt),
                    methods=(["prefix"] if with_prefix else []) + x_methods)

    if kind == "prefix":
        c.stages = [prefix_stage("prefix", total, [])]
    elif kind == "only":
        c.stages = [x_stage(x, total, with_prefix=False)]
    elif kind == "sequential":
        c.stages = [prefix_stage("prefix", opts["pt"], []), x_stage(x, opts["ft"], with_prefix=True)]
    elif kind == "reverse":  # the prefix stage comes second, with X active and frozen
        c.stages = [x_stage(x, opts["ft"], with_prefix=False), prefix_stage("prefix", opts["pt"], x_methods)]
    elif kind == "parallel":
        prefix_group = {k: v for k, v in pt_opt.items() if k != "clip_norm"}  # clipping is per stage
        both = dict(x_opt, groups={"prefix": prefix_group})
        c.stages = [dict(name="parallel", steps=total, trainable=presets.method("prefix") + method_rules(x),
                         optimizer=both, methods=["prefix", *x_methods])]
    else:  # alternate: prefix_1, X_1, prefix_2, X_2, ...
        n = opts["rounds"]
        if opts["pt"] < n or opts["ft"] < n:
            raise ConfigError(f"configs/shapes_ptpeft.py:{variant}: pt and ft must be >= rounds ({n})")
        c.stages = []
        for r in range(1, n + 1):
            active = x_methods if r > 1 else []
            c.stages.append(prefix_stage(f"prefix_{r}", opts["pt"] // n, active))
            c.stages.append(x_stage(f"{x}_{r}", opts["ft"] // n, with_prefix=True))
    c.stages = [dict(s, trainable=[list(rule) for rule in s["trainable"]]) for s in c.stages]
    c.train.domain = "target"
    c.train.max_length = 40
    c.eval.zero_shot = False
    if smoke:
        common.shrink_for_smoke(c)
    return c
