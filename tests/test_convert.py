"""`nanods convert`: a nanods checkpoint -> a Hugging Face DeepseekV3ForCausalLM folder."""

import json

import pytest
import torch
from conftest import build, main_in_process

from nanods import checkpoint
from nanods.convert import to_hf
from nanods.errors import NanodsError
from nanods.tokenizer import byte_tokenizer, train_bpe

transformers = pytest.importorskip("transformers", reason="the conversion is checked against transformers' DeepseekV3")

DEEPSEEK = dict(activation="swiglu", norm_weights=True, vocab_size=320, tokenizer_vocab_size=257, sequence_len=64)
CONFIGS = {
    "q_lora": dict(q_lora_rank=16, first_k_dense=0, n_shared_experts=1, tie_embeddings=False),
    "no_q_lora": dict(q_lora_rank=0, first_k_dense=1, n_shared_experts=2, tie_embeddings=True),
    "dense_first_tied": dict(q_lora_rank=24, first_k_dense=1, n_shared_experts=1, tie_embeddings=True, top_k=1,
                             route_norm=False, route_scale=2.5),
    "groups": dict(q_lora_rank=0, num_experts=8, n_group=4, topk_group=2, top_k=3, n_shared_experts=2),
    "all_dense": dict(ffn="dense", q_lora_rank=16),
    "yarn": dict(q_lora_rank=16, rope_factor=4.0, rope_original_len=16, rope_mscale=0.7, rope_mscale_all_dim=0.7),
}


def _random_model(seed, **overrides):
    model = build(seed, **{**DEEPSEEK, **overrides})
    with torch.no_grad():  # norms and expert biases away from their initial ones and zeros, so a missed copy shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "_norm" in name:
                p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.uniform_(-0.05, 0.05)
    return model


def _save(tmp_path, model, tokenizer=None):
    return checkpoint.save(tmp_path / "run", model, model.config, tokenizer or byte_tokenizer(), 1, {}, {}, {})


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_loads_the_same_model(name, tmp_path):
    model = _random_model(list(CONFIGS).index(name), **CONFIGS[name]).eval()
    src = _save(tmp_path, model)
    dst = to_hf(src.parent, tmp_path / "hf")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(dst, output_loading_info=True, dtype=torch.float32)
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hf.eval()
    torch.manual_seed(1)
    idx = torch.randint(0, 257, (2, 40))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    delta = (ours - theirs).abs().max().item()
    print(f"{name}: max |dlogit| = {delta:.2e}")
    assert delta <= 1e-4, delta
    prompt = idx[:1, :8]
    want = model.generate(prompt, 20, temperature=0)[0, 8:].tolist()
    got = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None,
                      attention_mask=torch.ones_like(prompt))[0, 8:].tolist()
    assert got == want


def test_config_and_tokenizer_files(tmp_path):
    texts = ["def main():\n    return 42\n", "héllo wörld <|endoftext|> ünïcode ✓"] * 20
    bpe = train_bpe(texts, 300)
    model = _random_model(0, **{**CONFIGS["q_lora"], "tokenizer_vocab_size": len(bpe)})
    dst = to_hf(_save(tmp_path, model, bpe), tmp_path / "hf")
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["num_key_value_heads"] == model.config.n_head
    assert config["eos_token_id"] == bpe.eot_id and config["max_position_embeddings"] == 64
    generation = json.loads((dst / "generation_config.json").read_text())
    assert generation["suppress_tokens"] == list(range(len(bpe), 320))
    hf_tok = transformers.AutoTokenizer.from_pretrained(dst)
    for text in texts[:2] + ["", "  spaces\tand\ttabs  \n"]:
        ids = bpe.encode(text)
        assert hf_tok.encode(text, add_special_tokens=False) == ids
        assert hf_tok.decode(ids) == text
    assert hf_tok.eos_token_id == bpe.eot_id


def test_byte_tokenizer_round_trips(tmp_path):
    model = _random_model(0, **CONFIGS["q_lora"])
    dst = to_hf(_save(tmp_path, model), tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(dst)
    tok = byte_tokenizer()
    for text in ["abc", "héllo ✓ <|endoftext|>\n\t x", ""]:
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf_tok.decode(tok.encode(text)) == text
    assert hf_tok.convert_tokens_to_ids("<|endoftext|>") == tok.eot_id == 256


@pytest.mark.parametrize("overrides,words", [
    (dict(activation="relu2"), ["activation='relu2'", "swiglu"]),
    (dict(attention="mha"), ["attention='mha'", "mla"]),
    (dict(router="softmax"), ["router='softmax'", "sigmoid"]),
    (dict(activation="relu2", attention="mha"), ["activation='relu2'", "attention='mha'"]),
    (dict(n_shared_experts=0), ["n_shared_experts=0"]),
    (dict(num_experts=4, n_group=4, topk_group=2), ["per group"]),
])
def test_what_the_format_cannot_hold_is_one_line(overrides, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = build(0, **{**DEEPSEEK, "q_lora_rank": 16, **overrides})
    src = _save(tmp_path, model)
    code, _out, err = main_in_process(["convert", str(src), "hf"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1, err
    assert all(w in lines[0] for w in words), err
    assert "Traceback" not in err
    assert not (tmp_path / "hf").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_an_existing_destination_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    src = _save(tmp_path, build(0, **DEEPSEEK, q_lora_rank=16))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    code, _out, err = main_in_process(["convert", str(src.parent), "hf"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "already exists" in lines[0], err
    assert (tmp_path / "hf" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["keep.txt"]


def test_the_cli_converts(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    src = _save(tmp_path, build(0, **DEEPSEEK, q_lora_rank=16))
    code, out, err = main_in_process(["convert", str(src.parent), "out/hf"], capsys)
    assert code == 0, err
    assert "out/hf" in out
    names = sorted(p.name for p in (tmp_path / "out" / "hf").iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["hf"]  # no temporary folder left


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    from nanods import convert

    src = _save(tmp_path, build(0, **DEEPSEEK, q_lora_rank=16))

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(convert, "hf_tokenizer_json", boom)
    with pytest.raises(OSError):
        to_hf(src, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_project_file_is_not_a_checkpoint(tmp_path):
    (tmp_path / "nanods.toml").write_text("[model]\n")
    with pytest.raises(NanodsError, match="not a nanods checkpoint"):
        to_hf(tmp_path / "nanods.toml", tmp_path / "hf")


def test_large_models_are_sharded_with_an_index(tmp_path, monkeypatch):
    from nanods import convert

    monkeypatch.setattr(convert, "SHARD_BYTES", 100_000)
    model = _random_model(5, **CONFIGS["q_lora"]).eval()
    dst = to_hf(_save(tmp_path, model), tmp_path / "hf")
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (dst / "model.safetensors").exists()
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(dst, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    idx = torch.randint(0, 257, (1, 16))
    with torch.no_grad():
        assert (model(idx) - hf.eval()(idx).logits).abs().max().item() <= 1e-4


def test_written_files_are_not_private(tmp_path):
    import os
    import stat

    dst = to_hf(_save(tmp_path, build(0, **DEEPSEEK, q_lora_rank=16)), tmp_path / "hf")
    mask = os.umask(0)
    os.umask(mask)
    for path in [dst, *dst.iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044 & ~mask, path


def test_a_plugin_component_is_refused_even_under_a_built_in_name(monkeypatch):
    from nanods import registry
    from nanods.convert import unsupported

    config = build(0, **DEEPSEEK, q_lora_rank=16).config
    assert unsupported(config) == []
    real = registry.describe
    monkeypatch.setattr(registry, "describe", lambda c: {**real(c), "router": {"name": "sigmoid", "dist": "my-plugin",
                                                                               "version": "1"}})
    assert unsupported(config) == ["router='sigmoid' from my-plugin (needs nanods' built-in 'sigmoid')"]
