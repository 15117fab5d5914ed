"""peft ``IA3`` adapters (:class:`~vlpeft_jax.peft.ia3.IA3`).

One ``ia3_l`` tensor per adapted module: ``(out, 1)`` for output scaling (our ``output_scale``), ``(1, in)``
for the feed-forward modules scaled at their input (our ``input_scale``, peft's ``feedforward_modules``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlpeft_jax.hf.peft_io import (
    BaseModelInfo,
    PeftFormat,
    UnsupportedAdapterError,
    adapted_modules,
    check_shape,
    find_kernel,
    group_module_state,
    module_path,
)
from vlpeft_jax.peft import base as pb
from vlpeft_jax.peft.ia3 import IA3


def ia3_to_peft_state(ia3: IA3, peft_params: pb.Params, info: BaseModelInfo, prefix: Sequence[str] = ()
                      ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """peft's IA3 config fields and ``ia3_l`` tensors (``(out, 1)``, or ``(1, in)`` for feed-forward)."""
    state: dict[str, np.ndarray] = {}
    scaled_out = adapted_modules(peft_params, "output_scale", prefix, ia3.name)
    scaled_in = adapted_modules(peft_params, "input_scale", prefix, ia3.name)
    for (path, rel), key in [(m, "output_scale") for m in scaled_out] + [(m, "input_scale") for m in scaled_in]:
        v = np.asarray(jax.device_get(pb.get_path(peft_params, path)[key]), np.float32)
        state[info.peft_key(rel, "ia3_l")] = v[:, None] if key == "output_scale" else v[None, :]
    out_paths, in_paths = [rel for _, rel in scaled_out], [rel for _, rel in scaled_in]
    # peft wants feedforward_modules to be entries of target_modules, and tells them apart from the other
    # targets by a plain ``name.endswith(entry)``: each entry covers one kind only, else full names.
    ff_entries = info.target_modules(in_paths, within=in_paths) if in_paths else []
    ff_names = {info.module_name(p) for p in in_paths}
    all_names = ff_names | {info.module_name(p) for p in out_paths}
    if any(n not in ff_names for f in ff_entries for n in all_names if n.endswith(f)):
        ff_entries = sorted(ff_names)
    out_entries = info.target_modules(out_paths, within=out_paths) if out_paths else []
    config = {"target_modules": sorted(set(out_entries) | set(ff_entries)), "feedforward_modules": ff_entries,
              "fan_in_fan_out": info.fan_in_fan_out(out_paths + in_paths), "init_ia3_weights": True,
              "modules_to_save": None, "exclude_modules": None}
    return config, state


def ia3_from_peft_state(config: Mapping[str, Any], state: Mapping[str, np.ndarray], base_params: pb.Params,
                        prefix: Sequence[str] = (), name: str = "ia3", info: BaseModelInfo | None = None
                        ) -> tuple[IA3, pb.Params]:
    """The method and parameters of a peft IA3 adapter (``ia3_l`` per module)."""
    if config.get("modules_to_save"):
        raise UnsupportedAdapterError(
            f"{name}: modules_to_save={config['modules_to_save']!r} (whole trained modules) is not supported")
    feedforward = config.get("feedforward_modules") or []
    params: pb.Params = {}
    targets, scaled_in = [], []
    for module, found in group_module_state(state, ("ia3_l",), name).items():
        key, value = found["ia3_l"]
        path = tuple(prefix) + (info.module_path(module) if info else module_path(module))
        kernel = find_kernel(base_params, path, key)
        d_in, d_out = kernel.shape[-2], kernel.shape[-1]
        # peft's rule (IA3Model._check_target_module_feedforward): a regex string or plain suffixes.
        if isinstance(feedforward, str):
            is_ff = re.fullmatch(feedforward, module) is not None
        else:
            is_ff = any(module.endswith(f) for f in feedforward)
        if is_ff:
            check_shape(key, value, (1, d_in))
            pb.set_path(params, path, {"input_scale": jnp.asarray(value[0], jnp.float32)})
            scaled_in.append("/".join(path))
        else:
            check_shape(key, value, (d_out, 1))
            pb.set_path(params, path, {"output_scale": jnp.asarray(value[:, 0], jnp.float32)})
        targets.append("/".join(path))
    return IA3(targets=tuple(targets), feedforward_modules=tuple(scaled_in), name=name), params


IA3_FORMAT = PeftFormat("IA3", ia3_to_peft_state, ia3_from_peft_state)
