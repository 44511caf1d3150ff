"""Optimizer state <-> a safetensors file: tensors stored flat, the parameter groups as JSON (no pickle).

A state file is untrusted input: fused optimizer kernels read and write it in place, so a moment of
the wrong shape would corrupt memory. Every tensor is checked against its parameter, and the
parameter groups against this run's, before torch sees any of it.
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
from nanods.train.muon import Muon

_NAME = re.compile(r"optimizer(\d+)\.(\d+)\.(\w+)$")
# What each optimizer keeps per parameter: "step" is a 0-dim float counter, the rest are shaped like it.
STATE_KEYS: dict[type, frozenset[str]] = {torch.optim.AdamW: frozenset({"step", "exp_avg", "exp_avg_sq"}),
                                          Muon: frozenset({"momentum_buffer"})}
_KERNEL_CHOICES = ("fused", "foreach")  # this machine's choice, never taken from the file


def flatten(optimizers: list[torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Every optimizer's state -> flat tensors 'optimizer{i}.{param id}.{key}' + its parameter groups."""
    tensors, metas = {}, []
    for index, optimizer in enumerate(optimizers):
        state_dict = optimizer.state_dict()
        for pid, values in state_dict["state"].items():
            for key, value in values.items():
                tensors[f"optimizer{index}.{pid}.{key}"] = value.detach().cpu().contiguous()
        metas.append({"param_groups": state_dict["param_groups"]})
    return tensors, metas


def restore(optimizers: list[torch.optim.Optimizer], model: nn.Module, tensors: dict[str, torch.Tensor],
            metas: Any, path: Path) -> None:
    """Load what flatten() wrote into `optimizers`, after checking every name, shape, dtype and value."""
    if not isinstance(metas, list) or len(metas) != len(optimizers):
        found = len(metas) if isinstance(metas, list) else "no"
        raise NanodsError(f"'{path}' holds the state of {found} optimizers, this run has {len(optimizers)}")
    names = {id(p): n for n, p in model.named_parameters()}
    params = [[p for group in optimizer.param_groups for p in group["params"]] for optimizer in optimizers]
    states: list[dict[int, dict[str, torch.Tensor]]] = [{} for _ in optimizers]
    for name, tensor in tensors.items():
        match = _NAME.match(name)
        index = int(match[1]) if match else len(optimizers)
        if index >= len(optimizers) or int(match[2]) >= len(params[index]) \
                or match[3] not in STATE_KEYS[type(optimizers[index])]:
            raise NanodsError(f"'{path}' holds tensor '{name}', which no parameter of this run owns")
        pid, key = int(match[2]), match[3]
        param = params[index][pid]
        if key == "step":
            if tensor.dim() != 0 or not tensor.is_floating_point() or not math.isfinite(tensor.item()) \
                    or tensor.item() < 0:
                raise NanodsError(f"'{path}' is damaged: '{name}' is not a step count")
        else:
            check_tensor(path, name, tensor, param.shape, param.dtype, f"the state of '{names.get(id(param), '?')}'")
            if key.endswith("_sq") and bool((tensor < 0).any()):  # a second moment: sqrt of it divides the step
                raise NanodsError(f"'{path}' is damaged: tensor '{name}' holds negative second moments")
        states[index].setdefault(pid, {})[key] = tensor
    for index, (optimizer, meta) in enumerate(zip(optimizers, metas)):
        expected = STATE_KEYS[type(optimizer)]
        for pid, values in states[index].items():
            if values.keys() != expected:
                missing = ", ".join(sorted(expected - values.keys()))
                raise NanodsError(f"'{path}' is damaged: the state of '{names.get(id(params[index][pid]), '?')}' "
                                  f"lacks {missing}")
        groups = _checked_groups(optimizer, meta, path)
        kernels = [{k: g[k] for k in _KERNEL_CHOICES if k in g} for g in optimizer.param_groups]
        optimizer.load_state_dict({"state": states[index], "param_groups": groups})
        for group, kernel in zip(optimizer.param_groups, kernels):
            group.update(kernel)


def _checked_groups(optimizer: torch.optim.Optimizer, meta: Any, path: Path) -> list[dict[str, Any]]:
    """The saved parameter groups, shaped like this optimizer's: the same settings, finite numbers, and
    parameter ids in this run's order (torch pairs states with parameters by these ids)."""
    groups = meta.get("param_groups") if isinstance(meta, dict) else None
    name = type(optimizer).__name__
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups) or meta.get("scalars", {}):
        raise NanodsError(f"'{path}' is damaged or from another setup: its {name} parameter groups do not match "
                          "this run's")
    first = 0
    for saved, current in zip(groups, optimizer.param_groups):
        ids = list(range(first, first + len(current["params"])))
        first += len(ids)
        if not isinstance(saved, dict) or saved.keys() != current.keys() or saved["params"] != ids:
            raise NanodsError(f"'{path}' does not fit this run: its {name} parameter groups differ (another model "
                              "or optimizer setup)")
        for key, value in saved.items():
            if key not in ("params", *_KERNEL_CHOICES) and not _same_kind(value, current[key]):
                raise NanodsError(f"'{path}' is damaged: optimizer setting '{key}' is {value!r}")
    return groups


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
