"""What a model costs: parameters by component, active per token, KV-cache bytes, FLOPs per token."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from nanods.checkpoint import config_from_metadata
from nanods.config import NanoDeepSeekConfig
from nanods.errors import NanodsError
from nanods.flops import build_on_meta, count_parameters, flops_per_token
from nanods.layers.attention.mha import MultiHeadAttention
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
    out = report(config, **kwargs)
    out["checkpoint"] = {"path": str(path), "tensors": len(tensors), "values": stored,
                         "step": int(metadata.get("nanods.step", 0)), "version": metadata.get("nanods.version")}
    if "nanods.components" in metadata:
        out["components"] = json.loads(metadata["nanods.components"])
    if "nanods.expert_load" in metadata:
        out["expert_load"] = json.loads(metadata["nanods.expert_load"])
    return out
