"""`nanods convert`: a nanods checkpoint <-> a Hugging Face DeepseekV3ForCausalLM folder."""

import json

import pytest
import torch
from conftest import build, main_in_process

import nanods
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


# ---------------------------------------------------------------------------------------------
# The other direction: a Hugging Face folder (save_pretrained) -> a nanods checkpoint file.

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.7, "mscale_all_dim": 0.7}
HF_TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=192, moe_intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4, kv_lora_rank=32,
               q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_group=1, topk_group=1,
               num_experts_per_tok=2, first_k_dense_replace=0, max_position_embeddings=64, routed_scaling_factor=1.5)
HF_CONFIGS = {
    "yarn": dict(rope_parameters=YARN),
    "plain_tied": dict(tie_word_embeddings=True, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default",
                                                                                    "rope_theta": 5000.0}),
    "q_lora_null": dict(q_lora_rank=None, rope_parameters=YARN),
    "not_interleaved": dict(rope_interleave=False, rope_parameters=YARN),
    "first_dense_groups": dict(first_k_dense_replace=1, n_routed_experts=8, n_group=4, topk_group=2,
                               num_experts_per_tok=3, norm_topk_prob=False, routed_scaling_factor=2.5),
    "two_dense": dict(first_k_dense_replace=2, tie_word_embeddings=True),  # every layer dense
}


def _hf_model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = transformers.DeepseekV3Config(**{**HF_TINY, **overrides})
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():  # norms and expert biases away from ones and zeros, so a missed copy shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.uniform_(-0.05, 0.05)
    return model


def _hf_folder(path, model, **save):
    from nanods.convert import hf_tokenizer_json

    transformers.utils.logging.disable_progress_bar()  # its bars go to stderr, which the tests read
    model.save_pretrained(path, **save)
    (path / "tokenizer.json").write_text(hf_tokenizer_json(byte_tokenizer()))
    return path


def _logit_delta(ours, theirs, seed=1):
    torch.manual_seed(seed)
    idx = torch.randint(0, 257, (2, 40))
    with torch.no_grad():
        return (ours(idx) - theirs(idx).logits).abs().max().item()


def _one_line_failure(args, capsys):
    code, _out, err = main_in_process(args, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_a_transformers_folder_imports_to_the_same_model(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    hf = _hf_model(list(HF_CONFIGS).index(name), **HF_CONFIGS[name])
    _hf_folder(tmp_path / "hf", hf)
    code, out, err = main_in_process(["convert", "hf", "ours.safetensors"], capsys)
    assert code == 0 and "ours.safetensors" in out, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "ours.safetensors"]  # one file, no temporaries
    model, tokenizer = checkpoint.load(tmp_path / "ours.safetensors")
    assert tokenizer.kind == "byte" and model.config.tokenizer_vocab_size == 257
    delta = _logit_delta(model, hf)
    with capsys.disabled():
        print(f"imported {name}: max |dlogit| = {delta:.2e}")
    assert delta <= 1e-4, delta
    prompt = torch.randint(0, 257, (1, 8))
    want = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None,
                       attention_mask=torch.ones_like(prompt),  # nanods never samples ids past its tokenizer's
                       suppress_tokens=list(range(257, 320)))[0, 8:].tolist()
    assert model.generate(prompt, 20, temperature=0)[0, 8:].tolist() == want  # nanods' cached decode
    code, out, err = main_in_process(["inspect", "ours.safetensors"], capsys)
    assert code == 0, err
    code, out, err = main_in_process(["sample", "ours.safetensors", "--prompt", "ab", "--max-new-tokens", "4",
                                      "--temperature", "0"], capsys)
    assert code == 0, err


def test_fused_experts_and_shards_import(tmp_path):
    from safetensors.torch import save_file

    from nanods.convert import from_hf

    hf = _hf_model(3, **HF_CONFIGS["yarn"])
    sharded = _hf_folder(tmp_path / "sharded", hf, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    fused = _hf_folder(tmp_path / "fused", hf)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}  # in memory: experts.gate_up_proj / down_proj
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(fused / "model.safetensors"), metadata={"format": "pt"})
    models = [checkpoint.load(from_hf(folder, tmp_path / f"{folder.name}.safetensors"))[0]
              for folder in (sharded, fused)]
    for model in models:
        assert _logit_delta(model, hf) <= 1e-4
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        assert torch.equal(a, b)


def test_the_older_rope_scaling_and_a_resaved_tokenizer_import(tmp_path):
    from nanods.convert import from_hf

    hf = _hf_model(4, **HF_CONFIGS["yarn"])
    folder = _hf_folder(tmp_path / "hf", hf)
    config = json.loads((folder / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}  # as DeepSeek-V3's own config.json has it
    (folder / "config.json").write_text(json.dumps(config))
    tok = json.loads((folder / "tokenizer.json").read_text())
    (folder / "tokenizer.json").write_text(json.dumps(tok, indent=1))  # same tokenizer, other formatting
    model, tokenizer = checkpoint.load(from_hf(folder, tmp_path / "ours.safetensors"))
    assert model.config.rope_factor == 4 and model.config.rope_mscale == 0.7 and tokenizer.kind == "byte"
    assert _logit_delta(model, hf) <= 1e-4


@pytest.mark.parametrize("name", ["q_lora", "no_q_lora", "all_dense", "yarn", "groups"])
def test_a_round_trip_is_bit_identical(name, tmp_path):
    from nanods.convert import from_hf

    model = _random_model(list(CONFIGS).index(name), **CONFIGS[name]).eval()
    src = _save(tmp_path, model)
    back = from_hf(to_hf(src, tmp_path / "hf"), tmp_path / "back.safetensors")
    again, tokenizer = checkpoint.load(back)
    assert again.config == model.config and tokenizer.fingerprint() == byte_tokenizer().fingerprint()
    ours, theirs = model.state_dict(), again.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key


def test_a_bpe_round_trips_and_an_edited_config_wins(tmp_path):
    from nanods.convert import NANODS_KEY, from_hf

    texts = ["def main():\n    return 42\n", "héllo wörld <|endoftext|> ünïcode ✓"] * 20
    bpe = train_bpe(texts, 300)
    model = _random_model(0, **{**CONFIGS["q_lora"], "tokenizer_vocab_size": len(bpe)}).eval()
    hf = to_hf(_save(tmp_path, model, bpe), tmp_path / "hf")
    again, tokenizer = checkpoint.load(from_hf(hf, tmp_path / "a.safetensors"))
    assert tokenizer.fingerprint() == bpe.fingerprint() and again.config == model.config
    config = json.loads((hf / "config.json").read_text())
    config.pop(NANODS_KEY)  # a folder from elsewhere: the config comes from DeepseekV3's fields alone
    (hf / "config.json").write_text(json.dumps(config))
    plain, _ = checkpoint.load(from_hf(hf, tmp_path / "b.safetensors"))
    idx = torch.randint(0, len(bpe), (1, 24))
    with torch.no_grad():
        assert torch.equal(plain(idx), model(idx))
    config[NANODS_KEY] = {**model.config.to_dict(), "n_embd": 128}  # disagrees with hidden_size: ignored
    (hf / "config.json").write_text(json.dumps(config))
    edited, _ = checkpoint.load(from_hf(hf, tmp_path / "c.safetensors"))
    assert edited.config.n_embd == 64


def _break(case, hf):
    """Damage the folder hf one way; returns the words its one-line refusal must hold."""
    from safetensors.torch import load_file, save_file

    config = json.loads((hf / "config.json").read_text())
    weights = hf / "model.safetensors"
    if case == "no_config":
        (hf / "config.json").unlink()
        return ["config.json"]
    if case == "model_type":
        config["model_type"] = "llama"
    elif case == "fp8":
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    elif case == "shape":
        config["moe_intermediate_size"] = 48
    elif case == "rope_type":
        config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}
    elif case == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[:-100])
        return ["truncated"]
    elif case in ("missing", "unexpected"):
        state = load_file(str(weights))
        if case == "missing":
            state.pop("model.layers.1.self_attn.o_proj.weight")
        else:
            state["model.layers.1.self_attn.extra.weight"] = torch.zeros(2)
        save_file(state, str(weights))
        return [case, "o_proj" if case == "missing" else "extra"]
    elif case == "no_eot":
        from tokenizers import Tokenizer as HFTokenizer

        tok = json.loads((hf / "tokenizer.json").read_text())
        tok["added_tokens"] = []
        (hf / "tokenizer.json").write_text(HFTokenizer.from_str(json.dumps(tok)).to_str())
        return ["<|endoftext|>"]
    (hf / "config.json").write_text(json.dumps(config))
    return {"model_type": ["llama", "deepseek_v3"], "fp8": ["quantized", "fp8"],
            "shape": ["gate_proj", "[32, 64]", "[48, 64]"], "rope_type": ["llama3"]}[case]


@pytest.mark.parametrize("case", ["no_config", "model_type", "fp8", "shape", "rope_type", "truncated", "missing",
                                  "unexpected", "no_eot"])
def test_a_bad_folder_is_one_line_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _hf_folder(tmp_path / "hf", _hf_model(0, **HF_CONFIGS["yarn"]))
    words = _break(case, tmp_path / "hf")
    line = _one_line_failure(["convert", "hf", "ours.safetensors"], capsys)
    assert all(w in line for w in words), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_a_folder_without_a_tokenizer_imports_for_inspect_only(tmp_path, monkeypatch, capsys):
    """No tokenizer.json: the model imports and inspects; sample, train --init-from and the export back refuse."""
    monkeypatch.chdir(tmp_path)
    hf = _hf_model(0, **HF_CONFIGS["yarn"])
    _hf_folder(tmp_path / "hf", hf)
    (tmp_path / "hf" / "tokenizer.json").unlink()
    code, out, err = main_in_process(["convert", "hf", "ours.safetensors"], capsys)
    assert code == 0, err
    model, tokenizer = nanods.load(tmp_path / "ours.safetensors")
    assert tokenizer is None and model.config.tokenizer_vocab_size is None
    assert _logit_delta(model, hf) <= 1e-4
    code, out, err = main_in_process(["inspect", "ours.safetensors"], capsys)
    assert code == 0, err
    assert "no tokenizer" in _one_line_failure(["sample", "ours.safetensors", "--prompt", "ab"], capsys)
    assert "no tokenizer" in _one_line_failure(["convert", "ours.safetensors", "back"], capsys)
    assert not (tmp_path / "back").exists()
    code, out, err = main_in_process(["train", "--init-from", "ours.safetensors", "--out", "run", "--steps", "1"],
                                     capsys)  # refused before any data is read: one error line after the device line
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "no tokenizer" in errors[0] and "Traceback" not in err, err


def test_an_existing_checkpoint_is_not_overwritten(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _hf_folder(tmp_path / "hf", _hf_model(0))
    (tmp_path / "ours.safetensors").write_text("mine")
    line = _one_line_failure(["convert", "hf", "ours.safetensors"], capsys)
    assert "already exists" in line
    assert (tmp_path / "ours.safetensors").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "ours.safetensors"]
    (tmp_path / "empty").mkdir()
    line = _one_line_failure(["convert", "empty", "x.safetensors"], capsys)
    assert "config.json" in line and not (tmp_path / "x.safetensors").exists()


def test_an_imported_checkpoint_starts_a_new_run(tmp_path, corpus):
    from conftest import losses, project

    from nanods.convert import from_hf
    from nanods.train.loop import RunOptions, train

    hf = _hf_folder(tmp_path / "hf", _hf_model(0, **HF_CONFIGS["yarn"]))
    ckpt = from_hf(hf, tmp_path / "ours.safetensors")
    train(project(corpus, tmp_path / "run", "train.steps=2", "train.eval_every=2"), RunOptions(init_from=str(ckpt)))
    assert losses(tmp_path / "run") and checkpoint.load(tmp_path / "run" / "ckpt.safetensors")[0].config.rope_factor == 4


def test_mtp_modules_convert_both_ways_in_deepseeks_layout(tmp_path):
    """MTP depth k is model.layers.{n_layer + k} with enorm, hnorm, eh_proj, shared_head.norm and copies of
    the embedding and head; transformers skips those layers; the way back restores every MTP weight."""
    from safetensors import safe_open

    from nanods.convert import from_hf

    model = _random_model(3, **{**CONFIGS["q_lora"], "mtp_depth": 2}).eval()
    dst = to_hf(_save(tmp_path, model), tmp_path / "hf")
    config = json.loads((dst / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 2 and config["num_hidden_layers"] == 2
    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for layer, k in ((2, 0), (3, 1)):
            p = f"model.layers.{layer}."
            assert {p + "enorm.weight", p + "hnorm.weight", p + "eh_proj.weight", p + "shared_head.norm.weight",
                    p + "embed_tokens.weight", p + "shared_head.head.weight", p + "mlp.gate.weight"} <= keys
            assert torch.equal(f.get_tensor(p + "eh_proj.weight"), model.mtp[k].eh_proj.weight)
            assert torch.equal(f.get_tensor(p + "shared_head.norm.weight"), model.mtp[k].norm.weight)
            assert torch.equal(f.get_tensor(p + "shared_head.head.weight"), model.lm_head.weight)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(dst, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and info["unexpected_keys"], info
    assert all(k.startswith(("model.layers.2.", "model.layers.3.")) for k in info["unexpected_keys"])
    idx = torch.randint(0, 257, (1, 20))
    with torch.no_grad():
        assert (model(idx) - hf.eval()(idx).logits).abs().max() <= 1e-4
    back, _ = checkpoint.load(from_hf(dst, tmp_path / "back.safetensors"))
    assert back.config == model.config
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # transformers' own save keeps num_nextn_predict_layers but drops the MTP layers: imported without MTP
    hf.save_pretrained(tmp_path / "resaved")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "resaved" / name).write_bytes((dst / name).read_bytes())
    plain, _ = checkpoint.load(from_hf(tmp_path / "resaved", tmp_path / "plain.safetensors"))
    assert plain.config.mtp_depth == 0 and not plain.mtp
    with torch.no_grad():
        assert torch.equal(plain(idx), model(idx))


def _positive_index_weights(model):
    """Indexer weights w(t, j) > 0 with 16 heads: a score is exactly 0 only when all 16 ReLUs are, so the top-k
    has no ties, whose order transformers' topk and nanods' stable sort break differently."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "weights_proj" in name:
                p.abs_()
            elif "k_norm.bias" in name:
                p.uniform_(-0.1, 0.1)
    return model


@pytest.mark.parametrize("topk", [8, 64])
def test_dsa_matches_transformers_deepseek_v32_both_ways(topk, tmp_path):
    """dsa exports as DeepseekV32ForCausalLM and imports back; logits agree with the top-k shorter than the
    context (the sparse selection at work) and longer (MLA itself)."""
    from nanods.convert import from_hf

    model = _positive_index_weights(_random_model(5, **CONFIGS["q_lora"], attention="dsa", index_n_heads=16,
                                                  index_head_dim=16, index_topk=topk)).eval()
    dst = to_hf(_save(tmp_path, model), tmp_path / "hf")
    config = json.loads((dst / "config.json").read_text())
    assert (config["model_type"], config["index_topk"], config["index_n_heads"]) == ("deepseek_v32", topk, 16)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(dst, output_loading_info=True, dtype=torch.float32)
    assert type(hf).__name__ == "DeepseekV32ForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    delta = _logit_delta(model, hf.eval())
    print(f"dsa top-{topk}: max |dlogit| = {delta:.2e}")
    assert delta <= 1e-4
    back, _ = checkpoint.load(from_hf(dst, tmp_path / "back.safetensors"))
    assert back.config == model.config
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_transformers_deepseek_v32_folder_imports_to_the_same_model(tmp_path):
    from nanods.convert import from_hf

    torch.manual_seed(0)
    config = transformers.DeepseekV32Config(**{k: v for k, v in HF_TINY.items()}, index_n_heads=16,
                                            index_head_dim=16, index_topk=8, rope_parameters=YARN)
    hf = _positive_index_weights(transformers.DeepseekV32ForCausalLM(config)).eval()
    ours, _ = checkpoint.load(from_hf(_hf_folder(tmp_path / "hf", hf), tmp_path / "ours.safetensors"))
    assert ours.config.attention == "dsa" and ours.config.index_topk == 8
    delta = _logit_delta(ours, hf)
    print(f"imported deepseek_v32: max |dlogit| = {delta:.2e}")
    assert delta <= 1e-4
