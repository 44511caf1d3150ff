"""What a model costs: parameters by component, active per token, KV-cache bytes, FLOPs per token."""

from __future__ import annotations

import codecs
import math
import struct
from pathlib import Path
from typing import Any, Literal

import torch
from rich.console import Console
from rich.table import Table

from nanods.checkpoint import WEIGHTS, config_from_metadata, metadata_json, metadata_step
from nanods.config import NanoDeepSeekConfig
from nanods.errors import NanodsError
from nanods.flops import build_on_meta, count_parameters, flops_per_token
from nanods.layers.attention.mha import MultiHeadAttention
from nanods.memory import model_size
from nanods.safetensors_header import read_header
from nanods.terminal import escape, format_bytes


def file_kind(target: str | Path) -> tuple[Literal["checkpoint", "project"], Path]:
    """What a path on the command line names: ("checkpoint", file) or ("project", file).

    A run folder stands for the ckpt.safetensors in it. A file is told by its content, not its name:
    a safetensors file starts with its header's length (8 bytes, little-endian) and the header's '{';
    any other UTF-8 text is taken for a project file, whose TOML errors come when it is read.
    """
    path = Path(target)
    if path.is_dir():
        if not (path / WEIGHTS).is_file():
            raise NanodsError(f"'{path}' is a folder without {WEIGHTS}; give a checkpoint file or a run folder")
        return "checkpoint", path / WEIGHTS
    if not path.exists():
        raise NanodsError(f"'{path}' not found; check the path")
    if not path.is_file():  # opening a FIFO could block forever
        raise NanodsError(f"'{path}' is not a regular file; give a checkpoint file or a run folder")
    with path.open("rb") as f:
        head = f.read(4096)
    # Read as a number, the first 8 bytes of any text are >= 2**56 (no byte is 0): no header is that long
    if len(head) > 8 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 2**32:
        return "checkpoint", path
    try:  # incremental: a character cut at the end of the 4096 bytes is not an error
        binary = "\0" in codecs.getincrementaldecoder("utf-8")().decode(head)
    except UnicodeDecodeError:
        binary = True
    if binary or path.suffix == ".safetensors":  # text named like a checkpoint was meant as one
        what = "a safetensors checkpoint" + ("" if path.suffix == ".safetensors" else " nor a nanods.toml project file")
        raise NanodsError(f"'{path}' is not {what}; give the {WEIGHTS} that `nanods train` wrote, or its run folder")
    return "project", path


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
        "params_mtp": params["groups"].get("mtp", {}).get("total", 0),  # trained, unused by plain decoding
        "dtype": str(dtype).removeprefix("torch."),
        "seq_len": seq_len,
        "batch": batch,
        "kv_cache_bytes_per_token": per_token,
        "kv_cache_bytes_per_token_mha": config.n_layer * MultiHeadAttention.kv_cache_bytes_per_token(config, dtype),
        "kv_cache_bytes": per_token * seq_len * batch,
        "flops_per_token": flops_per_token(model, seq_len, decode=False),
        "flops_per_token_decode": flops_per_token(model, seq_len, decode=True),
        "flops_per_token_train": 3 * flops_per_token(model, seq_len, mtp=True),  # forward + backward, MTP included
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


def _fmt_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def print_report(info: dict[str, Any], console: Console) -> None:
    """The tables `nanods inspect` prints for a report or a checkpoint_report."""
    cfg = {key: escape(value) for key, value in info["config"].items()}  # a checkpoint's metadata is data, not markup
    title = (f"{cfg['attention']} x {cfg['ffn']}" + (f" ({cfg['router']} router)" if cfg["ffn"] == "moe" else "")
             + f", {cfg['n_layer']} layers, d={cfg['n_embd']}, vocab {cfg['vocab_size']}")
    table = Table(title=f"parameters: {title}")
    for col in ("component", "total", "active per token"):
        table.add_column(col, justify="right" if col != "component" else "left")
    for name, g in info["params_by_component"].items():
        table.add_row(escape(name), f"{g['total']:,}", f"{g['active']:,}")
    table.add_row("[bold]all[/]", f"[bold]{info['params_total']:,}[/]", f"[bold]{info['params_active']:,}[/]")
    console.print(table)
    if "components" in info:
        console.print("components: " + ", ".join(escape(f"{g} {c['name']} ({c['dist']} {c['version']})")
                                                 for g, c in info["components"].items()), highlight=False)
    cost = Table(title=f"costs at seq_len={info['seq_len']}, batch={info['batch']}, {info['dtype']}")
    cost.add_column("measure")
    cost.add_column("value", justify="right")
    per = info["kv_cache_bytes_per_token"]
    cost.add_row("KV cache per token (all layers)", format_bytes(per))
    cost.add_row("MHA-equivalent cache per token", f"{format_bytes(info['kv_cache_bytes_per_token_mha'])} "
                 f"({info['kv_cache_bytes_per_token_mha'] / per:.1f}x)")
    if "kv_cache_bytes_per_token_decompressed" in info:
        d = info["kv_cache_bytes_per_token_decompressed"]
        cost.add_row("MLA decompressed per token", f"{format_bytes(d)} ({d / per:.1f}x the latent)")
    cost.add_row(f"KV cache for {info['batch']} x {info['seq_len']}", format_bytes(info["kv_cache_bytes"]))
    cost.add_row("FLOPs per token, forward (train/prefill)", _fmt_count(info["flops_per_token"]))
    cost.add_row("FLOPs per token, decode", _fmt_count(info["flops_per_token_decode"]))
    cost.add_row("FLOPs per token, training" + (" (MTP included)" if info["params_mtp"] else ""),
                 _fmt_count(info["flops_per_token_train"]))
    console.print(cost)
    if "expert_load" in info:
        load = Table(title="expert load at save time (share of routed tokens)")
        load.add_column("layer")
        load.add_column("shares")
        load.add_column("max/mean", justify="right")
        for i, shares in enumerate(info["expert_load"]):
            load.add_row(str(i), " ".join(f"{s:.2f}" for s in shares), f"{max(shares) * len(shares):.2f}")
        console.print(load)
