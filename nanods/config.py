"""NanoDeepSeekConfig, the scale presets, and nanods.toml loading with helpful errors.

Resolution order: dataclass defaults -> preset -> nanods.toml [model] -> CLI options -> --set.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
import typing
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any

from nanods.errors import NanodsError, did_you_mean

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

MLA_ATTENTIONS = ("mla", "dsa")  # attentions built on MLA's latent cache


def short_name(component: str) -> str:
    """'dist:name' -> 'name' (the dist prefix only picks between packages offering one name)."""
    return component.rpartition(":")[2]


@dataclass
class NanoDeepSeekConfig:
    """Every architectural choice of a NanoDeepSeek model. `None` fields derive from others."""

    # the original fields (names and defaults are public API)
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6  # GQA for MHA; meaningless for MLA
    n_embd: int = 768
    kv_lora_rank: int | None = None  # -> n_embd // 2
    num_experts: int = 8
    top_k: int = 2
    # components (the stored truth; use_mla / use_moe are derived)
    attention: str | None = None  # -> "mla" (or "mha" when use_mla=False)
    ffn: str | None = None  # -> "moe" (or "dense" when use_moe=False)
    router: str = "sigmoid"
    attention_options: dict[str, Any] = field(default_factory=dict)
    ffn_options: dict[str, Any] = field(default_factory=dict)
    router_options: dict[str, Any] = field(default_factory=dict)
    # shared details
    norm_weights: bool = False  # learnable RMSNorm weights (DeepSeek has them; the default is parameter-free)
    norm_eps: float = 1e-6
    qk_norm: bool = True  # per-head QK RMSNorm in MHA (MLA normalises its latents instead)
    activation: str = "relu2"  # "relu2" | "swiglu"
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    ffn_hidden: int | None = None  # dense FFN width -> 4*n_embd (relu2) or ~8/3*n_embd (swiglu)
    tokenizer_vocab_size: int | None = None  # real tokenizer size; ids >= it are never sampled
    # MLA
    q_lora_rank: int | None = None  # -> kv_lora_rank; 0 = no query compression
    qk_rope_head_dim: int | None = None  # -> head_dim // 2 (even)
    qk_nope_head_dim: int | None = None  # -> head_dim
    v_head_dim: int | None = None  # -> head_dim
    # MoE
    n_shared_experts: int = 1
    moe_hidden: int | None = None  # -> ffn_hidden / (top_k + n_shared_experts): dense-equal active width
    first_k_dense: int = 0
    route_scale: float = 1.0
    route_norm: bool | None = None  # -> top_k > 1
    n_group: int = 1
    topk_group: int = 1
    bias_update_speed: float = 1e-3
    aux_loss_alpha: float | None = None  # -> 0.0 for sigmoid, 0.01 for softmax
    # multi-token prediction (its own issue)
    mtp_depth: int = 0
    mtp_loss_weight: float = 0.3
    # constructor-only switches of the original API
    use_mla: InitVar[bool | None] = None
    use_moe: InitVar[bool | None] = None

    def __post_init__(self, use_mla: bool | None, use_moe: bool | None) -> None:
        self.attention = _resolve_switch("attention", self.attention, "use_mla", use_mla, "mla", "mha")
        self.ffn = _resolve_switch("ffn", self.ffn, "use_moe", use_moe, "moe", "dense")
        if use_mla is not None and bool(use_mla) != self.use_mla:
            raise NanodsError(f"use_mla={use_mla} contradicts attention='{self.attention}'")
        if use_moe is not None and bool(use_moe) != self.use_moe:
            raise NanodsError(f"use_moe={use_moe} contradicts ffn='{self.ffn}'")
        head_dim = self.n_embd // self.n_head if self.n_head > 0 else 0
        if self.kv_lora_rank is None:
            self.kv_lora_rank = self.n_embd // 2
        if self.q_lora_rank is None:
            self.q_lora_rank = self.kv_lora_rank
        if self.qk_nope_head_dim is None:
            self.qk_nope_head_dim = head_dim
        if self.qk_rope_head_dim is None:
            self.qk_rope_head_dim = max(2, head_dim // 2 // 2 * 2)
        if self.v_head_dim is None:
            self.v_head_dim = head_dim
        if self.ffn_hidden is None:
            self.ffn_hidden = 4 * self.n_embd if self.activation == "relu2" else round_up(8 * self.n_embd // 3, 64)
        if self.moe_hidden is None:
            self.moe_hidden = round_up(self.ffn_hidden // (self.top_k + self.n_shared_experts), 32)
        if self.route_norm is None:
            self.route_norm = self.top_k > 1
        if self.aux_loss_alpha is None:
            self.aux_loss_alpha = 0.01 if short_name(self.router) == "softmax" else 0.0
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self) -> None:
        """Raise NanodsError naming the first inconsistent field."""
        check_ranges(self, MODEL_RANGES, "model.")
        checks = [
            (self.n_embd % self.n_head == 0, f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"),
            (self.use_mla or self.n_head % self.n_kv_head == 0,  # n_kv_head means nothing for MLA
             f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})"),
            (self.head_dim % 2 == 0, f"head_dim n_embd/n_head = {self.head_dim} must be even for RoPE"),
            (self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even"),
            (self.top_k <= self.num_experts, f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})"),
            (not (self.route_norm and self.top_k == 1),
             "route_norm=true with top_k=1 would make every weight 1.0 and kill the gate's gradient; set route_norm=false"),
            (self.num_experts % self.n_group == 0, f"num_experts ({self.num_experts}) must be divisible by n_group ({self.n_group})"),
            (self.topk_group <= self.n_group, f"topk_group ({self.topk_group}) must be <= n_group ({self.n_group})"),
            (self.top_k <= self.topk_group * (self.num_experts // self.n_group),
             f"top_k ({self.top_k}) exceeds the experts in topk_group ({self.topk_group}) groups"),
            (self.first_k_dense <= self.n_layer, f"first_k_dense ({self.first_k_dense}) must be <= n_layer ({self.n_layer})"),
            (self.activation in ("relu2", "swiglu"), f"activation must be 'relu2' or 'swiglu', got '{self.activation}'"
             + did_you_mean(self.activation, ["relu2", "swiglu"])),
            (self.tokenizer_vocab_size is None or 0 < self.tokenizer_vocab_size <= self.vocab_size,
             f"tokenizer_vocab_size ({self.tokenizer_vocab_size}) must be in 1..vocab_size ({self.vocab_size})"),
            (self.mtp_depth == 0, "mtp_depth > 0 (multi-token prediction) is not implemented yet; set mtp_depth = 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise NanodsError(message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> NanoDeepSeekConfig:
        """Build from plain values, checking names and types first (errors name the key and `where`)."""
        checked = check_fields(values, where)
        try:
            return cls(**checked)
        except NanodsError as e:  # a checkpoint's config: say which file holds the bad value
            raise NanodsError(f"{where}: {e}") from None


# use_mla / use_moe are constructor switches (InitVars) and, once built, read-only views of the
# stored truth. The properties are attached after @dataclass has captured the InitVar defaults.
NanoDeepSeekConfig.use_mla = property(lambda self: short_name(self.attention) in MLA_ATTENTIONS,  # type: ignore[attr-defined]
                                      doc="True when the attention is MLA-based.")
NanoDeepSeekConfig.use_moe = property(lambda self: short_name(self.ffn) == "moe",  # type: ignore[attr-defined]
                                      doc="True when the FFN is the mixture of experts.")


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
    "norm_eps": POSITIVE,
    "rope_theta": POSITIVE,
    "route_scale": POSITIVE,
    "bias_update_speed": NON_NEGATIVE,
    "aux_loss_alpha": NON_NEGATIVE,
    "mtp_loss_weight": NON_NEGATIVE,
}


def round_up(x: int, multiple: int) -> int:
    return max(multiple, (x + multiple - 1) // multiple * multiple)


def _resolve_switch(name: str, value: str | None, switch: str, flag: bool | None, on: str, off: str) -> str:
    if value is not None:
        return value
    return off if flag is not None and not flag else on


# Scale presets: small/base/large, plus tiny for tests and demos.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, num_experts=4, top_k=2,
                 vocab_size=1024, sequence_len=256),
    "small": dict(n_layer=6, n_head=4, n_kv_head=4, n_embd=384, num_experts=4, top_k=2, vocab_size=8192),
    "base": dict(n_layer=12, n_head=6, n_kv_head=6, n_embd=768, num_experts=8, top_k=2, vocab_size=32768),
    "large": dict(n_layer=24, n_head=12, n_kv_head=6, n_embd=1536, num_experts=8, top_k=2, vocab_size=32768),
}


def preset(scale: str) -> dict[str, Any]:
    if scale not in PRESETS:
        raise NanodsError(f"unknown scale '{scale}'{did_you_mean(scale, PRESETS)}; choose one of: {', '.join(PRESETS)}")
    return dict(PRESETS[scale])


# ---------------------------------------------------------------------------------------------
# Type checking of plain values (TOML, --set, checkpoint metadata)

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


def check_fields(values: dict[str, Any], where: str, cls: type = NanoDeepSeekConfig) -> dict[str, Any]:
    """Reject unknown keys (suggesting the closest) and wrongly typed values; return ints as floats where needed."""
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


# ---------------------------------------------------------------------------------------------
# nanods.toml

@dataclass
class TrainSettings:
    """[train]: how `nanods train` runs."""

    data: str = "stdlib"  # "stdlib", or a path: .txt file, folder, .jsonl with a "text" field
    extensions: list[str] = field(default_factory=lambda: [".py", ".txt", ".md"])  # for folder corpora
    tokenizer: str = "bpe"  # "bpe" (trained on the data, cached) or "byte"
    steps: int = 200  # total optimizer steps of the run
    time_budget: str | None = None  # e.g. "8m": plan the step count to fit (measured after a few steps)
    batch_size: int = 8  # sequences per optimizer step
    micro_batch_size: int | None = None  # sequences per forward and process (accumulation); -> batch_size / processes
    seq_len: int = 256
    optimizer: str = "adamw"  # "adamw", or "muon" (Muon on hidden matrices, AdamW on the rest)
    lr: float = 3e-3
    muon_lr: float | None = None  # Muon's own lr -> lr (its updates are scaled to AdamW's RMS)
    weight_decay: float = 0.1  # matrices only: never norms, biases or embeddings
    warmup_steps: int = 20
    decay_frac: float = 0.2  # the last fraction of steps decays the lr linearly to 0 (warmup-stable-decay)
    grad_clip: float = 1.0
    out: str = "runs/nanods"
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 1337
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 10  # progress lines when stderr is not a terminal
    sample_tokens: int = 200  # the sample printed at the end (0: none)
    compile: bool = False  # torch.compile the model
    parallel: str = "ddp"  # under torchrun: "ddp" or "fsdp" (FSDP2 fully_shard per block)

    def __post_init__(self) -> None:
        check_ranges(self, TRAIN_RANGES, "train.")
        micro = self.micro_batch_size or self.batch_size
        if self.batch_size % micro:
            raise NanodsError(f"train.micro_batch_size ({micro}) must divide train.batch_size ({self.batch_size})")
        if self.optimizer not in ("adamw", "muon"):
            raise NanodsError(f"unknown train.optimizer '{self.optimizer}'{did_you_mean(self.optimizer, ['adamw', 'muon'])}; "
                              "use adamw or muon")
        if self.time_budget is not None:
            parse_duration(self.time_budget)
        if self.parallel not in ("ddp", "fsdp"):
            raise NanodsError(f"train.parallel must be ddp or fsdp, got '{self.parallel}'")

    @property
    def budget_seconds(self) -> float | None:
        return parse_duration(self.time_budget) if self.time_budget else None


TRAIN_RANGES: dict[str, Range] = {
    **integers("seq_len", 1, MAX_SEQUENCE_LEN),
    **integers("steps eval_every log_every", 1),
    # every step draws its whole batch's offsets at once, every eval its batches': bounded, they cannot exhaust memory
    **integers("batch_size micro_batch_size", 1, 2**16),
    **integers("eval_batches", 1, 1000),
    **integers("warmup_steps", 0),
    "lr": POSITIVE,
    "muon_lr": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "decay_frac": Range(0.0, 1.0),
    "grad_clip": NON_NEGATIVE,  # 0: no clipping
    **integers("seed", 0, 2**63 - 1),  # torch.manual_seed takes at most a signed 64-bit value
}


def parse_duration(text: str) -> float:
    """'90s', '5m', '1.5h' or a plain number of seconds -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    raw = text.strip().lower()
    try:
        value = float(raw[:-1]) * units[raw[-1]] if raw and raw[-1] in units else float(raw)
    except ValueError:
        value = -1
    if not (0 < value < math.inf):  # also refuses nan
        raise NanodsError(f"time budget '{text}' is not a positive duration; use e.g. 90s, 5m or 1.5h")
    return value


# Training defaults per scale, applied like the model presets (before nanods.toml and the CLI).
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(steps=200, batch_size=8, seq_len=128, lr=1e-2, warmup_steps=5, eval_every=50),
    "small": dict(steps=2000, time_budget="8m", batch_size=8, seq_len=256, lr=2e-3, eval_every=50),
    "base": dict(steps=5000, batch_size=32, seq_len=512, lr=1e-3, eval_every=250),
    "large": dict(steps=10000, batch_size=64, seq_len=1024, lr=6e-4, eval_every=500),
}


@dataclass
class SampleSettings:
    """[sample]: defaults for `nanods sample`."""

    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = None
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        check_ranges(self, SAMPLE_RANGES, "sample.")


SAMPLE_RANGES: dict[str, Range] = {
    "temperature": NON_NEGATIVE,  # 0: greedy
    "top_p": Range(0.0, 1.0, low_open=True),
    **integers("top_k", 0),
    **integers("max_new_tokens", 1),
}


SECTIONS: dict[str, type] = {"model": NanoDeepSeekConfig, "train": TrainSettings, "sample": SampleSettings}
OPTION_TABLES = ("attention_options", "ffn_options", "router_options")


@dataclass
class Project:
    """A resolved project: the model config plus the train and sample settings."""

    model: NanoDeepSeekConfig
    train: TrainSettings
    sample: SampleSettings


def read_toml(path: str | Path) -> dict[str, Any]:
    """The tables of a project file; a missing file, bytes that are not UTF-8 or bad TOML are one clear error."""
    path = Path(path)
    if not path.is_file():
        raise NanodsError(f"config file '{path}' not found (create one with `nanods init`)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:  # a binary, e.g. a checkpoint given where a project file belongs
        raise NanodsError(f"'{path}' is not a nanods.toml project file: it is not UTF-8 text ({e.reason} at byte "
                          f"{e.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise NanodsError(f"{path} is not valid TOML: {e}") from None


def parse_set(assignments: list[str]) -> dict[str, dict[str, Any]]:
    """Turn ['model.n_layer=4', 'train.lr=1e-3'] into nested tables; values are TOML literals."""
    tables: dict[str, dict[str, Any]] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise NanodsError(f"--set expects section.key=value (e.g. model.n_layer=4), got '{item}'")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()  # bare words are strings: --set model.attention=mha
        target = tables.setdefault(section, {})
        if name.startswith(OPTION_TABLES) and "." in name:
            table, _, option = name.partition(".")
            target.setdefault(table, {})[option] = value
        else:
            target[name] = value
    return tables


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def command_line_values(cli: dict[str, dict[str, Any]] | None, sets: list[str] | None) -> dict[str, dict[str, Any]]:
    """What the command line sets, by section: the options given (None: not given), then --set on top."""
    given = {section: {k: v for k, v in table.items() if v is not None} for section, table in (cli or {}).items()}
    return _merge(given, parse_set(sets or []))


def resolve_project(
    toml: dict[str, Any] | None = None,
    scale: str | None = None,
    cli: dict[str, dict[str, Any]] | None = None,
    sets: list[str] | None = None,
    where: str = "nanods.toml",
) -> Project:
    """Resolve defaults -> preset -> nanods.toml -> command-line options -> --set; validate every key and component."""
    toml = toml or {}
    if cli or sets:  # values are merged before they are checked: name every place they may come from
        where = f"{where} or the command line"
    for section in toml:
        if section not in SECTIONS:
            raise NanodsError(f"unknown section [{section}] in {where}{did_you_mean(section, SECTIONS)}")
    layers = [toml, command_line_values(cli, sets)]
    merged: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for layer in layers:
        for section, values in layer.items():
            if section not in SECTIONS:
                raise NanodsError(f"unknown section '{section}'{did_you_mean(section, SECTIONS)}")
            if not isinstance(values, dict):
                raise NanodsError(f"[{section}] must be a table")
            merged[section] = _merge(merged[section], values)
    model_values = dict(merged["model"])
    chosen_scale = scale or model_values.pop("scale", None)
    model_values.pop("scale", None)
    if chosen_scale is not None and not isinstance(chosen_scale, str):
        raise NanodsError(f"model.scale must be a string, got {chosen_scale!r}")
    values = preset(chosen_scale) if chosen_scale else {}
    values.update(check_fields(model_values, f"[model] of {where}"))
    from nanods import registry  # late: config stays importable without the registry

    for group in ("attention", "ffn", "router"):
        if values.get(group) is not None:
            registry.find(group, values[group])
    model = NanoDeepSeekConfig(**values)
    registry.check_options(model)
    train_values = dict(TRAIN_PRESETS[chosen_scale]) if chosen_scale else {}
    given_train = check_fields(merged["train"], f"[train] of {where}", TrainSettings)
    if "steps" in given_train and "time_budget" not in given_train:  # a step count replaces the preset's budget
        train_values.pop("time_budget", None)
    train_values.update(given_train)
    train = TrainSettings(**train_values)
    sample = SampleSettings(**check_fields(merged["sample"], f"[sample] of {where}", SampleSettings))
    return Project(model=model, train=train, sample=sample)


def sample_settings(path: str | Path = "nanods.toml") -> tuple[SampleSettings, set[str]]:
    """[sample] of a project file when it exists (only that table is read), else the defaults; and the
    names of the settings the file sets."""
    table = read_toml(path).get("sample", {}) if Path(path).is_file() else {}
    return SampleSettings(**check_fields(table, f"[sample] of {path}", SampleSettings)), set(table)


def project_file(path: str | Path | None = None) -> Path | None:
    """The project file a command reads: path when given, else ./nanods.toml when present, else None."""
    if path is not None:
        return Path(path)
    return Path("nanods.toml") if Path("nanods.toml").is_file() else None


def load_project(path: str | Path | None = None, **kwargs: Any) -> Project:
    """Read a nanods.toml (or ./nanods.toml when present) and resolve it."""
    path = project_file(path)
    toml = read_toml(path) if path is not None else {}
    return resolve_project(toml, where=str(path or "defaults"), **kwargs)
