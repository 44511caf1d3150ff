"""The project file (nanods.toml) and the settings a command runs with.

Resolution order: dataclass defaults -> preset -> profile -> nanods.toml -> command-line options -> --set.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanods import registry
from nanods.checks import SAMPLE_RANGES, TRAIN_RANGES, check_fields, check_ranges
from nanods.config import NanoDeepSeekConfig, preset, profile_preset
from nanods.errors import NanodsError, did_you_mean

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


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
    fast_paths: bool = True  # nanods.fast_paths: explicit short bf16 attention on CPU (and the final sample's decode)
    parallel: str = "ddp"  # under torchrun: "ddp" or "fsdp" (FSDP2 fully_shard per block)
    # attention = "dsa": the first dsa_dense_steps attend densely while the indexer learns the attention's
    # distribution; with dsa_dense_frozen (default: when --init-from) nothing else learns in those steps
    dsa_dense_steps: int = 50
    dsa_dense_frozen: bool | None = None

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
    fast_paths: bool = True  # decode with nanods.fast_paths (false: the plain model)

    def __post_init__(self) -> None:
        check_ranges(self, SAMPLE_RANGES, "sample.")


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


def take_choice(model_values: dict[str, Any], key: str, option: str | None) -> str | None:
    """The --scale or --profile option when given, else model_values' key of that name (taken out either way)."""
    given = model_values.pop(key, None)
    chosen = option or given
    if chosen is not None and not isinstance(chosen, str):
        raise NanodsError(f"model.{key} must be a string, got {chosen!r}")
    return chosen


def starting_model_values(scale: str | None, profile: str | None) -> dict[str, Any]:
    """The model values the file's keys go on top of: the scale's preset, then the profile's choices."""
    return {**(preset(scale) if scale else {}), **(profile_preset(profile) if profile else {})}


def resolve_project(
    toml: dict[str, Any] | None = None,
    scale: str | None = None,
    cli: dict[str, dict[str, Any]] | None = None,
    sets: list[str] | None = None,
    where: str = "nanods.toml",
    profile: str | None = None,
    model_base: dict[str, Any] | None = None,
) -> Project:
    """Resolve defaults -> preset -> profile -> nanods.toml -> command-line options -> --set; validate every key
    and component. model_base replaces the preset and profile as the model's starting values (--init-from:
    the checkpoint's model, which the options then adjust)."""
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
    chosen_scale = take_choice(model_values, "scale", scale)
    chosen_profile = take_choice(model_values, "profile", profile)
    values = dict(model_base) if model_base is not None else starting_model_values(chosen_scale, chosen_profile)
    values.update(check_fields(model_values, f"[model] of {where}", NanoDeepSeekConfig))
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
