"""Conversion of a nanods checkpoint to a Hugging Face `DeepseekV3ForCausalLM` directory.

`to_hf(src, dst)` writes config.json, generation_config.json, model.safetensors (sharded with an
index past 5 GB), tokenizer.json and tokenizer_config.json into a temporary folder beside dst and
renames it to dst at the end, so a failure leaves nothing half-written. What the format cannot
hold (relu² experts, MHA, a softmax or plugin router, ...) is refused before anything is written.

Weight mapping: transformers rotates interleaved rope pairs
(2i, 2i+1) (`rope_interleave`, its default) where nanods rotates (i, i + D/2), so the rope rows of
each query head and of the shared rope key are reordered [0, D/2, 1, D/2+1, ...]; routed experts
are stored per expert (`mlp.experts.{e}.gate_proj/up_proj/down_proj`), as transformers saves them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from nanods import registry
from nanods.atomic import umask
from nanods.checkpoint import WEIGHTS, config_from_metadata, load
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
    if short_name(config.attention) != "mla" or plugin("attention"):
        problems.append(f"{named('attention', config.attention)} (needs nanods' built-in 'mla')")
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
    if config.mtp_depth:
        problems.append(f"mtp_depth={config.mtp_depth} (multi-token prediction is not exported; needs 0)")
    return problems


def check_convertible(config: NanoDeepSeekConfig) -> None:
    problems = unsupported(config)
    if problems:
        raise NanodsError("cannot convert to Hugging Face DeepseekV3: " + "; ".join(problems)
                          + " (`--profile deepseek` trains a model it can hold)")


def hf_config(config: NanoDeepSeekConfig, tokenizer: Tokenizer, dtype: torch.dtype) -> dict[str, Any]:
    moe = short_name(config.ffn) == "moe"
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(config.rope_theta)}
    if config.rope_factor != 1:
        rope = {"rope_type": "yarn", "rope_theta": float(config.rope_theta), "factor": float(config.rope_factor),
                "original_max_position_embeddings": int(config.rope_original_len),
                "beta_fast": float(config.rope_beta_fast), "beta_slow": float(config.rope_beta_slow),
                "mscale": float(config.rope_mscale), "mscale_all_dim": float(config.rope_mscale_all_dim)}
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
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
        "num_nextn_predict_layers": 0,
        "tie_word_embeddings": bool(config.tie_embeddings),
        "bos_token_id": tokenizer.eot_id,
        "eos_token_id": tokenizer.eot_id,
        "pad_token_id": None,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }


def interleave_rows(w: torch.Tensor, start: int, width: int, block: int) -> torch.Tensor:
    """Reorder rows [start, start + width) of every `block` rows from nanods' half-split rope layout
    (pairs (i, i + width/2)) to transformers' interleaved one (pairs (2i, 2i + 1))."""
    order = torch.arange(width).view(2, width // 2).t().reshape(-1)  # [0, D/2, 1, D/2 + 1, ...]
    w = w.clone()
    blocks = w.view(-1, block, *w.shape[1:])
    blocks[:, start:start + width] = blocks[:, start:start + width][:, order]
    return w


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

    nope, rope = config.qk_nope_head_dim, config.qk_rope_head_dim
    for i in range(config.n_layer):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = norm(src + "attn_norm.weight", config.n_embd)
        out[dst + "post_attention_layernorm.weight"] = norm(src + "ffn_norm.weight", config.n_embd)
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
        f, m = src + "ffn.", dst + "mlp"
        if short_name(config.ffn) == "moe" and i >= config.first_k_dense:
            out[m + ".gate.weight"] = sd[f + "router.weight"].float()
            out[m + ".gate.e_score_correction_bias"] = sd[f + "router.expert_bias"].float()
            w_in, w_out = sd[f + "experts.w_in"], sd[f + "experts.w_out"]
            for e in range(config.num_experts):
                swiglu(f"{m}.experts.{e}", w_in[e], w_out[e])
            swiglu(f"{m}.shared_experts", sd[f + "shared.w_in.weight"], sd[f + "shared.w_out.weight"])
        else:
            swiglu(m, sd[f + "w_in.weight"], sd[f + "w_out.weight"])
    out["model.norm.weight"] = norm("norm.weight", config.n_embd)
    if not config.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def hf_tokenizer_json(tokenizer: Tokenizer) -> str:
    """A tokenizer.json the `tokenizers` library (and so AutoTokenizer) encodes to nanods' ids with."""
    if tokenizer.kind == "bpe":
        return tokenizer.to_json()
    # the byte tokenizer as a byte-level BPE with no merges: id b is byte b, 256 is <|endoftext|>
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab = {char: b for b, char in byte_to_unicode().items()}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(EOT, special=True)])
    if hf.token_to_id(EOT) != N_BYTES:
        raise NanodsError(f"internal: the exported byte tokenizer put {EOT} at {hf.token_to_id(EOT)}, not {N_BYTES}")
    return hf.to_str()


def _save_weights(state: dict[str, torch.Tensor], folder: Path) -> None:
    from safetensors.torch import save_file

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
    config = model.config
    state = hf_state(model)
    dtype = state["model.embed_tokens.weight"].dtype
    parent = dst.parent if str(dst.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=parent))
    try:
        _save_weights(state, tmp)
        (tmp / "config.json").write_text(json.dumps(hf_config(config, tokenizer, dtype), indent=2) + "\n")
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

