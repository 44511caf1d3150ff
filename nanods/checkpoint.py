"""Checkpoints: one self-contained .safetensors (weights + config + tokenizer) and a training-state file.

Write order makes a kill at any moment safe: the new training state is written first (named by
its step), then the weights file is replaced atomically (same-directory temp file, fsync,
os.replace), and only then are older state files removed. The weights file names its step, so
it always has its matching state beside it. Nothing is ever unpickled.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes

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
STATE_FILE = r"train_state_(\d+)\.safetensors"  # the training state of one step, beside the weights
_STATE = re.compile(STATE_FILE + "$")


def state_path(out_dir: Path, step: int) -> Path:
    return out_dir / f"train_state_{step:07d}.safetensors"


def weights_metadata(config: NanoDeepSeekConfig, tokenizer: Tokenizer | None, step: int, data: dict[str, Any],
                     expert_load: list[list[float]] | None) -> dict[str, str]:
    """The metadata of a weights file (no tokenizer: a model imported without one)."""
    meta = {
        "nanods.config": config.to_json(),
        "nanods.version": md.version("nanods"),  # as installed, like the components' provenance
        "nanods.format": FORMAT,
        "nanods.step": str(step),
        "nanods.components": json.dumps(registry.describe(config)),
        "nanods.data": json.dumps(data),
    }
    if tokenizer is not None:
        meta["nanods.tokenizer"] = tokenizer.to_json()
    if expert_load is not None:
        meta["nanods.expert_load"] = json.dumps(expert_load)
    return meta


def stored_weights(state: dict[str, torch.Tensor], config: NanoDeepSeekConfig) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint file holds: on the CPU, contiguous, a tied head once (as embed.weight)."""
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if config.tie_embeddings:
        state.pop("lm_head.weight")  # the same storage as embed.weight; restored by tying on load
    return state


def save(out_dir: str | Path, weights: NanoDeepSeek | dict[str, torch.Tensor], config: NanoDeepSeekConfig,
         tokenizer: Tokenizer, step: int, data: dict[str, Any], train_state: dict[str, torch.Tensor],
         train_meta: dict[str, Any], expert_load: list[list[float]] | None = None, run_id: str = "") -> Path:
    """Save weights (a model or its full state dict) and training state for `step`; returns the weights path.

    Both files record `run_id`, so a state file is only ever resumed beside the weights of its own run.
    A failed write removes the state file it had just added: the previous pair stays as it was.
    """
    if isinstance(weights, NanoDeepSeek):
        weights = weights.state_dict()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    new_state, path = state_path(out_dir, step), out_dir / WEIGHTS
    added = not new_state.exists()
    try:
        atomic_write(new_state, save_bytes({k: v.contiguous() for k, v in train_state.items()},
                                           {"nanods.train": json.dumps(train_meta), "nanods.step": str(step),
                                            "nanods.run": run_id}))
        meta = weights_metadata(config, tokenizer, step, data, expert_load) | {"nanods.run": run_id}
        atomic_write(path, save_bytes(stored_weights(weights, config), meta))
    except BaseException:
        if added and not _holds(path, step, run_id):  # atomic_write may fail after its replace (the folder fsync)
            new_state.unlink(missing_ok=True)
        raise
    for old in out_dir.glob("train_state_*.safetensors"):
        if old != new_state and _STATE.search(old.name):
            old.unlink(missing_ok=True)
    return path


def _holds(path: Path, step: int, run_id: str) -> bool:
    """Whether the weights file at path is the one of `run_id` at `step`."""
    meta = saved_metadata(path)
    return meta is not None and meta.get("nanods.step") == str(step) and metadata_run(meta) == run_id


def saved_metadata(path: Path) -> dict[str, str] | None:
    """The metadata of the file at path, or None when it is missing or not a readable safetensors file."""
    try:
        return read_header(path)[1]
    except NanodsError:
        return None


_REQUIRED = object()


def metadata_run(metadata: dict[str, str]) -> str:
    """nanods.run: the id of the run that wrote a file ('' for files written before runs had ids)."""
    return metadata.get("nanods.run", "")


def metadata_text(metadata: dict[str, str], key: str, path: str | Path) -> str:
    """The metadata string under `key`; its absence is an error naming the file."""
    if key not in metadata:
        raise NanodsError(f"'{path}' lacks its {key} metadata: it is damaged or was not written by nanods")
    return metadata[key]


def metadata_json(metadata: dict[str, str], key: str, path: str | Path, default: Any = _REQUIRED) -> Any:
    """The JSON value stored under `key` (or `default` when absent); damage is an error naming the file."""
    if key not in metadata and default is not _REQUIRED:
        return default
    try:
        return json.loads(metadata_text(metadata, key, path))
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
    values = metadata_json(metadata, "nanods.config", path)
    if not isinstance(values, dict):
        raise NanodsError(f"'{path}' is damaged: its nanods.config metadata is not a JSON object")
    config = NanoDeepSeekConfig.from_dict(values, f"nanods.config of {path}")
    provided = metadata_json(metadata, "nanods.components", path, {})
    if not isinstance(provided, dict) or not all(isinstance(v, dict) for v in provided.values()):
        raise NanodsError(f"'{path}' is damaged: its nanods.components metadata is not a JSON object of objects")
    for group, name in registry.selected(config).items():
        recorded = provided.get(group, {})
        dist = recorded.get("dist") if isinstance(recorded.get("dist"), str) else None
        offered = {c.dist for c in registry.components(group) if c.name == name.rpartition(":")[2]}
        if dist and dist in offered and len(offered) > 1:
            setattr(config, group, f"{dist}:{name.rpartition(':')[2]}")  # two packages offer it: take the recorded one
        elif dist and offered and dist not in offered:
            raise NanodsError(f"'{path}' was trained with {group} '{name}' from package '{dist}', but here it comes "
                              f"from {', '.join(sorted(offered))}: pip install {dist}")
        elif not offered:
            raise NanodsError(f"'{path}' needs {group} '{name}'{_missing_from(dist, recorded.get('version'))}")
    return config


def _missing_from(dist: str | None, version: Any) -> str:
    """Why a recorded component is missing here, and the install that brings it back."""
    if not dist:
        return ", which no installed package offers (see `nanods components`)"
    try:
        installed = md.version(dist)
    except md.PackageNotFoundError:
        return f" from package '{dist}', which is not installed: pip install {dist}"
    wanted = f"{dist}=={version}" if isinstance(version, str) and version else dist
    if installed == version:  # the very version that wrote it: a damaged install, or a file written elsewhere
        return (f" from {dist} {installed}, which is installed here but offers no such component (see `nanods "
                f"components`); if its install is damaged: pip install --force-reinstall '{wanted}'")
    return (f" from package '{dist}'; {dist} {installed} is installed but offers no such component "
            f"(the file was written with version {version}): pip install '{wanted}'")


def check_tensor(path: str | Path, name: str, tensor: torch.Tensor, shape: tuple[int, ...] | torch.Size,
                 dtype: torch.dtype, owner: str = "") -> None:
    """Refuse, naming the file and the tensor (and what it belongs to), a tensor that is not what the
    reader expects, before any use."""
    what = f"tensor '{name}'" + (f" ({owner})" if owner else "")
    if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
        raise NanodsError(f"'{path}' does not fit this model: {what} is {_describe(tensor.shape, tensor.dtype)}, "
                          f"expected {_describe(shape, dtype)}")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise NanodsError(f"'{path}' is damaged: {what} holds NaN or infinite values")


def _describe(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> str:
    return f"{list(shape)} {str(dtype).removeprefix('torch.')}"


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[NanoDeepSeek, Tokenizer | None]:
    """A checkpoint -> (model in eval mode, tokenizer; None for a model imported without one). Reads tensors
    with safetensors only (no pickle), and checks every name, shape, dtype and value against the model its
    config describes before use."""
    path = Path(path)
    _, metadata = read_header(path)
    config = config_from_metadata(metadata, path)
    stored = metadata.get("nanods.format", "1")  # files without the key predate it: format 1
    if config.use_moe and stored != FORMAT:
        raise NanodsError(f"'{path}' stores routed experts in checkpoint format {stored} (E, in, out); "
                          f"this nanods reads format {FORMAT} (E, out, in): train it again")
    tokenizer = _tokenizer(metadata, path, config) if "nanods.tokenizer" in metadata else None
    with torch.device("meta"):
        model = NanoDeepSeek(config)
    expected = model.state_dict()  # names, shapes and dtypes, nothing allocated
    if config.tie_embeddings:
        expected.pop("lm_head.weight")  # the file stores the shared matrix once, as embed.weight
    state = load_file(path)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise NanodsError(f"'{path}' does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, tensor in state.items():
        check_tensor(path, name, tensor, expected[name].shape, expected[name].dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    _materialize_buffers(model)
    return model.to(device).eval(), tokenizer


def _tokenizer(metadata: dict[str, str], path: Path, config: NanoDeepSeekConfig) -> Tokenizer:
    """The stored tokenizer, which must fit the model: an id past the embedding would index out of bounds."""
    try:
        tokenizer = Tokenizer.from_json(metadata_text(metadata, "nanods.tokenizer", path))
    except Exception as e:  # the tokenizers library raises a bare Exception for a malformed tokenizer.json
        raise NanodsError(f"'{path}' holds a damaged tokenizer ({str(e).splitlines()[0][:200]})") from None
    if len(tokenizer) != (config.tokenizer_vocab_size or len(tokenizer)) or len(tokenizer) > config.vocab_size:
        raise NanodsError(f"'{path}' is damaged: its tokenizer has {len(tokenizer):,} ids but the model was built "
                          f"for {config.tokenizer_vocab_size or config.vocab_size:,}")
    return tokenizer


def _materialize_buffers(model: NanoDeepSeek) -> None:
    """Non-persistent buffers (expert counts) are not in the file: give them real zeros."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                module.register_buffer(name, torch.zeros(buf.shape, dtype=buf.dtype), persistent=False)


def latest_state(out_dir: Path, step: int, run_id: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The training state that pairs with the weights of run `run_id` at `step` (tensors unchecked: the
    optimizers that take them check them)."""
    path = state_path(out_dir, step)
    if not path.is_file():
        raise NanodsError(f"no training state for step {step} in '{out_dir}' ({path.name} is missing); "
                          "start a new run from the weights with --init-from instead")
    _, metadata = read_header(path)
    if metadata_run(metadata) != run_id:
        raise NanodsError(f"'{path}' belongs to another run than '{out_dir / WEIGHTS}' (run "
                          f"{metadata_run(metadata) or 'unrecorded'}; the weights are run {run_id or 'unrecorded'}); "
                          "start a new run from the weights with --init-from instead")
    stored = metadata_step(metadata, path)
    if stored != step:
        raise NanodsError(f"'{path}' holds step {stored}, but the weights beside it are step {step}; start a new "
                          "run from the weights with --init-from instead")
    meta = metadata_json(metadata, "nanods.train", path)
    if not isinstance(meta, dict):
        raise NanodsError(f"'{path}' is damaged: its nanods.train metadata is not a JSON object")
    return load_file(path), meta
