"""Conversion of a nanods checkpoint to a Hugging Face `DeepseekV3ForCausalLM` directory (or
`DeepseekV32ForCausalLM` for the `dsa` attention), and back.

`to_hf(src, dst)` writes config.json, generation_config.json, model.safetensors (sharded with an
index past 5 GB), tokenizer.json and tokenizer_config.json into a temporary folder beside dst and
renames it to dst at the end, so a failure leaves nothing half-written. What the format cannot
hold (relu² experts, MHA, a softmax or plugin router, ...) is refused before anything is written.

Weight mapping: transformers rotates interleaved rope pairs
(2i, 2i+1) (`rope_interleave`, its default) where nanods rotates (i, i + D/2), so the rope rows of
each query head and of the shared rope key are reordered [0, D/2, 1, D/2+1, ...]; routed experts
are stored per expert (`mlp.experts.{e}.gate_proj/up_proj/down_proj`), as transformers saves them;
DSA's lightning indexer (`self_attn.indexer.*`) rotates half-split pairs on both sides and is copied.

`from_hf(src, dst)` reverses it: config.json (with transformers' defaults for absent keys) -> the
NanoDeepSeekConfig of the same model, every tensor's shape checked against it from the safetensors
headers before any data is read (per-expert or fused `mlp.experts.gate_up_proj` experts, one file or
shards), tokenizer.json -> the byte tokenizer or a byte-level BPE, written as one checkpoint file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes
from safetensors.torch import save_file
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from nanods import registry
from nanods.atomic import atomic_write, umask
from nanods.checkpoint import (
    WEIGHTS,
    check_tensor,
    config_from_metadata,
    load,
    stored_weights,
    weights_metadata,
)
from nanods.config import NanoDeepSeekConfig, short_name
from nanods.errors import NanodsError
from nanods.inspect import file_kind
from nanods.model import NanoDeepSeek
from nanods.safetensors_header import read_header
from nanods.tokenizer import EOT, N_BYTES, Tokenizer, byte_to_unicode

SHARD_BYTES = 5 * 1024**3  # transformers' default max_shard_size


def unsupported(config: NanoDeepSeekConfig) -> list[str]:
    """Every field of config a DeepseekV3ForCausalLM cannot express, each with what it would need."""
    problems = []
    try:
        dists = {group: c["dist"] for group, c in registry.describe(config).items()}
    except NanodsError:  # a component that is not installed: its name is checked below anyway
        dists = {}

    def plugin(group: str) -> bool:
        return dists.get(group, "nanods") != "nanods"

    def named(group: str, value: str) -> str:
        return f"{group}='{value}'" + (f" from {dists[group]}" if plugin(group) else "")

    if config.activation != "swiglu":
        problems.append(f"activation='{config.activation}' (needs 'swiglu')")
    if short_name(config.attention) not in ("mla", "dsa") or plugin("attention"):
        problems.append(f"{named('attention', config.attention)} (needs nanods' built-in 'mla' or 'dsa')")
    if short_name(config.ffn) not in ("moe", "dense") or plugin("ffn"):
        problems.append(f"{named('ffn', config.ffn)} (needs nanods' built-in 'moe' or 'dense')")
    moe = short_name(config.ffn) == "moe" and config.first_k_dense < config.n_layer
    if moe:
        if short_name(config.router) != "sigmoid" or plugin("router"):
            problems.append(f"{named('router', config.router)} (needs nanods' built-in 'sigmoid')")
        if config.n_shared_experts < 1:
            problems.append("n_shared_experts=0 (DeepseekV3 always has shared experts; needs >= 1)")
        per_group = config.num_experts // config.n_group
        if per_group < 2:  # transformers scores a group by its top two experts
            problems.append(f"num_experts/n_group={per_group} expert(s) per group (transformers scores a group by its "
                            "top two experts; needs >= 2)")
    return problems


def check_convertible(config: NanoDeepSeekConfig) -> None:
    problems = unsupported(config)
    if problems:
        raise NanodsError("cannot convert to Hugging Face DeepseekV3: " + "; ".join(problems)
                          + " (`--profile deepseek` trains a model it can hold)")


def hf_config(config: NanoDeepSeekConfig, eot_id: int | None, dtype: torch.dtype) -> dict[str, Any]:
    moe = short_name(config.ffn) == "moe"
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(config.rope_theta)}
    if config.rope_factor != 1:
        rope = {"rope_type": "yarn", "rope_theta": float(config.rope_theta), "factor": float(config.rope_factor),
                "original_max_position_embeddings": int(config.rope_original_len),
                "beta_fast": float(config.rope_beta_fast), "beta_slow": float(config.rope_beta_slow),
                "mscale": float(config.rope_mscale), "mscale_all_dim": float(config.rope_mscale_all_dim)}
    sparse = {"index_n_heads": config.index_n_heads, "index_head_dim": config.index_head_dim,
              "index_topk": config.index_topk} if config.uses_indexer else {}
    return {
        "architectures": ["DeepseekV32ForCausalLM" if sparse else "DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v32" if sparse else "deepseek_v3",
        **sparse,
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.ffn_hidden,
        "moe_intermediate_size": config.moe_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_head,
        "n_shared_experts": config.n_shared_experts,
        "n_routed_experts": config.num_experts,
        "routed_scaling_factor": float(config.route_scale),
        "kv_lora_rank": config.kv_lora_rank,
        "q_lora_rank": config.q_lora_rank or None,
        "qk_rope_head_dim": config.qk_rope_head_dim,
        "qk_nope_head_dim": config.qk_nope_head_dim,
        "v_head_dim": config.v_head_dim,
        "n_group": config.n_group,
        "topk_group": config.topk_group,
        "num_experts_per_tok": config.top_k,
        "first_k_dense_replace": config.first_k_dense if moe else config.n_layer,
        "norm_topk_prob": bool(config.route_norm),
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "hidden_act": "silu",
        "max_position_embeddings": config.sequence_len,
        "rms_norm_eps": float(config.norm_eps),
        "rope_parameters": rope,
        "rope_interleave": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "num_nextn_predict_layers": config.mtp_depth,
        "tie_word_embeddings": bool(config.tie_embeddings),
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "pad_token_id": None,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }


def interleave_rows(w: torch.Tensor, start: int, width: int, block: int, inverse: bool = False) -> torch.Tensor:
    """Reorder rows [start, start + width) of every `block` rows from nanods' half-split rope layout
    (pairs (i, i + width/2)) to transformers' interleaved one (pairs (2i, 2i + 1)); inverse=True: back."""
    order = torch.arange(width).view(2, width // 2).t().reshape(-1)  # [0, D/2, 1, D/2 + 1, ...]
    if inverse:
        order = order.argsort()
    w = w.clone()
    blocks = w.view(-1, block, *w.shape[1:])
    blocks[:, start:start + width] = blocks[:, start:start + width][:, order]
    return w


# DeepSeek-V3.2's lightning indexer, the same names in nanods (attn.indexer.) and transformers (self_attn.indexer.)
INDEXER_WEIGHTS = ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight")


def _routed(config: NanoDeepSeekConfig, layer: int) -> bool:
    """Whether layer (trunk index; MTP depth k is n_layer + k) holds routed experts."""
    return short_name(config.ffn) == "moe" and layer >= config.first_k_dense


def hf_state(model: NanoDeepSeek) -> dict[str, torch.Tensor]:
    """nanods weights -> transformers' DeepseekV3ForCausalLM keys, as saved on disk."""
    config = model.config
    sd = model.state_dict()
    dtype = sd["embed.weight"].dtype
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": sd["embed.weight"]}

    def norm(key: str, dim: int) -> torch.Tensor:
        return sd[key] if key in sd else torch.ones(dim, dtype=dtype)

    def swiglu(prefix: str, w_in: torch.Tensor, w_out: torch.Tensor) -> None:
        gate, up = w_in.chunk(2, dim=0)
        out[f"{prefix}.gate_proj.weight"], out[f"{prefix}.up_proj.weight"] = gate, up
        out[f"{prefix}.down_proj.weight"] = w_out

    nope, rope, C = config.qk_nope_head_dim, config.qk_rope_head_dim, config.n_embd

    def block(src: str, dst: str, moe: bool) -> None:
        out[dst + "input_layernorm.weight"] = norm(src + "attn_norm.weight", C)
        out[dst + "post_attention_layernorm.weight"] = norm(src + "ffn_norm.weight", C)
        a, b = src + "attn.", dst + "self_attn."
        if config.q_lora_rank:
            out[b + "q_a_proj.weight"] = sd[a + "wq_a.weight"]
            out[b + "q_a_layernorm.weight"] = norm(a + "q_norm.weight", config.q_lora_rank)
            out[b + "q_b_proj.weight"] = interleave_rows(sd[a + "wq_b.weight"], nope, rope, nope + rope)
        else:
            out[b + "q_proj.weight"] = interleave_rows(sd[a + "wq.weight"], nope, rope, nope + rope)
        wkv_a = sd[a + "wkv_a.weight"]
        out[b + "kv_a_proj_with_mqa.weight"] = interleave_rows(wkv_a, config.kv_lora_rank, rope, wkv_a.shape[0])
        out[b + "kv_a_layernorm.weight"] = norm(a + "kv_norm.weight", config.kv_lora_rank)
        out[b + "kv_b_proj.weight"] = sd[a + "wkv_b.weight"]
        out[b + "o_proj.weight"] = sd[a + "wo.weight"]
        for name in INDEXER_WEIGHTS if config.uses_indexer else ():  # its rope is half-split in both: a plain copy
            out[f"{b}indexer.{name}"] = sd[f"{a}indexer.{name}"]
        f, m = src + "ffn.", dst + "mlp"
        if moe:
            out[m + ".gate.weight"] = sd[f + "router.weight"].float()
            out[m + ".gate.e_score_correction_bias"] = sd[f + "router.expert_bias"].float()
            w_in, w_out = sd[f + "experts.w_in"], sd[f + "experts.w_out"]
            for e in range(config.num_experts):
                swiglu(f"{m}.experts.{e}", w_in[e], w_out[e])
            swiglu(f"{m}.shared_experts", sd[f + "shared.w_in.weight"], sd[f + "shared.w_out.weight"])
        else:
            swiglu(m, sd[f + "w_in.weight"], sd[f + "w_out.weight"])

    for i in range(config.n_layer):
        block(f"blocks.{i}.", f"model.layers.{i}.", _routed(config, i))
    head = sd["embed.weight"] if config.tie_embeddings else sd["lm_head.weight"]
    for k in range(config.mtp_depth):  # DeepSeek's layout: layer n_layer + k, with copies of the shared tensors
        src, dst = f"mtp.{k}.", f"model.layers.{config.n_layer + k}."
        block(src + "block.", dst, _routed(config, config.n_layer + k))
        out[dst + "enorm.weight"] = norm(src + "enorm.weight", C)
        out[dst + "hnorm.weight"] = norm(src + "hnorm.weight", C)
        out[dst + "eh_proj.weight"] = sd[src + "eh_proj.weight"]
        out[dst + "shared_head.norm.weight"] = norm(src + "norm.weight", C)
        out[dst + "embed_tokens.weight"] = sd["embed.weight"].clone()  # vLLM and SGLang read these copies
        out[dst + "shared_head.head.weight"] = head.clone()
    out["model.norm.weight"] = norm("norm.weight", config.n_embd)
    if not config.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def hf_tokenizer_json(tokenizer: Tokenizer) -> str:
    """A tokenizer.json the `tokenizers` library (and so AutoTokenizer) encodes to nanods' ids with."""
    if tokenizer.kind == "bpe":
        return tokenizer.to_json()
    # the byte tokenizer as a byte-level BPE with no merges: id b is byte b, 256 is <|endoftext|>
    vocab = {char: b for b, char in byte_to_unicode().items()}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(EOT, special=True)])
    if hf.token_to_id(EOT) != N_BYTES:
        raise NanodsError(f"internal: the exported byte tokenizer put {EOT} at {hf.token_to_id(EOT)}, not {N_BYTES}")
    return hf.to_str()


def _save_weights(state: dict[str, torch.Tensor], folder: Path) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        n = state[key].numel() * state[key].element_size()
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def resolve_source(src: str | Path) -> Path:
    kind, path = file_kind(Path(src))
    if kind != "checkpoint":
        raise NanodsError(f"'{src}' is not a nanods checkpoint; give the {WEIGHTS} that `nanods train` wrote, "
                          "or its run folder")
    return Path(path)


def to_hf(src: str | Path, dst: str | Path) -> Path:
    """Convert the nanods checkpoint at src (a ckpt.safetensors or its run folder) to a new HF folder dst."""
    dst = Path(dst)
    if dst.exists() or dst.is_symlink():
        raise NanodsError(f"'{dst}' already exists; give a new folder (nothing is overwritten)")
    path = resolve_source(src)
    check_convertible(config_from_metadata(read_header(path)[1], path))  # refused before loading or writing
    model, tokenizer = load(path)
    if tokenizer is None:
        raise NanodsError(f"'{path}' holds no tokenizer (it was imported without a tokenizer.json), and a Hugging "
                          "Face folder needs one; convert the original folder with its tokenizer.json")
    config = model.config
    state = hf_state(model)
    dtype = state["model.embed_tokens.weight"].dtype
    parent = dst.parent if str(dst.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=parent))
    try:
        _save_weights(state, tmp)
        exported = hf_config(config, tokenizer.eot_id, dtype) | {NANODS_KEY: config.to_dict()}  # for a round trip back
        (tmp / "config.json").write_text(json.dumps(exported, indent=2) + "\n")
        generation = {"bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id, "do_sample": False}
        real = config.tokenizer_vocab_size or len(tokenizer)
        if real < config.vocab_size:  # nanods never samples the padding ids; nor should generate()
            generation["suppress_tokens"] = list(range(real, config.vocab_size))
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        (tmp / "tokenizer.json").write_text(hf_tokenizer_json(tokenizer))
        tokenizer_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": EOT, "eos_token": EOT, "unk_token": None, "pad_token": None,
            "add_bos_token": False, "add_eos_token": False,
            "split_special_tokens": True,  # like nanods: "<|endoftext|>" inside a text is text
            "clean_up_tokenization_spaces": False,
            "model_max_length": config.sequence_len,
        }
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
        mask = umask()  # mkdtemp makes a private folder and safetensors may write private files: make them ordinary
        for written in tmp.iterdir():
            os.chmod(written, 0o666 & ~mask)
        os.chmod(tmp, 0o777 & ~mask)
        if dst.exists():
            raise NanodsError(f"'{dst}' appeared while converting; nothing is overwritten")
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


# ---------------------------------------------------------------------------------------------
# The other direction: a Hugging Face DeepseekV3ForCausalLM folder -> one nanods checkpoint file.

# DeepseekV3Config's defaults (transformers 5.25): what transformers builds when config.json omits a key
HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
    "first_k_dense_replace": 3, "norm_topk_prob": True, "hidden_act": "silu", "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_interleave": True, "attention_bias": False,
    "num_nextn_predict_layers": 1,
    "index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048,  # DeepseekV32Config's
}
# the exported config.json keeps the nanods config under this key, so a round trip restores what
# DeepseekV3 has no field for (n_kv_head, training-only fields, ...); it is used only while it agrees
# with every field transformers reads
NANODS_KEY = "nanods_config"


def _hf_value(hf: dict[str, Any], key: str) -> Any:
    value = hf.get(key, HF_DEFAULTS.get(key))
    if value is None and key in ("n_group", "topk_group"):
        return 1  # null: no expert groups
    return HF_DEFAULTS.get(key) if value is None else value


def _rope_fields(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """rope_parameters (or the older rope_scaling + rope_theta) -> NanoDeepSeekConfig's rope_* fields."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise NanodsError(f"{where}: rope_parameters is not a JSON object")
    if any(isinstance(v, dict) for v in rope.values()):
        raise NanodsError(f"{where}: per-layer rope_parameters are not supported (nanods uses one RoPE)")
    theta = rope.get("rope_theta") or hf.get("rope_theta") or 10000.0
    kind = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", 1.0) not in (None, 1, 1.0):
        raise NanodsError(f"{where}: partial_rotary_factor={rope['partial_rotary_factor']} is not supported (needs 1)")
    if kind == "default":
        return {"rope_theta": float(theta)}
    if kind != "yarn":
        raise NanodsError(f"{where}: rope_type '{kind}' is not supported (nanods has plain RoPE and YaRN)")
    if rope.get("attention_factor") is not None:
        raise NanodsError(f"{where}: an explicit YaRN attention_factor is not supported (nanods derives it from "
                          "factor, mscale and mscale_all_dim)")
    if rope.get("truncate", True) is not True:
        raise NanodsError(f"{where}: YaRN with truncate=false is not supported")
    original = rope.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings") \
        or _hf_value(hf, "max_position_embeddings")
    factor = rope.get("factor")
    if factor is None:
        factor = _hf_value(hf, "max_position_embeddings") / original
    return {"rope_theta": float(theta), "rope_factor": float(factor), "rope_original_len": int(original),
            "rope_beta_fast": float(rope.get("beta_fast") or 32), "rope_beta_slow": float(rope.get("beta_slow") or 1),
            # transformers: m(mscale)/m(mscale_all_dim) when both are set, else m(1); nanods' Rope has the same rule
            "rope_mscale": float(rope.get("mscale") or 0.0), "rope_mscale_all_dim": float(rope.get("mscale_all_dim") or 0.0)}


def nanods_config(hf: dict[str, Any], where: str = "config.json") -> NanoDeepSeekConfig:
    """A DeepseekV3 config.json's values -> the NanoDeepSeekConfig of the same model (what transformers
    reads, with its defaults for absent keys); what it cannot express is refused."""
    if hf.get("model_type") not in ("deepseek_v3", "deepseek_v32"):
        raise NanodsError(f"{where}: model_type is {hf.get('model_type')!r}, not 'deepseek_v3' or 'deepseek_v32'; "
                          "only DeepseekV3ForCausalLM and DeepseekV32ForCausalLM folders can be imported")
    sparse = hf["model_type"] == "deepseek_v32"
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?") if isinstance(hf["quantization_config"], dict) else "?"
        raise NanodsError(f"{where}: the weights are quantized ({method}, e.g. DeepSeek-V3's FP8); nanods imports "
                          "unquantized float weights only: dequantize them to bf16 first")
    if _hf_value(hf, "hidden_act") != "silu":
        raise NanodsError(f"{where}: hidden_act '{hf.get('hidden_act')}' is not supported (needs 'silu': SwiGLU)")
    if _hf_value(hf, "attention_bias"):
        raise NanodsError(f"{where}: attention_bias=true is not supported (nanods' projections have no bias)")
    if hf.get("scoring_func", "sigmoid") != "sigmoid":
        raise NanodsError(f"{where}: scoring_func '{hf['scoring_func']}' is not supported (needs 'sigmoid')")
    if _hf_value(hf, "num_experts_per_tok") == 1 and _hf_value(hf, "norm_topk_prob"):
        raise NanodsError(f"{where}: norm_topk_prob=true with num_experts_per_tok=1 (every routing weight is 1) "
                          "is not supported")
    n_layer, first_dense = _hf_value(hf, "num_hidden_layers"), _hf_value(hf, "first_k_dense_replace")
    moe = first_dense < n_layer
    values = {
        "sequence_len": _hf_value(hf, "max_position_embeddings"),
        "vocab_size": _hf_value(hf, "vocab_size"),
        "n_layer": n_layer,
        "n_head": _hf_value(hf, "num_attention_heads"),
        "n_kv_head": _hf_value(hf, "num_attention_heads"),  # meaningless for MLA
        "n_embd": _hf_value(hf, "hidden_size"),
        "kv_lora_rank": _hf_value(hf, "kv_lora_rank"),
        "num_experts": _hf_value(hf, "n_routed_experts"),
        "top_k": _hf_value(hf, "num_experts_per_tok"),
        "attention": "dsa" if sparse else "mla",
        "ffn": "moe" if moe else "dense",
        "router": "sigmoid",
        "norm_weights": True,
        "norm_eps": float(_hf_value(hf, "rms_norm_eps")),
        "activation": "swiglu",
        "tie_embeddings": bool(_hf_value(hf, "tie_word_embeddings")),
        "ffn_hidden": _hf_value(hf, "intermediate_size"),
        "q_lora_rank": hf.get("q_lora_rank", HF_DEFAULTS["q_lora_rank"]) or 0,
        "qk_rope_head_dim": _hf_value(hf, "qk_rope_head_dim"),
        "qk_nope_head_dim": _hf_value(hf, "qk_nope_head_dim"),
        "v_head_dim": _hf_value(hf, "v_head_dim"),
        "n_shared_experts": _hf_value(hf, "n_shared_experts"),
        "moe_hidden": _hf_value(hf, "moe_intermediate_size"),
        "first_k_dense": first_dense if moe else 0,
        "route_scale": float(_hf_value(hf, "routed_scaling_factor")),
        "route_norm": bool(_hf_value(hf, "norm_topk_prob")),
        "n_group": _hf_value(hf, "n_group"),
        "topk_group": _hf_value(hf, "topk_group"),
        "mtp_depth": _hf_value(hf, "num_nextn_predict_layers"),
        **({key: _hf_value(hf, key) for key in ("index_n_heads", "index_head_dim", "index_topk")} if sparse else {}),
        **_rope_fields(hf, where),
    }
    return NanoDeepSeekConfig.from_dict(values, where)


def hf_plan(config: NanoDeepSeekConfig, fused: set[int], interleaved: bool) -> tuple[
        dict[str, tuple[int, ...]], dict[str, Any]]:
    """({HF key: expected shape}, {nanods key: (HF keys, assemble)}) for the model config describes;
    `fused`: the layers whose experts are stored as mlp.experts.gate_up_proj/down_proj."""
    with torch.device("meta"):
        model = NanoDeepSeek(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        shapes.pop("lm_head.weight")
    hf: dict[str, tuple[int, ...]] = {}
    plan: dict[str, Any] = {}
    nope, rope = config.qk_nope_head_dim, config.qk_rope_head_dim

    def same(ours: str, theirs: str, fix: Any = None) -> None:
        hf[theirs] = shapes[ours]
        plan[ours] = ([theirs], (lambda t: fix(t[0])) if fix else (lambda t: t[0]))

    def swiglu(ours_in: str, ours_out: str, prefix: str) -> None:
        rows, cols = shapes[ours_in]
        hf[prefix + ".gate_proj.weight"] = hf[prefix + ".up_proj.weight"] = (rows // 2, cols)
        hf[prefix + ".down_proj.weight"] = shapes[ours_out]
        plan[ours_in] = ([prefix + ".gate_proj.weight", prefix + ".up_proj.weight"], lambda t: torch.cat(t, 0))
        plan[ours_out] = ([prefix + ".down_proj.weight"], lambda t: t[0])

    def rope_fix(start: int, width: int, block: int | None) -> Any:
        if not interleaved:
            return None
        return lambda t: interleave_rows(t, start, width, block or t.shape[0], inverse=True)

    def block(src: str, dst: str, moe: bool, fused_experts: bool) -> None:
        same(src + "attn_norm.weight", dst + "input_layernorm.weight")
        same(src + "ffn_norm.weight", dst + "post_attention_layernorm.weight")
        a, b = src + "attn.", dst + "self_attn."
        if config.q_lora_rank:
            same(a + "wq_a.weight", b + "q_a_proj.weight")
            same(a + "q_norm.weight", b + "q_a_layernorm.weight")
            same(a + "wq_b.weight", b + "q_b_proj.weight", rope_fix(nope, rope, nope + rope))
        else:
            same(a + "wq.weight", b + "q_proj.weight", rope_fix(nope, rope, nope + rope))
        same(a + "wkv_a.weight", b + "kv_a_proj_with_mqa.weight", rope_fix(config.kv_lora_rank, rope, None))
        same(a + "kv_norm.weight", b + "kv_a_layernorm.weight")
        same(a + "wkv_b.weight", b + "kv_b_proj.weight")
        same(a + "wo.weight", b + "o_proj.weight")
        for name in INDEXER_WEIGHTS if config.uses_indexer else ():
            same(f"{a}indexer.{name}", f"{b}indexer.{name}")
        f, m = src + "ffn.", dst + "mlp"
        if not moe:
            swiglu(f + "w_in.weight", f + "w_out.weight", m)
            return
        same(f + "router.weight", m + ".gate.weight")
        same(f + "router.expert_bias", m + ".gate.e_score_correction_bias")
        if fused_experts:
            same(f + "experts.w_in", m + ".experts.gate_up_proj")
            same(f + "experts.w_out", m + ".experts.down_proj")
        else:
            n_exp, rows, cols = shapes[f + "experts.w_in"]
            out_shape = shapes[f + "experts.w_out"][1:]
            gates, ups, downs = [], [], []
            for e in range(n_exp):
                p = f"{m}.experts.{e}"
                hf[p + ".gate_proj.weight"] = hf[p + ".up_proj.weight"] = (rows // 2, cols)
                hf[p + ".down_proj.weight"] = out_shape
                gates.append(p + ".gate_proj.weight"), ups.append(p + ".up_proj.weight")
                downs.append(p + ".down_proj.weight")
            plan[f + "experts.w_in"] = (gates + ups, lambda t, n=n_exp: torch.cat(
                [torch.stack(t[:n]), torch.stack(t[n:])], dim=1))
            plan[f + "experts.w_out"] = (downs, lambda t: torch.stack(t))
        swiglu(f + "shared.w_in.weight", f + "shared.w_out.weight", m + ".shared_experts")

    same("embed.weight", "model.embed_tokens.weight")
    for i in range(config.n_layer):
        block(f"blocks.{i}.", f"model.layers.{i}.", _routed(config, i), i in fused)
    for k in range(config.mtp_depth):
        src, dst, layer = f"mtp.{k}.", f"model.layers.{config.n_layer + k}.", config.n_layer + k
        block(src + "block.", dst, _routed(config, layer), layer in fused)
        for ours, theirs in (("enorm", "enorm"), ("hnorm", "hnorm"), ("eh_proj", "eh_proj"),
                             ("norm", "shared_head.norm")):
            same(f"{src}{ours}.weight", f"{dst}{theirs}.weight")
    same("norm.weight", "model.norm.weight")
    if not config.tie_embeddings:
        same("lm_head.weight", "lm_head.weight")
    missing = shapes.keys() - plan.keys()
    if missing:  # a config whose model has tensors DeepseekV3 lacks: nanods_config refuses those first
        raise NanodsError(f"internal: no Hugging Face tensor for {sorted(missing)[:3]}")
    return hf, plan


def _hf_files(folder: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """{HF key: (shard, header entry)} from model.safetensors or the shards of model.safetensors.index.json."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise NanodsError(f"'{index}' is damaged: not a JSON object with a weight_map") from None
        if any(Path(s).name != s for s in shards):
            raise NanodsError(f"'{index}' names a shard outside its folder")
    elif (folder / "model.safetensors").is_file():
        weight_map, shards = None, ["model.safetensors"]
    else:
        raise NanodsError(f"'{folder}' has no model.safetensors nor model.safetensors.index.json (only safetensors "
                          "weights are read, never pickled .bin files)")
    found: dict[str, tuple[Path, dict[str, Any]]] = {}
    for shard in shards:
        path = folder / shard
        header, _ = read_header(path)  # refuses a missing, damaged or truncated shard
        for key, info in header.items():
            if key in found:
                raise NanodsError(f"'{folder}' stores tensor '{key}' twice ({found[key][0].name} and {shard})")
            found[key] = (path, info)
    if weight_map is not None:
        for key, shard in weight_map.items():
            if key not in found or found[key][0].name != shard:
                raise NanodsError(f"'{index}' places '{key}' in {shard}, which does not hold it")
    return found


def _hf_tokenizer(folder: Path, config: NanoDeepSeekConfig) -> Tokenizer | None:
    """tokenizer.json -> the nanods tokenizer it is (the byte tokenizer as to_hf wrote it, or a byte-level BPE);
    None without a tokenizer.json."""
    path = folder / "tokenizer.json"
    if not path.is_file():  # imported without one: inspect works, sample and train --init-from refuse
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        obj = json.loads(text)
        hf = HFTokenizer.from_str(text)
    except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception)
        raise NanodsError(f"'{path}' is not a tokenizer the tokenizers library reads "
                          f"({str(e).splitlines()[0][:200]})") from None
    if not (isinstance(obj, dict) and isinstance(obj.get("model"), dict) and obj["model"].get("type") == "BPE"):
        raise NanodsError(f"'{path}' is not a byte-level BPE; nanods can only hold a byte-level BPE with {EOT}")
    if hf.token_to_id(EOT) is None:
        raise NanodsError(f"'{path}' has no {EOT} token; nanods can only hold a byte-level BPE with {EOT} "
                          "as its document separator")
    special = {t.content for t in hf.get_added_tokens_decoder().values()}
    alphabet = byte_to_unicode()
    vocab = hf.get_vocab(with_added_tokens=True)
    if sorted(vocab.values()) != list(range(len(vocab))) or any(
            t not in special and not set(t) <= set(alphabet.values()) for t in vocab):
        raise NanodsError(f"'{path}' is not a byte-level BPE (tokens outside GPT-2's byte alphabet, or gaps "
                          f"in its ids); nanods can only hold a byte-level BPE with {EOT}")
    if not obj["model"].get("merges") and vocab == {**{c: b for b, c in alphabet.items()}, EOT: N_BYTES}:
        tokenizer = Tokenizer()  # nanods' byte tokenizer, as to_hf writes it
    else:
        tokenizer = Tokenizer(hf)
    probe = "Hello, wörld ✓\n\t  x <|endoftext|>"
    if tokenizer.decode(tokenizer.encode(probe)) != probe or (
            tokenizer.kind == "byte" and Tokenizer(hf).encode(probe) != tokenizer.encode(probe)):
        raise NanodsError(f"'{path}' does not decode what it encodes byte for byte; nanods can only hold a "
                          f"byte-level BPE with {EOT}")
    if len(tokenizer) > config.vocab_size:
        raise NanodsError(f"'{path}' has {len(tokenizer):,} ids but the model's vocab_size is {config.vocab_size:,}")
    return tokenizer


def _stored_config(hf: dict[str, Any], derived: NanoDeepSeekConfig, tokenizer: Tokenizer | None
                   ) -> NanoDeepSeekConfig:
    """The nanods config to_hf kept in config.json, when it describes this very model; else `derived`
    with the tokenizer's real size."""
    real = len(tokenizer) if tokenizer is not None else None
    fallback = NanoDeepSeekConfig(**{**derived.to_dict(), "tokenizer_vocab_size": real})
    stored = hf.get(NANODS_KEY)
    if not isinstance(stored, dict):
        return fallback
    try:
        config = NanoDeepSeekConfig.from_dict(stored, NANODS_KEY)
    except NanodsError:
        return fallback
    eot = tokenizer.eot_id if tokenizer is not None else None
    agrees = (not unsupported(config) and hf_config(config, eot, torch.float32) == hf_config(derived, eot, torch.float32)
              and real == (config.tokenizer_vocab_size or real))
    return config if agrees else fallback


def from_hf(src: str | Path, dst: str | Path) -> Path:
    """Convert the Hugging Face DeepseekV3ForCausalLM folder src to a new nanods checkpoint file dst."""
    src, dst = Path(src), Path(dst)
    if dst.exists() or dst.is_symlink():
        raise NanodsError(f"'{dst}' already exists; give a new .safetensors file (nothing is overwritten)")
    if dst.suffix != ".safetensors":
        raise NanodsError(f"'{dst}': give a new .safetensors file for the nanods checkpoint")
    try:
        hf = json.loads((src / "config.json").read_text())
    except FileNotFoundError:
        raise NanodsError(f"'{src}' has no config.json; give a Hugging Face model folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NanodsError(f"'{src / 'config.json'}' is not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise NanodsError(f"'{src / 'config.json'}' is not a JSON object")
    where = str(src / "config.json")
    derived = nanods_config(hf, where)
    tokenizer = _hf_tokenizer(src, derived)
    config = _stored_config(hf, derived, tokenizer)
    found = _hf_files(src)
    n_layer = config.n_layer
    mtp = range(n_layer, n_layer + config.mtp_depth)
    if config.mtp_depth and not any(k.startswith(f"model.layers.{n_layer}.") for k in found):
        # transformers' save_pretrained keeps num_nextn_predict_layers but drops the MTP layers' weights
        config = NanoDeepSeekConfig(**{**config.to_dict(), "mtp_depth": 0})
    copies = ("embed_tokens.weight", "shared_head.head.weight")  # an MTP layer's copies of the shared tensors
    ignored = {k for k in found if k.endswith("rotary_emb.inv_freq")
               or any(k.startswith(f"model.layers.{i}.") and (not config.mtp_depth or k.endswith(copies)) for i in mtp)}
    if config.tie_embeddings:
        ignored.add("lm_head.weight")  # transformers ties it to the embedding, as nanods does
    fused = {i for i in range(n_layer + config.mtp_depth) if f"model.layers.{i}.mlp.experts.gate_up_proj" in found}
    interleaved = config.uses_indexer or _hf_value(hf, "rope_interleave") is not False  # DeepseekV32 always is
    shapes, plan = hf_plan(config, fused, interleaved)
    present = found.keys() - ignored
    missing, unexpected = sorted(shapes.keys() - present), sorted(present - shapes.keys())
    if missing or unexpected:
        raise NanodsError(f"'{src}' does not match its config.json: missing {missing[:3]}"
                          f"{f' (+{len(missing) - 3})' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                          f"{f' (+{len(unexpected) - 3})' if len(unexpected) > 3 else ''}")
    for key, shape in shapes.items():
        path, info = found[key]
        if tuple(info["shape"]) != shape:
            raise NanodsError(f"'{path}' does not fit its config.json: tensor '{key}' is {info['shape']}, "
                              f"expected {list(shape)}")
        if info["dtype"] not in ("F32", "BF16", "F16", "F64"):
            raise NanodsError(f"'{path}': tensor '{key}' is {info['dtype']}; nanods imports float weights only "
                              "(dequantize FP8 weights to bf16 first)")
    handles: dict[Path, Any] = {}
    try:
        for path, _ in found.values():
            if path not in handles:
                handles[path] = safe_open(str(path), "pt")

        def tensor(key: str) -> torch.Tensor:
            return handles[found[key][0]].get_tensor(key).float()

        with torch.device("meta"):
            expected = NanoDeepSeek(config).state_dict()
        state = {}
        for ours, (keys, assemble) in plan.items():
            state[ours] = assemble([tensor(k) for k in keys]).to(expected[ours].dtype).contiguous()
            check_tensor(found[keys[0]][0], ours, state[ours], expected[ours].shape, expected[ours].dtype,
                         f"from {keys[0]}" + (f" and {len(keys) - 1} more" if len(keys) > 1 else ""))
    finally:
        handles.clear()
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]  # stored_weights drops it again, as save does
    meta = weights_metadata(config, tokenizer, 0, {"converted_from": str(src)}, None)
    meta["nanods.run"] = uuid.uuid4().hex[:16]
    data = save_bytes(stored_weights(state, config), meta)
    if dst.exists() or dst.is_symlink():
        raise NanodsError(f"'{dst}' appeared while converting; nothing is overwritten")
    atomic_write(dst, data)
    return dst


def convert(src: str | Path, dst: str | Path) -> Path:
    """`nanods convert`: a Hugging Face folder (with config.json) -> a nanods checkpoint file, or a nanods
    checkpoint (or run folder) -> a Hugging Face folder."""
    src = Path(src)
    if src.is_dir() and not (src / WEIGHTS).is_file():
        if not (src / "config.json").is_file():
            raise NanodsError(f"'{src}' holds neither a nanods {WEIGHTS} nor a Hugging Face config.json; give a "
                              "checkpoint, a run folder or a Hugging Face model folder")
        return from_hf(src, dst)
    return to_hf(src, dst)
