"""Checking plain values: number ranges, the size bounds, and the fields of a settings dataclass.

Values come from nanods.toml, --set, a checkpoint's metadata or a plugin's options table; each
check names the setting and where it came from. Nothing here knows the model's classes.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from nanods.errors import NanodsError, did_you_mean


@dataclass(frozen=True)
class Range:
    """The values a number setting may take. NaN and infinities lie in no float range."""

    low: float
    high: float = math.inf
    low_open: bool = False  # True: low itself is excluded (> low, not >= low)
    integer: bool = False

    def __contains__(self, value: float) -> bool:
        # NaN fails every comparison, so `value < low` alone would let it through
        finite = self.integer or math.isfinite(value)
        return finite and (value > self.low if self.low_open else value >= self.low) and value <= self.high

    def __str__(self) -> str:
        if self.integer:
            return f"an integer in {self.low}..{self.high}" if self.high < math.inf else f"an integer >= {self.low}"
        if self.high < math.inf:
            return f"a finite number in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
        return f"a finite number {'>' if self.low_open else '>='} {self.low:g}"


POSITIVE = Range(0.0, low_open=True)
NON_NEGATIVE = Range(0.0)


def check_ranges(settings: object, ranges: dict[str, Range], section: str = "") -> None:
    """Raise NanodsError for the first setting outside its range (None means unset and passes)."""
    for name, allowed in ranges.items():
        value = getattr(settings, name)
        if value is not None and value not in allowed:
            raise NanodsError(f"{section}{name} must be {allowed}, got {value}")


# Hard upper bounds on sizes: several times DeepSeek-V3's (61 layers, 128 heads, n_embd 7168,
# 256 experts of width 2048, 128K context), so no real model meets them, yet low enough that a
# typo fails here at once instead of allocating until memory runs out. n_layer also bounds how
# long `nanods inspect` takes: it builds every layer on the meta device (1024 take a few seconds).
MAX_VOCAB_SIZE = 2**20  # ids are stored as uint32; the BPE trainer refuses more before it starts
MAX_SEQUENCE_LEN = 2**20
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_WIDTH = 2**16  # n_embd and the widths derived from it (latent ranks, head dims)
MAX_HIDDEN = 2**18  # FFN and expert widths: 4 x MAX_WIDTH, relu2's default ffn_hidden
MAX_EXPERTS = 4096


def integers(names: str, low: int, high: float = math.inf) -> dict[str, Range]:
    """{name: the integer range low..high} for each space-separated name."""
    return dict.fromkeys(names.split(), Range(low, high, integer=True))


# The ranges of the settings in [model], [train] and [sample] (None: unset, always allowed)
MODEL_RANGES: dict[str, Range] = {
    **integers("sequence_len", 1, MAX_SEQUENCE_LEN),
    **integers("vocab_size", 1, MAX_VOCAB_SIZE),
    **integers("n_layer", 1, MAX_LAYERS),
    **integers("n_head n_kv_head", 1, MAX_HEADS),
    **integers("n_embd kv_lora_rank qk_rope_head_dim qk_nope_head_dim v_head_dim", 1, MAX_WIDTH),
    **integers("q_lora_rank", 0, MAX_WIDTH),  # 0: no query compression
    **integers("ffn_hidden moe_hidden", 1, MAX_HIDDEN),
    **integers("num_experts top_k n_group topk_group", 1, MAX_EXPERTS),
    **integers("n_shared_experts", 0, MAX_EXPERTS),
    **integers("first_k_dense mtp_depth", 0, MAX_LAYERS),
    **integers("rope_original_len index_topk", 1, MAX_SEQUENCE_LEN),
    **integers("index_n_heads", 1, MAX_HEADS),
    **integers("index_head_dim", 2, MAX_WIDTH),
    "norm_eps": POSITIVE,
    "rope_theta": POSITIVE,
    "rope_factor": Range(1.0),  # 1: no YaRN
    "rope_beta_fast": POSITIVE,
    "rope_beta_slow": POSITIVE,
    "rope_mscale": NON_NEGATIVE,
    "rope_mscale_all_dim": NON_NEGATIVE,
    "route_scale": POSITIVE,
    "bias_update_speed": NON_NEGATIVE,
    "aux_loss_alpha": NON_NEGATIVE,
    "mtp_loss_weight": NON_NEGATIVE,
}


TRAIN_RANGES: dict[str, Range] = {
    **integers("seq_len", 1, MAX_SEQUENCE_LEN),
    **integers("steps eval_every log_every", 1),
    # every step draws its whole batch's offsets at once, every eval its batches': bounded, they cannot exhaust memory
    **integers("batch_size micro_batch_size", 1, 2**16),
    **integers("eval_batches", 1, 1000),
    **integers("warmup_steps dsa_dense_steps", 0),
    "lr": POSITIVE,
    "muon_lr": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "decay_frac": Range(0.0, 1.0),
    "grad_clip": NON_NEGATIVE,  # 0: no clipping
    **integers("seed", 0, 2**63 - 1),  # torch.manual_seed takes at most a signed 64-bit value
}


SAMPLE_RANGES: dict[str, Range] = {
    "temperature": NON_NEGATIVE,  # 0: greedy
    "top_p": Range(0.0, 1.0, low_open=True),
    **integers("top_k", 0),
    **integers("max_new_tokens", 1),
}


# ---------------------------------------------------------------------------------------------
# Types of plain values (TOML, --set, checkpoint metadata) against a dataclass's fields

def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    extra = [n for n, h in hints.items() if isinstance(h, dataclasses.InitVar)]
    out = {n: hints[n] for n in names}
    out.update({n: hints[n].type for n in extra})
    return out


def _accepts(hint: Any, value: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(h, value) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if origin is list:
        return isinstance(value, list)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint) if h is not type(None))
    return {dict: "table", list: "array", str: "string", bool: "boolean", int: "integer", float: "number"}.get(
        typing.get_origin(hint) or hint, getattr(hint, "__name__", str(hint)))


def _article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def check_fields(values: dict[str, Any], where: str, cls: type) -> dict[str, Any]:
    """values as keyword arguments of the dataclass cls: unknown keys (the closest suggested) and wrongly
    typed values refused, ints turned into floats where a float is declared."""
    hints = _field_types(cls)
    out = {}
    for key, value in values.items():
        if key not in hints:
            raise NanodsError(f"unknown key '{key}' in {where}{did_you_mean(key, hints)}")
        if not _accepts(hints[key], value):
            raise NanodsError(f"'{key}' in {where} must be {_article(_type_name(hints[key]))}, got {value!r}")
        if hints[key] is float and isinstance(value, int):
            value = float(value)
        out[key] = value
    return out
