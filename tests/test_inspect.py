"""inspect tells the truth: parameter counts and cache bytes match real tensors; headers only."""

import json
import struct
import time

import pytest
import torch
from conftest import tiny_config

from nanods import NanoDeepSeek, checkpoint
from nanods.errors import NanodsError
from nanods.inspect import checkpoint_report, file_kind, report
from nanods.tokenizer import byte_tokenizer


@pytest.mark.parametrize("attention,ffn", [("mla", "moe"), ("mha", "dense"), ("mha", "moe")])
def test_params_total_and_cache_bytes_match_the_real_tensors(attention, ffn):
    config = tiny_config(attention=attention, ffn=ffn)
    model = NanoDeepSeek(config).eval()
    info = report(config, seq_len=24, batch=2, dtype=torch.float32)
    assert info["params_total"] == sum(p.numel() for p in model.parameters())
    cache = model.init_cache(2, 24, dtype=torch.float32)
    model.generate(torch.zeros(2, 4, dtype=torch.long), 4)  # generate uses its own cache; this one we fill
    model(torch.zeros(2, 24, dtype=torch.long), cache=cache)
    held = sum(b.numel() * b.element_size() for c in cache for b in c.buffers.values())
    assert held == info["kv_cache_bytes"] == 2 * 24 * info["kv_cache_bytes_per_token"]


def test_active_parameters_leave_out_unchosen_experts():
    config = tiny_config(ffn="moe", num_experts=4, top_k=1, route_norm=False)
    model = NanoDeepSeek(config)
    experts = sum(b.ffn.experts.w_in.numel() + b.ffn.experts.w_out.numel() for b in model.blocks)
    info = report(config)
    assert info["params_total"] - info["params_active"] == experts * 3 // 4


def _checkpoint(tmp_path):
    model = NanoDeepSeek(tiny_config(vocab_size=320))  # the byte tokenizer's 257 ids must fit the embedding
    return checkpoint.save(tmp_path, model, model.config, byte_tokenizer(), 3, {"corpus": "test"}, {}, {"step": 3},
                           [[0.25] * 4, [0.25] * 4])


def test_checkpoint_report_counts_the_stored_tensors(tmp_path):
    path = _checkpoint(tmp_path)
    info = checkpoint_report(path)
    assert info["checkpoint"]["values"] == info["params_total"] + 2 * 4  # + the two expert_bias buffers
    assert info["checkpoint"]["step"] == 3 and info["expert_load"] == [[0.25] * 4] * 2


def test_a_multi_gigabyte_checkpoint_is_inspected_from_its_header(tmp_path):
    """A 'large'-sized file made of a header and a hole: only the header is ever read."""
    config = tiny_config(n_layer=24, n_embd=1536, n_head=12, n_kv_head=6, vocab_size=32768, num_experts=8)
    with torch.device("meta"):
        model = NanoDeepSeek(config)
    header, offset = {}, 0
    for name, t in model.state_dict().items():
        size = t.numel() * 4
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"nanods.config": config.to_json()}
    raw = json.dumps(header).encode()
    path = tmp_path / "big.safetensors"
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)  # sparse: no data blocks on disk
    assert path.stat().st_size > 2**32
    start = time.perf_counter()
    info = checkpoint_report(path)
    assert time.perf_counter() - start < 1.0
    assert info["params_total"] == sum(p.numel() for p in model.parameters())


def _edit_metadata(path, config=None, **metadata):
    """Rewrite a checkpoint's header in place: nanods.config fields from `config`, other keys as given."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    meta = header["__metadata__"]
    meta["nanods.config"] = json.dumps({**json.loads(meta["nanods.config"]), **(config or {})})
    meta.update({key.replace("_", ".", 1): value for key, value in metadata.items()})
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def test_missing_component_names_its_package(tmp_path):
    path = _checkpoint(tmp_path)
    _edit_metadata(path, {"router": "no-such-router"}, nanods_components=json.dumps(
        {"router": {"name": "no-such-router", "dist": "nanods-no-such-router"}}))
    with pytest.raises(NanodsError, match="router 'no-such-router' from package 'nanods-no-such-router'.*pip install nanods-no-such-router"):
        checkpoint.load(path)


@pytest.mark.parametrize("n_layer, problem", [
    (1000, (r"does not match its config: nanods.config describes 1000 layers stored as [\d,]+ tensors "
            r"\([\d,]+ values\), but the file holds \d+ tensors \([\d,]+ values\); it is damaged or was edited$")),
    (3_000_000, r"n_layer must be an integer in 1\.\.1024, got 3000000$"),
])
def test_a_header_claiming_more_layers_than_it_stores_fails_fast(tmp_path, n_layer, problem):
    path = _checkpoint(tmp_path)  # 2 layers of tensors
    _edit_metadata(path, {"n_layer": n_layer})
    start = time.perf_counter()
    with pytest.raises(NanodsError, match=problem) as info:
        checkpoint_report(path)
    assert time.perf_counter() - start < 2.0
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_header_whose_shapes_disagree_with_its_config_is_refused(tmp_path):
    path = _checkpoint(tmp_path)
    _edit_metadata(path, {"tie_embeddings": True})  # the file also stores lm_head.weight: one tensor too many
    with pytest.raises(NanodsError, match="does not match its config"):
        checkpoint_report(path)


@pytest.mark.parametrize("key, value, problem", [
    ("nanods_step", "three", "its nanods.step metadata is not valid JSON"),
    ("nanods_step", "-1", "its nanods.step metadata is '-1', not a step count"),
    ("nanods_components", "{", "its nanods.components metadata is not valid JSON"),
    ("nanods_components", json.dumps({"router": {"name": "sigmoid"}}), "components metadata is not an object of"),
    ("nanods_expert_load", "[[0.25, 0.25", "its nanods.expert_load metadata is not valid JSON"),
    ("nanods_expert_load", json.dumps([[0.5, "x"]]), "nanods.expert_load metadata is not a list of per-layer lists"),
    ("nanods_expert_load", json.dumps([[]]), "nanods.expert_load metadata is not a list of per-layer lists"),
])
def test_damaged_metadata_is_one_line_naming_the_file(tmp_path, key, value, problem):
    path = _checkpoint(tmp_path)
    _edit_metadata(path, **{key: value})
    with pytest.raises(NanodsError, match=problem) as info:
        checkpoint_report(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_safetensors_without_nanods_metadata_is_reported(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3, 4)}, tmp_path / "plain.safetensors")
    with pytest.raises(NanodsError, match="1 tensors .*12 values.*nanods.config is missing"):
        checkpoint_report(tmp_path / "plain.safetensors")


def test_a_tensor_of_the_wrong_shape_is_one_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _checkpoint(tmp_path)
    tensors, metadata = load_file(path), checkpoint.read_header(path)[1]
    name = "blocks.0.ffn.experts.w_in"
    tensors[name] = tensors[name].transpose(1, 2).contiguous()  # the layout before experts became (E, out, in)
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(NanodsError, match=r"tensor 'blocks\.0\.ffn\.experts\.w_in' is \[4, 64, 96\] float32, "
                       r"expected \[4, 96, 64\]"):
        checkpoint.load(path)


def test_an_older_expert_layout_is_refused_with_what_to_do(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _checkpoint(tmp_path)
    tensors, metadata = load_file(path), checkpoint.read_header(path)[1]
    del metadata["nanods.format"]  # as session-1 files were written: experts (E, in, out)
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(NanodsError, match=r"checkpoint format 1 \(E, in, out\).*train it again"):
        checkpoint.load(path)


def test_file_kind_tells_a_checkpoint_by_its_content(tmp_path):
    path = _checkpoint(tmp_path)
    assert file_kind(tmp_path) == ("checkpoint", path)  # a run folder stands for its ckpt.safetensors
    renamed = path.rename(tmp_path / "weights.bin")
    assert file_kind(renamed) == ("checkpoint", renamed)
    with pytest.raises(NanodsError, match=f"^'{tmp_path}' is a folder without ckpt.safetensors; give a checkpoint"):
        file_kind(tmp_path)


@pytest.mark.parametrize("content", [b'[model]\nscale = "tiny"\n', b"", b"abcdefgh{not json", "é".encode() * 4096])
def test_file_kind_takes_text_for_a_project_file(tmp_path, content):
    path = tmp_path / "project.cfg"  # eight text bytes then '{' read as a header length: far beyond any header
    path.write_bytes(content)
    assert file_kind(path) == ("project", path)


@pytest.mark.parametrize("content", [b"PK\x03\x04\x14\x00\xff\xfe", b"text with a \0 byte"])
def test_file_kind_refuses_a_binary(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(NanodsError, match=f"^'{path}' is not a safetensors checkpoint nor a nanods.toml project file; "):
        file_kind(path)
