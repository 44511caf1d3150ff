"""NanoDeepSeekConfig (seed fields, switches, presets, validation) and nanods.toml resolution."""

from __future__ import annotations

import json

import pytest

from nanods import NanoDeepSeekConfig
from nanods.config import PRESETS, PROFILES, preset
from nanods.project import parse_duration, parse_set, read_toml, resolve_project
from nanods.errors import NanodsError

# ---------------------------------------------------------------------------------------------
# seed fields and the use_mla / use_moe switches


def test_seed_defaults():
    c = NanoDeepSeekConfig()
    assert (c.sequence_len, c.vocab_size, c.n_layer, c.n_head, c.n_kv_head, c.n_embd) == (1024, 50304, 12, 6, 6, 768)
    assert c.kv_lora_rank == 768 // 2
    assert (c.num_experts, c.top_k) == (8, 2)
    assert c.use_mla is True and c.use_moe is True
    assert (c.attention, c.ffn, c.router) == ("mla", "moe", "sigmoid")


def test_kv_lora_rank_derives_from_n_embd_unless_set():
    assert NanoDeepSeekConfig(n_embd=256, n_head=4, n_kv_head=4).kv_lora_rank == 128
    assert NanoDeepSeekConfig(n_embd=256, n_head=4, n_kv_head=4, kv_lora_rank=96).kv_lora_rank == 96


def test_use_mla_false_selects_mha():
    c = NanoDeepSeekConfig(use_mla=False)
    assert c.attention == "mha"
    assert c.use_mla is False
    assert c.ffn == "moe" and c.use_moe is True


def test_use_moe_false_selects_dense():
    c = NanoDeepSeekConfig(use_moe=False)
    assert c.ffn == "dense"
    assert c.use_moe is False
    assert c.attention == "mla" and c.use_mla is True


def test_switches_follow_the_stored_component_names():
    c = NanoDeepSeekConfig(attention="mha", ffn="dense")
    assert c.use_mla is False and c.use_moe is False
    c = NanoDeepSeekConfig(attention="mla", ffn="moe", use_mla=True, use_moe=True)  # agreeing is fine
    assert c.use_mla is True and c.use_moe is True


@pytest.mark.parametrize("kwargs", [
    dict(use_mla=True, attention="mha"),
    dict(use_mla=False, attention="mla"),
    dict(use_moe=True, ffn="dense"),
    dict(use_moe=False, ffn="moe"),
])
def test_contradicting_switch_is_an_error(kwargs):
    with pytest.raises(NanodsError, match="contradicts"):
        NanoDeepSeekConfig(**kwargs)


def test_switches_are_not_stored():
    d = NanoDeepSeekConfig(use_mla=False, use_moe=False).to_dict()
    assert "use_mla" not in d and "use_moe" not in d
    assert d["attention"] == "mha" and d["ffn"] == "dense"


# ---------------------------------------------------------------------------------------------
# presets


def test_presets_exist():
    assert set(PRESETS) >= {"tiny", "small", "base", "large"}


@pytest.mark.parametrize("scale, expected", [
    ("small", (6, 4, 4, 384, 4, 2)),
    ("base", (12, 6, 6, 768, 8, 2)),
    ("large", (24, 12, 6, 1536, 8, 2)),
])
def test_seed_preset_values(scale, expected):
    c = NanoDeepSeekConfig(**preset(scale))
    assert (c.n_layer, c.n_head, c.n_kv_head, c.n_embd, c.num_experts, c.top_k) == expected


def test_tiny_is_smaller_than_small():
    tiny, small = NanoDeepSeekConfig(**preset("tiny")), NanoDeepSeekConfig(**preset("small"))
    assert tiny.n_layer <= small.n_layer and tiny.n_embd < small.n_embd and tiny.vocab_size < small.vocab_size


def test_preset_returns_a_copy():
    p = preset("small")
    p["n_layer"] = 99
    assert preset("small")["n_layer"] == 6


def test_unknown_scale_suggests_closest():
    with pytest.raises(NanodsError, match=r"unknown scale 'smal'.*did you mean 'small'"):
        preset("smal")


# ---------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(n_embd=100, n_head=6, n_kv_head=6), r"n_embd \(100\) must be divisible by n_head \(6\)"),
    (dict(n_head=6, n_kv_head=4, attention="mha"), r"n_head \(6\) must be divisible by n_kv_head \(4\)"),
    (dict(num_experts=4, top_k=5), r"top_k \(5\) must be <= num_experts \(4\)"),
    (dict(kv_lora_rank=0), r"kv_lora_rank must be an integer in 1\.\.65536, got 0"),
    (dict(kv_lora_rank=-8), r"kv_lora_rank must be an integer in 1\.\.65536, got -8"),
    (dict(top_k=1, route_norm=True), r"route_norm"),
    (dict(activation="swiglo"), r"activation.*'swiglo'.*did you mean 'swiglu'"),
    (dict(activation="relu"), r"did you mean 'relu2'"),
    (dict(rope_beta_fast=1.0, rope_beta_slow=2.0), r"rope_beta_fast \(1\.0\) must be >= rope_beta_slow \(2\.0\)"),
    (dict(rope_original_len=0), r"rope_original_len must be an integer in 1\.\.1048576, got 0"),
])
def test_validation_errors_are_clear(kwargs, pattern):
    with pytest.raises(NanodsError, match=pattern):
        NanoDeepSeekConfig(**kwargs)


def test_route_norm_defaults_follow_top_k():
    assert NanoDeepSeekConfig(top_k=2).route_norm is True
    assert NanoDeepSeekConfig(top_k=1).route_norm is False  # top_k=1 alone is valid
    assert NanoDeepSeekConfig(top_k=1, route_norm=False).top_k == 1


def test_swiglu_is_accepted():
    assert NanoDeepSeekConfig(activation="swiglu").activation == "swiglu"


# ---------------------------------------------------------------------------------------------
# resolution order: defaults -> preset -> toml -> cli -> --set

TOML = {"model": {"scale": "small", "n_layer": 5, "n_embd": 128, "n_head": 4, "n_kv_head": 4}}


def test_defaults_when_nothing_given():
    m = resolve_project({}).model
    assert m == NanoDeepSeekConfig()


def test_preset_over_defaults():
    m = resolve_project({}, scale="tiny").model
    assert m == NanoDeepSeekConfig(**preset("tiny"))


def test_toml_scale_is_used_when_no_scale_option():
    m = resolve_project({"model": {"scale": "small"}}).model
    assert m.n_layer == 6 and m.vocab_size == PRESETS["small"]["vocab_size"]


def test_scale_option_overrides_toml_scale():
    m = resolve_project({"model": {"scale": "small"}}, scale="tiny").model
    assert m.n_kv_head == PRESETS["tiny"]["n_kv_head"] != PRESETS["small"]["n_kv_head"]
    assert m.vocab_size == PRESETS["tiny"]["vocab_size"]


def test_toml_fields_override_preset():
    m = resolve_project(TOML).model
    assert m.n_layer == 5 and m.n_embd == 128
    assert m.vocab_size == PRESETS["small"]["vocab_size"]  # untouched preset value survives


def test_cli_overrides_toml_and_none_means_unset():
    m = resolve_project(TOML, cli={"model": {"n_layer": 4, "n_embd": None}}).model
    assert m.n_layer == 4
    assert m.n_embd == 128  # a CLI option left at None does not erase the file's value


def test_set_overrides_cli():
    m = resolve_project(TOML, scale="tiny", cli={"model": {"n_layer": 4}}, sets=["model.n_layer=3"]).model
    assert m.n_layer == 3
    assert m.n_embd == 128  # from the toml
    assert m.vocab_size == PRESETS["tiny"]["vocab_size"]  # from the --scale preset


def test_cli_and_set_reach_train_and_sample_sections():
    p = resolve_project({"train": {"steps": 10, "lr": 1e-3}}, cli={"train": {"steps": 20}},
                        sets=["train.lr=0.01", "sample.temperature=0"])
    assert p.train.steps == 20 and p.train.lr == 0.01
    assert p.sample.temperature == 0.0 and isinstance(p.sample.temperature, float)


def test_set_values_are_toml_literals():
    t = parse_set(["model.n_layer=3", "model.route_scale=2.5", "model.norm_weights=true",
                   'model.router="softmax"', "train.lr=1e-3"])
    assert t["model"] == {"n_layer": 3, "route_scale": 2.5, "norm_weights": True, "router": "softmax"}
    assert type(t["model"]["n_layer"]) is int and type(t["model"]["norm_weights"]) is bool
    assert t["train"] == {"lr": 1e-3}


def test_set_bare_words_are_strings():
    t = parse_set(["model.attention=mha", "model.activation = swiglu"])
    assert t["model"] == {"attention": "mha", "activation": "swiglu"}
    m = resolve_project({}, scale="tiny", sets=["model.attention=mha", "model.ffn=dense"]).model
    assert m.attention == "mha" and m.ffn == "dense"


def test_set_component_options():
    m = resolve_project({}, scale="tiny", sets=["model.ffn_options.kernel=loop"]).model
    assert m.ffn_options == {"kernel": "loop"}


@pytest.mark.parametrize("bad", ["n_layer=3", "model.n_layer", "model.=3", "model=3"])
def test_malformed_set_is_an_error(bad):
    with pytest.raises(NanodsError, match="section.key=value"):
        resolve_project({}, sets=[bad])


def test_set_wrong_type_names_key():
    with pytest.raises(NanodsError, match="'n_layer'.*integer"):
        resolve_project({}, sets=["model.n_layer=three"])


def test_set_unknown_section_suggests():
    with pytest.raises(NanodsError, match=r"modle.*did you mean 'model'"):
        resolve_project({}, sets=["modle.n_layer=3"])


# ---------------------------------------------------------------------------------------------
# YaRN fields and the architecture profile


def test_yarn_is_off_by_default_and_its_original_length_follows_the_context():
    c = NanoDeepSeekConfig()
    assert (c.rope_factor, c.rope_beta_fast, c.rope_beta_slow, c.rope_mscale, c.rope_mscale_all_dim) == (1, 32, 1, 1, 1)
    assert c.rope_original_len == c.sequence_len
    assert NanoDeepSeekConfig(sequence_len=163840, rope_factor=40).rope_original_len == 4096  # DeepSeek-V3's
    assert NanoDeepSeekConfig(sequence_len=8192, rope_factor=40, rope_original_len=4096).rope_original_len == 4096


def test_deepseek_profile_makes_every_choice_deepseeks():
    m = resolve_project({"model": {"scale": "tiny", "profile": "deepseek"}}).model
    assert (m.activation, m.norm_weights, m.attention, m.ffn, m.router) == ("swiglu", True, "mla", "moe", "sigmoid")
    assert m == NanoDeepSeekConfig(**{**preset("tiny"), **PROFILES["deepseek"]})  # ffn_hidden derived for swiglu


def test_the_default_is_nanochats_relu2_and_parameter_free_norms():
    m = resolve_project({}).model
    assert (m.activation, m.norm_weights) == ("relu2", False)
    assert resolve_project({}, profile="nanochat").model == m


def test_a_files_own_keys_win_over_its_profile():
    m = resolve_project({"model": {"profile": "deepseek", "activation": "relu2"}}).model
    assert m.activation == "relu2" and m.norm_weights is True


def test_profile_from_the_command_line():
    assert resolve_project({}, sets=["model.profile=deepseek"]).model.activation == "swiglu"
    assert resolve_project({"model": {"profile": "nanochat"}}, profile="deepseek").model.norm_weights is True
    m = resolve_project({"model": {"profile": "deepseek"}}, cli={"model": {"router": "softmax"}}).model
    assert m.router == "softmax" and m.activation == "swiglu"


def test_an_unknown_profile_is_one_error_naming_the_choices():
    with pytest.raises(NanodsError, match=r"^unknown profile 'deepseak' \(did you mean 'deepseek'\?\); "
                                          r"choose one of: nanochat, deepseek$"):
        resolve_project({"model": {"profile": "deepseak"}})
    with pytest.raises(NanodsError, match=r"^model\.profile must be a string, got 3$"):
        resolve_project({"model": {"profile": 3}})


# ---------------------------------------------------------------------------------------------
# nanods.toml errors


def test_unknown_key_suggests_closest():
    with pytest.raises(NanodsError, match=r"unknown key 'n_layr'.*did you mean 'n_layer'"):
        resolve_project({"model": {"n_layr": 4}})


def test_unknown_key_from_a_real_file(tmp_path):
    path = tmp_path / "nanods.toml"
    path.write_text('[model]\nscale = "tiny"\nn_layr = 4\n', encoding="utf-8")
    with pytest.raises(NanodsError, match=r"'n_layr'.*did you mean 'n_layer'") as info:
        resolve_project(read_toml(path), where=str(path))
    assert str(path) in str(info.value)


def test_unknown_key_in_train_section():
    with pytest.raises(NanodsError, match=r"unknown key 'stpes'.*\[train\].*did you mean 'steps'"):
        resolve_project({"train": {"stpes": 4}})


@pytest.mark.parametrize("section, key, value", [
    ("model", "n_layer", "four"),
    ("model", "n_layer", 4.0),
    ("model", "norm_weights", 1),
    ("model", "attention", 3),
    ("train", "steps", "many"),
])
def test_wrong_type_names_key(section, key, value):
    with pytest.raises(NanodsError, match=f"'{key}'.*must be"):
        resolve_project({section: {key: value}})


def test_int_is_accepted_for_float_fields():
    m = resolve_project({"model": {"route_scale": 2}}).model
    assert m.route_scale == 2.0 and isinstance(m.route_scale, float)


def test_unknown_section_suggests():
    with pytest.raises(NanodsError, match=r"unknown section.*modle.*did you mean 'model'"):
        resolve_project({"modle": {"n_layer": 4}})


@pytest.mark.parametrize("group, name, suggestion", [
    ("attention", "mlaa", "mla"),
    ("ffn", "moee", "moe"),
    ("router", "sigmod", "sigmoid"),
])
def test_unknown_component_suggests_closest(group, name, suggestion):
    with pytest.raises(NanodsError, match=f"unknown {group} '{name}'.*did you mean '{suggestion}'"):
        resolve_project({"model": {"scale": "tiny", group: name}})


def test_invalid_toml_is_a_clear_error(tmp_path):
    path = tmp_path / "nanods.toml"
    path.write_text("[model\nn_layer = 4\n", encoding="utf-8")
    with pytest.raises(NanodsError, match="not valid TOML"):
        read_toml(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(NanodsError, match="not found"):
        read_toml(tmp_path / "nope.toml")


# ---------------------------------------------------------------------------------------------
# component options


def test_moe_kernel_option_accepted(tmp_path):
    path = tmp_path / "nanods.toml"
    path.write_text('[model]\nscale = "tiny"\nffn = "moe"\n\n[model.ffn_options]\nkernel = "loop"\n', encoding="utf-8")
    m = resolve_project(read_toml(path)).model
    assert m.ffn_options == {"kernel": "loop"}
    assert json.loads(m.to_json())["ffn_options"] == {"kernel": "loop"}  # stored in nanods.config


def test_unknown_ffn_option_names_it():
    with pytest.raises(NanodsError, match=r"unknown key 'kernal' in \[model.ffn_options\].*did you mean 'kernel'"):
        resolve_project({"model": {"scale": "tiny", "ffn_options": {"kernal": "loop"}}})


def test_wrong_type_option_names_it():
    with pytest.raises(NanodsError, match=r"'kernel' in \[model.ffn_options\] must be a string"):
        resolve_project({"model": {"scale": "tiny", "ffn_options": {"kernel": 3}}})


def test_mla_absorb_option_accepted():
    m = resolve_project({"model": {"scale": "tiny", "attention": "mla",
                                   "attention_options": {"absorb": "never"}}}).model
    assert m.attention_options == {"absorb": "never"}


def test_options_for_a_component_that_declares_none():
    with pytest.raises(NanodsError, match=r"attention_options"):
        resolve_project({"model": {"scale": "tiny", "attention": "mha",
                                   "attention_options": {"absorb": "never"}}})


def test_router_options_without_moe_are_refused():
    with pytest.raises(NanodsError, match=r"router_options"):
        resolve_project({"model": {"scale": "tiny", "ffn": "dense", "router_options": {"x": 1}}})


# ---------------------------------------------------------------------------------------------
# serialisation


def test_json_round_trip():
    c = NanoDeepSeekConfig(**{**preset("tiny"), "attention": "mha", "router": "softmax", "activation": "swiglu",
                              "first_k_dense": 1, "route_scale": 2.5, "ffn_options": {"kernel": "loop"}})
    d = json.loads(c.to_json())
    assert d["attention"] == "mha" and d["router"] == "softmax" and d["ffn_options"] == {"kernel": "loop"}
    back = NanoDeepSeekConfig.from_dict(d)
    assert back == c
    assert back.to_json() == c.to_json()


def test_round_trip_keeps_derived_fields_fixed():
    c = NanoDeepSeekConfig(n_embd=256, n_head=4, n_kv_head=4)
    back = NanoDeepSeekConfig.from_dict(json.loads(c.to_json()))
    assert back.kv_lora_rank == 128 and back.moe_hidden == c.moe_hidden and back.aux_loss_alpha == c.aux_loss_alpha


def test_from_dict_rejects_unknown_key():
    d = NanoDeepSeekConfig().to_dict()
    d["n_layr"] = 3
    with pytest.raises(NanodsError, match=r"unknown key 'n_layr'.*did you mean 'n_layer'"):
        NanoDeepSeekConfig.from_dict(d)


def test_from_dict_rejects_wrong_type():
    with pytest.raises(NanodsError, match=r"'n_embd'"):
        NanoDeepSeekConfig.from_dict({"n_embd": "768"})


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("5m", 300), ("1.5h", 5400), ("45", 45), (" 2M ", 120)])
def test_time_budget_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "0s", "-5m", "abc", "m", "", "nan", "inf"])
def test_time_budget_must_be_a_positive_duration(text):
    with pytest.raises(NanodsError, match="is not a positive duration; use e.g. 90s"):
        parse_duration(text)


# ---------------------------------------------------------------------------------------------
# number ranges: NaN and infinities never pass (NaN fails every comparison, so `x < 0` lets it in)

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("section, key, value, allowed", [
    *[("model", key, value, "a finite number > 0") for key in ("norm_eps", "rope_theta", "route_scale")
      for value in (NAN, INF, 0.0, -1.0)],
    *[("model", key, value, "a finite number >= 0")
      for key in ("bias_update_speed", "aux_loss_alpha", "mtp_loss_weight", "rope_mscale", "rope_mscale_all_dim")
      for value in (NAN, INF, -0.5)],
    *[("model", key, value, "a finite number > 0") for key in ("rope_beta_fast", "rope_beta_slow")
      for value in (NAN, INF, 0.0, -1.0)],
    *[("model", "rope_factor", value, "a finite number >= 1") for value in (NAN, INF, 0.5, 0.0, -1.0)],
    *[("train", key, value, "a finite number > 0") for key in ("lr", "muon_lr") for value in (NAN, INF, -INF, 0.0)],
    *[("train", key, value, "a finite number >= 0")
      for key in ("weight_decay", "grad_clip") for value in (NAN, INF, -0.1)],
    *[("train", "decay_frac", value, r"a finite number in \[0, 1\]") for value in (NAN, INF, -0.1, 1.5)],
    *[("sample", "temperature", value, "a finite number >= 0") for value in (NAN, INF, -1.0)],
    *[("sample", "top_p", value, r"a finite number in \(0, 1\]") for value in (NAN, INF, 0.0, 1.5)],
])
def test_a_number_outside_its_range_is_one_line_naming_it(section, key, value, allowed):
    prefix = f"{section}\\."  # named as in nanods.toml
    with pytest.raises(NanodsError, match=f"^{prefix}{key} must be {allowed}, got {value}$"):
        resolve_project({section: {key: value}})


@pytest.mark.parametrize("section, key, value, allowed", [
    ("train", "steps", 0, "an integer >= 1"),
    ("train", "warmup_steps", -1, "an integer >= 0"),
    ("train", "seq_len", 2**21, r"an integer in 1\.\.1048576"),
    ("sample", "top_k", -1, "an integer >= 0"),
    ("sample", "max_new_tokens", 0, "an integer >= 1"),
])
def test_an_integer_setting_outside_its_range_names_it(section, key, value, allowed):
    with pytest.raises(NanodsError, match=f"^{section}\\.{key} must be {allowed}, got {value}$"):
        resolve_project({section: {key: value}})


def test_the_ends_of_each_range_are_accepted():
    p = resolve_project({"model": {"bias_update_speed": 0, "aux_loss_alpha": 0, "mtp_loss_weight": 0},
                        "train": {"weight_decay": 0, "grad_clip": 0, "decay_frac": 1, "warmup_steps": 0},
                        "sample": {"temperature": 0, "top_p": 1, "top_k": 0, "max_new_tokens": 1}})
    assert p.model.bias_update_speed == 0 and p.train.grad_clip == 0 and p.sample.top_p == 1
    assert resolve_project({"train": {"decay_frac": 0}, "sample": {"top_p": 1e-9, "top_k": None}}).train.decay_frac == 0


def test_a_nan_from_the_command_line_is_refused_too():
    with pytest.raises(NanodsError, match=r"^train\.grad_clip must be a finite number >= 0, got nan$"):
        resolve_project({}, sets=["train.grad_clip=nan"])


# ---------------------------------------------------------------------------------------------
# size bounds: absurd sizes fail at once, naming the field and the bound


@pytest.mark.parametrize("key, value, bound", [
    ("n_layer", 100_000, 1024),
    ("n_layer", 3_000_000, 1024),
    ("vocab_size", 10**9, 2**20),
    ("sequence_len", 2**21, 2**20),
    ("n_embd", 2**17, 2**16),
    ("n_head", 2048, 1024),
    ("num_experts", 5000, 4096),
    ("ffn_hidden", 2**19, 2**18),
    ("first_k_dense", 2000, 1024),
])
def test_absurd_sizes_fail_at_once(key, value, bound):
    with pytest.raises(NanodsError, match=f"^model\\.{key} must be an integer in [01]\\.\\.{bound}, got {value}$"):
        NanoDeepSeekConfig(**{key: value})


def test_the_largest_allowed_sizes_are_accepted():
    from nanods.checks import MAX_LAYERS, MAX_SEQUENCE_LEN, MAX_VOCAB_SIZE

    c = NanoDeepSeekConfig(n_layer=MAX_LAYERS, vocab_size=MAX_VOCAB_SIZE, sequence_len=MAX_SEQUENCE_LEN)
    assert (c.n_layer, c.vocab_size, c.sequence_len) == (1024, 2**20, 2**20)


def test_from_dict_names_where_a_bad_value_came_from():
    with pytest.raises(NanodsError, match=r"^nanods.config of x.safetensors: model\.n_layer must be an integer in 1\.\.1024"):
        NanoDeepSeekConfig.from_dict({"n_layer": 3_000_000}, "nanods.config of x.safetensors")


@pytest.mark.parametrize("key, value", [("eval_batches", 10**8), ("batch_size", 10**6), ("micro_batch_size", 10**6)])
def test_batch_counts_are_bounded(key, value):
    with pytest.raises(NanodsError, match=rf"^train\.{key} must be an integer in 1\.\.\d+, got {value}$"):
        resolve_project({}, sets=[f"train.{key}={value}"])
