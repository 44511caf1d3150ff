"""Optimizer state <-> a safetensors file: tensors stored flat, everything else as JSON (no pickle).

A state file is untrusted input: fused optimizer kernels read and write it in place, so a moment of
the wrong shape would corrupt memory. Every tensor is checked against its parameter before loading.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nanods.checkpoint import check_tensor
from nanods.errors import NanodsError

_NAME = re.compile(r"optimizer(\d+)\.(\d+)\.(\w+)$")


def flatten(optimizers: list[torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Every optimizer's state -> flat tensors 'optimizer{i}.{param id}.{key}' + one JSON object each."""
    tensors, metas = {}, []
    for index, optimizer in enumerate(optimizers):
        state_dict = optimizer.state_dict()
        scalars = {}
        for pid, values in state_dict["state"].items():
            for key, value in values.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer{index}.{pid}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{pid}.{key}"] = value
        metas.append({"param_groups": state_dict["param_groups"], "scalars": scalars})
    return tensors, metas


def restore(optimizers: list[torch.optim.Optimizer], model: nn.Module, tensors: dict[str, torch.Tensor],
            metas: Any, path: Path) -> None:
    """Load what flatten() wrote into `optimizers`, after checking every name, shape, dtype and value.

    Each optimizer keeps this machine's kernel choice (fused/foreach), not the saved one.
    """
    if not isinstance(metas, list) or len(metas) != len(optimizers):
        found = len(metas) if isinstance(metas, list) else "no"
        raise NanodsError(f"'{path}' holds the state of {found} optimizers, this run has {len(optimizers)}")
    names = {id(p): n for n, p in model.named_parameters()}
    params = [[p for group in optimizer.param_groups for p in group["params"]] for optimizer in optimizers]
    states: list[dict[int, dict[str, Any]]] = [{} for _ in optimizers]
    for name, tensor in tensors.items():
        match = _NAME.match(name)
        if not match or int(match[1]) >= len(optimizers) or int(match[2]) >= len(params[int(match[1])]):
            raise NanodsError(f"'{path}' holds tensor '{name}', which no parameter of this run owns")
        index, pid, key = int(match[1]), int(match[2]), match[3]
        param = params[index][pid]
        if tensor.dim() == 0:  # a step counter
            if not tensor.is_floating_point() or not math.isfinite(tensor.item()) or tensor.item() < 0:
                raise NanodsError(f"'{path}' is damaged: '{name}' is {tensor.item()!r}, not a step count")
        else:
            check_tensor(path, f"{name}' (state of '{names.get(id(param), '?')}", tensor, param.shape, param.dtype)
        states[index].setdefault(pid, {})[key] = tensor
    for index, (optimizer, meta) in enumerate(zip(optimizers, metas)):
        _check_meta(optimizer, meta, len(params[index]), path)
        for name, value in meta["scalars"].items():
            pid, _, key = name.partition(".")
            states[index].setdefault(int(pid), {})[key] = value
        kernels = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
        optimizer.load_state_dict({"state": states[index], "param_groups": meta["param_groups"]})
        for group, kernel in zip(optimizer.param_groups, kernels):
            group.update(kernel)


def _check_meta(optimizer: torch.optim.Optimizer, meta: Any, n_params: int, path: Path) -> None:
    """The JSON half: groups shaped like this optimizer's, settings of the same types, finite numbers."""
    groups = meta.get("param_groups") if isinstance(meta, dict) else None
    scalars = meta.get("scalars") if isinstance(meta, dict) else None
    if not isinstance(groups, list) or not isinstance(scalars, dict) or len(groups) != len(optimizer.param_groups):
        raise NanodsError(f"'{path}' is damaged or from another optimizer setup: its parameter groups do not "
                          f"match this run's {type(optimizer).__name__}")
    for saved, current in zip(groups, optimizer.param_groups):
        if not isinstance(saved, dict) or saved.keys() != current.keys() \
                or len(saved["params"]) != len(current["params"]):
            raise NanodsError(f"'{path}' does not fit this run: its {type(optimizer).__name__} parameter groups "
                              "differ (another model or optimizer setup)")
        for key, value in saved.items():
            if key != "params" and not _same_kind(value, current[key]):
                raise NanodsError(f"'{path}' is damaged: optimizer setting '{key}' is {value!r}")
    for name, value in scalars.items():
        pid, dot, _ = name.partition(".")
        if not (dot and pid.isdigit() and int(pid) < n_params and _same_kind(value, 0.0)):
            raise NanodsError(f"'{path}' is damaged: optimizer value '{name}' = {value!r}")


def _same_kind(value: Any, reference: Any) -> bool:
    """JSON `value` can stand where `reference` stood: same kind of value, and numbers finite."""
    if isinstance(reference, bool) or reference is None or isinstance(reference, str):
        return type(value) is type(reference)
    if isinstance(reference, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(reference, (list, tuple)):
        return isinstance(value, (list, tuple)) and len(value) == len(reference) \
            and all(_same_kind(v, r) for v, r in zip(value, reference))
    return False
