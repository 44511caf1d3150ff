"""What a model costs: parameters by component, active per token, KV-cache bytes, FLOPs per token."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from nanods.checkpoint import config_from_metadata, metadata_json, metadata_step
from nanods.config import NanoDeepSeekConfig
from nanods.errors import NanodsError
from nanods.flops import build_on_meta, count_parameters, flops_per_token
from nanods.layers.attention.mha import MultiHeadAttention
from nanods.memory import model_size
from nanods.safetensors_header import read_header


def report(config: NanoDeepSeekConfig, seq_len: int | None = None, batch: int = 1,
           dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """The numbers `nanods inspect` prints, from a model built on the meta device."""
    seq_len = seq_len or config.sequence_len
    model = build_on_meta(config)
    params = count_parameters(model)
    nbytes = dtype.itemsize
    per_token = model.kv_cache_bytes_per_token(dtype)
    out = {
        "config": config.to_dict(),
        "params_total": params["total"],
        "params_active": params["active"],
        "params_by_component": params["groups"],
        "dtype": str(dtype).removeprefix("torch."),
        "seq_len": seq_len,
        "batch": batch,
        "kv_cache_bytes_per_token": per_token,
        "kv_cache_bytes_per_token_mha": config.n_layer * MultiHeadAttention.kv_cache_bytes_per_token(config, dtype),
        "kv_cache_bytes": per_token * seq_len * batch,
        "flops_per_token": flops_per_token(model, seq_len, decode=False),
        "flops_per_token_decode": flops_per_token(model, seq_len, decode=True),
    }
    if config.use_mla:  # what naive MLA would hold if it cached decompressed per-head keys and values
        heads = config.n_head * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
        out["kv_cache_bytes_per_token_decompressed"] = config.n_layer * heads * nbytes
    return out


def checkpoint_report(path: str | Path, **kwargs: Any) -> dict[str, Any]:
    """report() for a checkpoint, from its header alone; tensor counts come from the file itself."""
    tensors, metadata = read_header(path)
    stored = sum(math.prod(t["shape"]) for t in tensors.values())
    if "nanods.config" not in metadata:
        raise NanodsError(f"'{path}' has {len(tensors)} tensors ({stored:,} values) but no nanods metadata "
                          "(nanods.config is missing): it was not written by nanods")
    config = config_from_metadata(metadata, path)  # names the package of a component that is not installed
    # Before report() builds every layer: the header's config must describe the tensors the header
    # lists. Compared as counts of stored tensors and values, from one block of each kind: exactly
    # what save() writes (persistent buffers such as expert_bias in, non-persistent ones out, a tied
    # lm_head left to embed.weight), with no list of buffer names to keep in step.
    expected = model_size(config)
    if (expected.tensors, expected.values) != (len(tensors), stored):
        raise NanodsError(f"'{path}' does not match its config: nanods.config describes {config.n_layer} layers "
                          f"stored as {expected.tensors:,} tensors ({expected.values:,} values), but the file holds "
                          f"{len(tensors):,} tensors ({stored:,} values); it is damaged or was edited")
    extra: dict[str, Any] = {"checkpoint": {"path": str(path), "tensors": len(tensors), "values": stored,
                                            "step": metadata_step(metadata, path),
                                            "version": metadata.get("nanods.version")}}
    for key, (valid, shape) in _OPTIONAL_METADATA.items():
        if f"nanods.{key}" in metadata:
            extra[key] = metadata_json(metadata, f"nanods.{key}", path)
            if not valid(extra[key]):  # valid JSON of another shape would only fail later, in the printing
                raise NanodsError(f"'{path}' is damaged: its nanods.{key} metadata is not {shape}")
    return report(config, **kwargs) | extra


def _is_provenance(value: Any) -> bool:
    fields = ("name", "dist", "version")
    return isinstance(value, dict) and all(
        isinstance(c, dict) and all(isinstance(c.get(k), str) for k in fields) for c in value.values())


def _is_expert_load(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(row, list) and row and all(isinstance(s, (int, float)) for s in row) for row in value)


_OPTIONAL_METADATA = {"components": (_is_provenance, "an object of {name, dist, version} objects"),
                      "expert_load": (_is_expert_load, "a list of per-layer lists of expert shares")}
