"""NanoDeepSeekConfig, every architectural choice of a model, and the scale presets.

nanods.project resolves a config from a project file and the command line; nanods.checks holds
the ranges and type checks it applies.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import InitVar, dataclass, field
from typing import Any

from nanods.checks import MODEL_RANGES, check_fields, check_ranges
from nanods.errors import NanodsError, did_you_mean

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
    # YaRN context extension (off at factor 1; DeepSeek-V3: 40, 4096, 32, 1, 1, 1), as transformers' rope_parameters
    rope_factor: float = 1.0  # factor: how many times longer the context is than the one trained on
    rope_original_len: int | None = None  # original_max_position_embeddings -> sequence_len / rope_factor
    rope_beta_fast: float = 32.0  # beta_fast: pairs turning more than this often in original_len keep their frequency
    rope_beta_slow: float = 1.0  # beta_slow: pairs turning less often are slowed by rope_factor; a ramp between
    rope_mscale: float = 1.0  # mscale: cos/sin scale m(mscale) / m(mscale_all_dim), m(s) = 0.1 s ln(rope_factor) + 1
    rope_mscale_all_dim: float = 1.0  # mscale_all_dim: MLA's softmax scale x m(mscale_all_dim)^2
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
    # DeepSeek Sparse Attention (attention = "dsa"): the lightning indexer and how many positions it keeps
    index_n_heads: int = 4
    index_head_dim: int | None = None  # -> 2 * qk_rope_head_dim (DeepSeek-V3.2: 128 with rope 64)
    index_topk: int | None = None  # -> sequence_len // 16, at least 16 (DeepSeek-V3.2: 2048 of 128K)
    # multi-token prediction: depth-k modules predict token t+k+1; their loss weight in training
    mtp_depth: int = 0
    mtp_loss_weight: float = 0.3
    # constructor-only switches of the original API
    use_mla: InitVar[bool | None] = None
    use_moe: InitVar[bool | None] = None

    def __post_init__(self, use_mla: bool | None, use_moe: bool | None) -> None:
        self.attention = _resolve_switch(self.attention, use_mla, "mla", "mha")
        self.ffn = _resolve_switch(self.ffn, use_moe, "moe", "dense")
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
        if self.index_head_dim is None:
            self.index_head_dim = 2 * self.qk_rope_head_dim
        if self.index_topk is None:
            self.index_topk = max(16, self.sequence_len // 16)
        if self.rope_original_len is None:
            factor = self.rope_factor if self.rope_factor >= 1 else 1.0  # below 1 or nan: refused by validate below
            self.rope_original_len = max(1, round(self.sequence_len / factor))
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

    @property
    def uses_indexer(self) -> bool:
        """True when the attention is DeepSeek Sparse Attention (its lightning indexer picks the positions)."""
        return short_name(self.attention) == "dsa"

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
            (self.rope_beta_fast >= self.rope_beta_slow,
             f"rope_beta_fast ({self.rope_beta_fast}) must be >= rope_beta_slow ({self.rope_beta_slow})"),
            (self.tokenizer_vocab_size is None or 0 < self.tokenizer_vocab_size <= self.vocab_size,
             f"tokenizer_vocab_size ({self.tokenizer_vocab_size}) must be in 1..vocab_size ({self.vocab_size})"),
            (not self.uses_indexer or self.q_lora_rank > 0,
             "attention 'dsa' needs query compression: its indexer reads the query latent; set q_lora_rank > 0"),
            (not self.uses_indexer or self.index_head_dim % 2 == 0,
             f"index_head_dim ({self.index_head_dim}) must be even: the indexer rotates pairs of dimensions"),
            (not self.uses_indexer or self.index_head_dim >= self.qk_rope_head_dim,
             f"index_head_dim ({self.index_head_dim}) must be >= qk_rope_head_dim ({self.qk_rope_head_dim}): the "
             "indexer's first qk_rope_head_dim dimensions carry the rotary embedding"),
            (self.mtp_depth < self.sequence_len,
             f"mtp_depth ({self.mtp_depth}) must be < sequence_len ({self.sequence_len}): depth k predicts k+1 tokens ahead"),
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
        checked = check_fields(values, where, cls)
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


def round_up(x: int, multiple: int) -> int:
    return max(multiple, (x + multiple - 1) // multiple * multiple)


def _resolve_switch(value: str | None, flag: bool | None, on: str, off: str) -> str:
    """The component named, else `off` when its switch is given False, else `on`."""
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


# Architecture profiles, applied after the scale preset (a file's or the command line's own keys still win):
# "nanochat" is the defaults (relu² experts, parameter-free norms); "deepseek" makes every choice DeepSeek-V3's.
PROFILES: dict[str, dict[str, Any]] = {
    "nanochat": {},
    "deepseek": dict(attention="mla", ffn="moe", router="sigmoid", activation="swiglu", norm_weights=True),
}


def profile_preset(name: str) -> dict[str, Any]:
    if name not in PROFILES:
        raise NanodsError(f"unknown profile '{name}'{did_you_mean(name, PROFILES)}; choose one of: {', '.join(PROFILES)}")
    return dict(PROFILES[name])
