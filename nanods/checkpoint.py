"""Checkpoints: one self-contained .safetensors (weights + config + tokenizer) and a training-state file.

Write order makes a kill at any moment safe: the new training state is written first (named by
its step), then the weights file is replaced atomically (same-directory temp file, fsync,
os.replace), and only then are older state files removed. The weights file names its step, so
it always has its matching state beside it. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes

import nanods
from nanods import registry
from nanods.atomic import atomic_write
from nanods.config import NanoDeepSeekConfig
from nanods.errors import NanodsError
from nanods.model import NanoDeepSeek
from nanods.safetensors_header import read_header
from nanods.tokenizer import Tokenizer

WEIGHTS = "ckpt.safetensors"
# 2: routed experts stored (E, out, in). Format 1 (no key) stored them (E, in, out), which a
# square expert matrix would load transposed without a shape error.
FORMAT = "2"
_STATE = re.compile(r"train_state_(\d+)\.safetensors$")


def state_path(out_dir: Path, step: int) -> Path:
    return out_dir / f"train_state_{step:07d}.safetensors"


def weights_metadata(config: NanoDeepSeekConfig, tokenizer: Tokenizer, step: int, data: dict[str, Any],
                     expert_load: list[list[float]] | None) -> dict[str, str]:
    meta = {
        "nanods.config": config.to_json(),
        "nanods.tokenizer": tokenizer.to_json(),
        "nanods.version": nanods.__version__,
        "nanods.format": FORMAT,
        "nanods.step": str(step),
        "nanods.components": json.dumps(registry.describe(config)),
        "nanods.data": json.dumps(data),
    }
    if expert_load is not None:
        meta["nanods.expert_load"] = json.dumps(expert_load)
    return meta


def _weights(state: dict[str, torch.Tensor], config: NanoDeepSeekConfig) -> dict[str, torch.Tensor]:
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if config.tie_embeddings:
        state.pop("lm_head.weight")  # the same storage as embed.weight; restored by tying on load
    return state


def save(out_dir: str | Path, weights: NanoDeepSeek | dict[str, torch.Tensor], config: NanoDeepSeekConfig,
         tokenizer: Tokenizer, step: int, data: dict[str, Any], train_state: dict[str, torch.Tensor],
         train_meta: dict[str, Any], expert_load: list[list[float]] | None = None) -> Path:
    """Save weights (a model or its full state dict) and training state for `step`; returns the weights path."""
    if isinstance(weights, NanoDeepSeek):
        weights = weights.state_dict()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    new_state = state_path(out_dir, step)
    atomic_write(new_state, save_bytes({k: v.contiguous() for k, v in train_state.items()},
                                       {"nanods.train": json.dumps(train_meta), "nanods.step": str(step)}))
    path = out_dir / WEIGHTS
    atomic_write(path, save_bytes(_weights(weights, config), weights_metadata(config, tokenizer, step, data, expert_load)))
    for old in out_dir.glob("train_state_*.safetensors"):
        if old != new_state and _STATE.search(old.name):
            old.unlink(missing_ok=True)
    return path


_REQUIRED = object()


def metadata_json(metadata: dict[str, str], key: str, path: str | Path, default: Any = _REQUIRED) -> Any:
    """The JSON value stored under `key` (or `default` when absent); damage is an error naming the file."""
    if key not in metadata:
        if default is _REQUIRED:
            raise NanodsError(f"'{path}' lacks its {key} metadata: it is damaged or was not written by nanods")
        return default
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as e:
        raise NanodsError(f"'{path}' is damaged: its {key} metadata is not valid JSON ({e.msg})") from None


def metadata_step(metadata: dict[str, str], path: str | Path) -> int:
    """nanods.step: the optimizer steps a file's run had completed (0 when absent)."""
    step = metadata_json(metadata, "nanods.step", path, 0)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise NanodsError(f"'{path}' is damaged: its nanods.step metadata is {metadata['nanods.step']!r}, "
                          "not a step count")
    return step


def config_from_metadata(metadata: dict[str, str], path: str | Path) -> NanoDeepSeekConfig:
    """The stored config, with each component resolved to the package that trained it."""
    if "nanods.config" not in metadata:
        raise NanodsError(f"'{path}' has no nanods metadata (nanods.config): it was not written by nanods")
    config = NanoDeepSeekConfig.from_dict(json.loads(metadata["nanods.config"]), f"nanods.config of {path}")
    provided = json.loads(metadata.get("nanods.components", "{}"))
    for group, name in registry.selected(config).items():
        dist = provided.get(group, {}).get("dist")
        offered = {c.dist for c in registry.components(group) if c.name == name.rpartition(":")[2]}
        if dist and dist in offered and len(offered) > 1:
            setattr(config, group, f"{dist}:{name.rpartition(':')[2]}")  # two packages offer it: take the recorded one
        elif dist and offered and dist not in offered:
            raise NanodsError(f"'{path}' was trained with {group} '{name}' from package '{dist}', but here it comes "
                              f"from {', '.join(sorted(offered))}: pip install {dist}")
        elif not offered:
            package = dist or "the package that provides it"
            raise NanodsError(f"'{path}' needs {group} '{name}' from package '{package}', which is not installed: "
                              f"pip install {package}")
    return config


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[NanoDeepSeek, Tokenizer]:
    """A checkpoint -> (model in eval mode, tokenizer). Reads tensors with safetensors only (no pickle)."""
    path = Path(path)
    _, metadata = read_header(path)
    config = config_from_metadata(metadata, path)
    stored = metadata.get("nanods.format", "1")  # files without the key predate it: format 1
    if config.use_moe and stored != FORMAT:
        raise NanodsError(f"'{path}' stores routed experts in checkpoint format {stored} (E, in, out); "
                          f"this nanods reads format {FORMAT} (E, out, in): train it again")
    tokenizer = Tokenizer.from_json(metadata["nanods.tokenizer"])
    with torch.device("meta"):
        model = NanoDeepSeek(config)
    state = load_file(path)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches, e.g. a file written with another tensor layout
        problem = str(e).strip().splitlines()[-1].strip()
        raise NanodsError(f"'{path}' does not match its config: {problem}") from None
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise NanodsError(f"'{path}' does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    _materialize_buffers(model)
    return model.to(device).eval(), tokenizer


def _materialize_buffers(model: NanoDeepSeek) -> None:
    """Non-persistent buffers (expert counts) are not in the file: give them real zeros."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                module.register_buffer(name, torch.zeros(buf.shape, dtype=buf.dtype), persistent=False)


def latest_state(out_dir: Path, step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The training state matching the weights' step."""
    path = state_path(out_dir, step)
    if not path.is_file():
        raise NanodsError(f"no training state for step {step} in '{out_dir}' ({path.name} is missing); "
                          "start a new run with --init-from instead")
    _, metadata = read_header(path)
    return load_file(path), json.loads(metadata["nanods.train"])
