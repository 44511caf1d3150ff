"""The `nanods` command line, run as a user runs it: `python -m nanods ...` in a fresh directory."""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import build, main_in_process

import nanods
from nanods import checkpoint, registry
from nanods.cli import app
from nanods.config import PRESETS
from nanods.project import load_project, resolve_project
from nanods.errors import NanodsError
from nanods.tokenizer import byte_tokenizer

BUILTINS = {"attention": {"mha", "mla"}, "ffn": {"dense", "moe"}, "router": {"sigmoid", "softmax"}}


def run(cwd, *args):
    """Run `python -m nanods ARGS` in cwd; a wide terminal so tables don't truncate."""
    env = {k: v for k, v in os.environ.items() if k != "NANODS_DEBUG"}
    env.update(COLUMNS="200", NO_COLOR="1", TERM="dumb", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "nanods", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def run_all(jobs):
    """Run {name: (cwd, args)} concurrently (each process pays torch's import time once)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(8, cpus, len(jobs)))  # more processes than cores only slows torch's import
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {name: pool.submit(run, cwd, *args) for name, (cwd, args) in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def stderr_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.strip()]


USER_TOML = '[model]\nscale = "tiny"\nn_layer = 3\n# my own settings\n'


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Every CLI run of this file, each in its own fresh directory, in two concurrent rounds."""
    dirs = {}

    def fresh(name, toml=None):
        d = dirs[name] = tmp_path_factory.mktemp(name)
        if toml is not None:
            (d / "nanods.toml").write_text(toml, encoding="utf-8")
        return d

    first = {
        "components": (fresh("components"), ["components"]),
        "components_json": (fresh("components_json"), ["components", "--json"]),
        "components_check": (fresh("components_check"), ["components", "--check"]),
        "typo": (fresh("typo", '[model]\nscale = "tiny"\nn_layr = 4\n'), ["inspect", "nanods.toml"]),
        "init": (fresh("init"), ["init"]),
        "init_tiny": (fresh("init_tiny"), ["init", "--scale", "tiny"]),
        "init_exists": (fresh("init_exists", USER_TOML), ["init"]),
        "inspect_small": (fresh("inspect_small"),
                          ["inspect", "--scale", "small", "--json", "--seq-len", "128", "--batch", "3"]),
        "help": (fresh("help"), ["--help"]),
        "bogus": (fresh("bogus"), ["inspect", "--bogus"]),
    }
    results = run_all(first)
    second = {
        "init_inspect": (dirs["init"], ["inspect", "nanods.toml", "--json"]),
        "init_force": (dirs["init_exists"], ["init", "--force"]),
    }
    # what init_exists left on disk, read before --force replaces it
    dirs["init_exists_after_refusal"] = (dirs["init_exists"] / "nanods.toml").read_text(encoding="utf-8")
    results.update(run_all(second))
    results["dirs"] = dirs
    return results


# ---------------------------------------------------------------------------------------------
# components


def _row(stdout, name):
    rows = [line for line in stdout.splitlines() if f" {name} " in line]
    assert rows, f"{name} missing from:\n{stdout}"
    return rows[0]


def test_components_lists_builtins(cli):
    proc = cli["components"]
    assert proc.returncode == 0, proc.stderr
    for group, names in BUILTINS.items():
        for name in names:
            row = _row(proc.stdout, name)
            assert group in row and "nanods" in row, row


def test_components_json(cli):
    proc = cli["components_json"]
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["components"]
    found = {(r["group"], r["name"]): r for r in rows}
    for group, names in BUILTINS.items():
        for name in names:
            assert (group, name) in found, f"{group} {name} missing: {sorted(found)}"
            assert found[(group, name)]["package"] == "nanods"
            assert "imports" not in found[(group, name)]  # not imported unless --check


def test_components_check_imports_each(cli):
    proc = cli["components_check"]
    assert proc.returncode == 0, proc.stderr
    for names in BUILTINS.values():
        for name in names:
            assert "yes" in _row(proc.stdout, name), f"{name} not shown importing:\n{proc.stdout}"
    assert "yes" not in _row(cli["components"].stdout, "mla")  # without --check nothing claims to import
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# errors are one line


def test_toml_typo_is_one_clear_line(cli):
    proc = cli["typo"]
    assert proc.returncode == 1
    lines = stderr_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert "n_layr" in lines[0] and "did you mean 'n_layer'" in lines[0]
    assert "Traceback" not in proc.stderr
    assert proc.stdout.strip() == ""


# ---------------------------------------------------------------------------------------------
# init


def test_init_writes_a_file_that_resolves(cli):
    assert cli["init"].returncode == 0, cli["init"].stderr
    text = (cli["dirs"]["init"] / "nanods.toml").read_text(encoding="utf-8")
    assert 'scale = "small"' in text
    proc = cli["init_inspect"]
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads(proc.stdout)["config"]
    for key, value in PRESETS["small"].items():
        assert cfg[key] == value, key


def test_init_refuses_to_overwrite(cli):
    proc = cli["init_exists"]
    assert proc.returncode == 1
    assert "--force" in proc.stderr and "Traceback" not in proc.stderr
    assert cli["dirs"]["init_exists_after_refusal"] == USER_TOML  # nothing on disk lost


def test_init_force_overwrites(cli):
    assert cli["init_force"].returncode == 0, cli["init_force"].stderr
    text = (cli["dirs"]["init_exists"] / "nanods.toml").read_text(encoding="utf-8")
    assert text != USER_TOML and text == (cli["dirs"]["init"] / "nanods.toml").read_text(encoding="utf-8")


def test_init_scale_tiny(cli):
    assert cli["init_tiny"].returncode == 0, cli["init_tiny"].stderr
    path = cli["dirs"]["init_tiny"] / "nanods.toml"
    assert 'scale = "tiny"' in path.read_text(encoding="utf-8")
    cfg = load_project(path).model  # in-process: the CLI's `inspect FILE` resolves it this same way
    for key, value in PRESETS["tiny"].items():
        assert getattr(cfg, key) == value, key


def test_init_unknown_scale_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = main_in_process(["init", "--scale", "tinny"], capsys)
    assert code == 1
    assert "did you mean 'tiny'" in err
    assert not (tmp_path / "nanods.toml").exists()


# ---------------------------------------------------------------------------------------------
# inspect


def test_inspect_small_json(cli):
    proc = cli["inspect_small"]
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    cfg = info["config"]
    assert cfg["n_layer"] == 6 and cfg["n_embd"] == 384 and cfg["attention"] == "mla"

    per_token = cfg["n_layer"] * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * 2  # bfloat16
    assert info["kv_cache_bytes_per_token"] == per_token
    mha = 2 * cfg["n_layer"] * cfg["n_kv_head"] * (cfg["n_embd"] // cfg["n_head"]) * 2
    assert info["kv_cache_bytes_per_token_mha"] == mha
    assert info["kv_cache_bytes_per_token_mha"] > info["kv_cache_bytes_per_token"]
    assert info["kv_cache_bytes"] == per_token * 128 * 3

    model = nanods.create_nano_deepseek(scale="small")  # built for real, on CPU
    assert info["params_total"] == sum(p.numel() for p in model.parameters())
    assert 0 < info["params_active"] < info["params_total"]  # 2 of 4 routed experts are idle per token
    assert info["flops_per_token"] > 0


# ---------------------------------------------------------------------------------------------
# usage


def test_help(cli):
    proc = cli["help"]
    assert proc.returncode == 0, proc.stderr
    for command in ("components", "init", "inspect"):
        assert command in proc.stdout


def test_unknown_option_fails_without_traceback(cli):
    proc = cli["bogus"]
    assert proc.returncode != 0
    assert "--bogus" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_option_exits_2(cli):
    proc = cli["bogus"]
    assert proc.returncode == 2, (proc.returncode, proc.stderr)


# ---------------------------------------------------------------------------------------------
# an uninstalled checkout


@pytest.fixture
def fresh_registry():
    registry.components.cache_clear()
    yield
    registry.components.cache_clear()


def _not_installed(monkeypatch):
    real = importlib.metadata.distribution

    def distribution(name):
        if name.replace("_", "-").lower() == "nanods":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)


def test_uninstalled_checkout_says_pip_install(monkeypatch, fresh_registry):
    _not_installed(monkeypatch)
    with pytest.raises(NanodsError, match=r"pip install -e \."):
        registry.find("attention", "mla")
    with pytest.raises(NanodsError, match=r"pip install -e \."):
        registry.as_rows()


def test_installed_checkout_finds_components(fresh_registry):
    assert registry.find("attention", "mla").dist == "nanods"


def test_uninstalled_checkout_cli_says_pip_install(monkeypatch, fresh_registry, capsys):
    _not_installed(monkeypatch)
    code, out, err = main_in_process(["components"], capsys)
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install -e ." in lines[0], err
    assert "Traceback" not in err and out.strip() == ""


# ---------------------------------------------------------------------------------------------
# sample


@pytest.fixture
def sample_ckpt(tmp_path, monkeypatch):
    """A byte-tokenizer checkpoint with a 32-token context; the test runs in a directory without nanods.toml,
    with an empty stdin piped in."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    model = build(vocab_size=320, tokenizer_vocab_size=257, sequence_len=32)
    return str(checkpoint.save(tmp_path / "run", model, model.config, byte_tokenizer(), 1, {}, {}, {}))


def _error_lines(err):
    return [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("option,value,shown", [
    ("--top-p", "0", "0.0"), ("--top-p", "1.5", "1.5"), ("--top-p", "nan", "nan"), ("--temperature", "nan", "nan"),
    ("--temperature", "inf", "inf"), ("--temperature", "-1", "-1.0"), ("--top-k", "-1", "-1"),
    ("--max-new-tokens", "0", "0"), ("--num-samples", "0", "0"),
])
def test_sample_option_errors_name_the_option_and_value(option, value, shown, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = main_in_process(["sample", "missing.safetensors", option, value], capsys)  # checked before loading
    assert code == 2, err
    errors = [line for line in _error_lines(err) if line.startswith("Error:")]
    assert len(errors) == 1 and f"'{option}'" in errors[0] and errors[0].endswith(f", got {shown}"), err
    assert "Traceback" not in err and out == ""


@pytest.mark.parametrize("key,value", [("top_p", "0.0"), ("temperature", "nan"), ("max_new_tokens", "0"),
                                       ("top_k", "-3")])
def test_sample_checks_the_sample_table_of_nanods_toml(key, value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nanods.toml").write_text(f"[sample]\n{key} = {value}\n", encoding="utf-8")
    code, out, err = main_in_process(["sample", "missing.safetensors"], capsys)
    assert code == 1
    lines = _error_lines(err)
    assert len(lines) == 1 and key in lines[0] and f"got {value}" in lines[0], err
    assert out == ""


@pytest.mark.parametrize("where", ["stdin", "file", "option"])
def test_a_prompt_that_is_not_utf8_is_one_line(where, sample_ckpt, monkeypatch, capsys):
    data = b"abc\xffdef"
    if where == "stdin":
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
        args, source = [], "the prompt on stdin"
    elif where == "file":
        with open("prompt.txt", "wb") as f:
            f.write(data)
        args, source = ["--prompt-file", "prompt.txt"], "prompt file 'prompt.txt'"
    else:  # how Python hands over command-line bytes that are not UTF-8
        args, source = ["--prompt", data.decode("utf-8", "surrogateescape")], "--prompt"
    code, out, err = main_in_process(["sample", sample_ckpt, "-q", *args], capsys)
    assert code == 1
    lines = _error_lines(err)
    assert len(lines) == 1 and f"{source} is not UTF-8 text (invalid start byte at byte 3)" in lines[0], err
    assert out == ""


def test_default_max_new_tokens_is_lowered_to_fit_the_context(sample_ckpt, capsys):
    code, out, err = main_in_process(["sample", sample_ckpt, "--prompt", "ab", "--temperature", "0", "-q"], capsys)
    assert code == 0, err
    assert _error_lines(err) == ["note: --max-new-tokens 256 lowered to 29 to fit the model's 32-token context"]
    assert out.endswith("\n") and out.strip()


@pytest.mark.parametrize("toml", [None, "[sample]\nmax_new_tokens = 40\n"])
def test_an_explicit_max_new_tokens_that_does_not_fit_is_an_error(toml, sample_ckpt, capsys):
    if toml is not None:
        with open("nanods.toml", "w", encoding="utf-8") as f:
            f.write(toml)
    code, out, err = main_in_process(["sample", sample_ckpt, *([] if toml else ["--max-new-tokens", "40"])], capsys)
    assert code == 1
    lines = _error_lines(err)
    where = "max_new_tokens in [sample] of nanods.toml" if toml else "--max-new-tokens"
    assert len(lines) == 1 and f"{where} (40) exceeds the model's context of 32 tokens" in lines[0], err
    assert out == ""


def test_a_prompt_that_fills_the_context_is_an_error(sample_ckpt, capsys):
    code, out, err = main_in_process(["sample", sample_ckpt, "--prompt", "x" * 31], capsys)
    assert code == 1
    lines = _error_lines(err)
    assert len(lines) == 1 and "(32 tokens" in lines[0] and "32-token context" in lines[0], err


GENERATED = "\x1b[2Jhi\x1b]0;pwned\x07\tok"


def _stream_of(ids):
    """A stand-in for nanods.generate.stream: these ids in every row (byte tokenizer: id = byte, 256 = end of text),
    whatever the model would say."""
    def fake(model, idx, max_new_tokens, *args, **kwargs):
        for i in ids:
            yield torch.full((idx.shape[0],), i)

    return fake


_fake_stream = _stream_of(GENERATED.encode())


@pytest.mark.parametrize("num_samples", [1, 2])
@pytest.mark.parametrize("tty", [False, True])
def test_generated_text_is_printable_on_a_terminal_and_exact_in_a_pipe(tty, num_samples, sample_ckpt, monkeypatch,
                                                                       capsys):
    monkeypatch.setattr("nanods.generate.stream", _fake_stream)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: tty)
    code, out, err = main_in_process(["sample", sample_ckpt, "--num-samples", str(num_samples), "-q",
                                      "--max-new-tokens", "20"], capsys)
    assert code == 0, err
    text = "\\x1b[2Jhi\\x1b]0;pwned\\x07\tok" if tty else GENERATED
    expected = text if num_samples == 1 else "\n".join(f"--- sample {i} ---\n{text}" for i in (1, 2))
    assert out == expected + "\n"


@pytest.mark.parametrize("num_samples", [1, 2])
def test_echo_prints_the_prompt_before_each_continuation(num_samples, sample_ckpt, monkeypatch, capsys):
    monkeypatch.setattr("nanods.generate.stream", _stream_of(b"hi"))
    code, out, err = main_in_process(["sample", sample_ckpt, "--prompt", "ab", "--echo", "-q", "--max-new-tokens", "5",
                                      "--num-samples", str(num_samples)], capsys)
    assert code == 0, err
    assert out == ("abhi\n" if num_samples == 1 else "--- sample 1 ---\nabhi\n--- sample 2 ---\nabhi\n")


@pytest.mark.parametrize("num_samples", [1, 2])
@pytest.mark.parametrize("ending", ["end of text", "last token"])
def test_a_character_cut_off_by_the_end_of_a_sample_is_shown_as_a_replacement(ending, num_samples, sample_ckpt,
                                                                              monkeypatch, capsys):
    ids = [*"aé".encode()][:-1] + ([byte_tokenizer().eot_id] if ending == "end of text" else [])
    monkeypatch.setattr("nanods.generate.stream", _stream_of(ids))  # as stream does, it stops when all samples end
    new_tokens = len(ids) + (5 if ending == "end of text" else 0)
    code, out, err = main_in_process(["sample", sample_ckpt, "-q", "--max-new-tokens", str(new_tokens),
                                      "--num-samples", str(num_samples)], capsys)
    assert code == 0, err
    assert out == ("a\ufffd\n" if num_samples == 1 else "--- sample 1 ---\na\ufffd\n--- sample 2 ---\na\ufffd\n")


def test_sample_device_defaults_to_auto(sample_ckpt, monkeypatch, capsys):
    from nanods import device

    asked = []
    real = device.resolve_device
    monkeypatch.setattr(device, "resolve_device", lambda name: asked.append(name) or real(name))
    code, _, err = main_in_process(["sample", sample_ckpt, "-q", "--max-new-tokens", "2"], capsys)
    assert code == 0, err
    assert asked == ["auto"]  # resolved by resolve_device: cuda, else mps, else cpu, as train and bench do


# ---------------------------------------------------------------------------------------------
# paths: run folders, and files told by their content


@pytest.mark.parametrize("command", ["sample", "inspect"])
def test_a_run_folder_stands_for_its_checkpoint(command, sample_ckpt, capsys):
    folder = os.path.dirname(sample_ckpt)
    args = ["--prompt", "ab", "--temperature", "0", "-q", "--max-new-tokens", "3"] if command == "sample" else ["--json"]
    code, out, err = main_in_process([command, folder, *args], capsys)
    assert code == 0, err
    if command == "inspect":
        assert json.loads(out)["checkpoint"]["path"] == sample_ckpt


@pytest.mark.parametrize("command", ["sample", "inspect"])
def test_a_folder_without_a_checkpoint_is_named_as_a_folder(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "empty").mkdir(parents=True)
    code, out, err = main_in_process([command, "runs/empty"], capsys)
    assert code == 1 and out == ""
    assert _error_lines(err) == [("error: 'runs/empty' is a folder without ckpt.safetensors; give a checkpoint file "
                                  "or a run folder")]


def test_inspect_tells_a_checkpoint_by_its_content_not_its_name(sample_ckpt, capsys):
    os.rename(sample_ckpt, "weights.bin")
    code, out, err = main_in_process(["inspect", "weights.bin", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["checkpoint"]["path"] == "weights.bin"


def test_inspect_reads_a_project_file_of_any_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my.cfg").write_text('[model]\nscale = "tiny"\nn_layer = 3\n', encoding="utf-8")
    code, out, err = main_in_process(["inspect", "my.cfg", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["config"]["n_layer"] == 3


@pytest.mark.parametrize("command", ["sample", "inspect"])
def test_a_binary_is_neither_checkpoint_nor_project_file(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"PK\x03\x04\x14\x00\x00\x08\x08\x00\xff\xfe" + bytes(range(256)))
    code, out, err = main_in_process([command, "model.pt"], capsys)
    assert code == 1 and out == ""
    lines = _error_lines(err)
    assert len(lines) == 1 and lines[0].startswith(
        "error: 'model.pt' is not a safetensors checkpoint nor a nanods.toml project file; "), err
    assert "codec" not in err


def test_a_toml_syntax_error_keeps_its_toml_message(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.pt").write_text("[model\nn_layer = 4\n", encoding="utf-8")
    code, _, err = main_in_process(["inspect", "model.pt"], capsys)
    assert code == 1
    lines = _error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: model.pt is not valid TOML: "), err


def test_sample_refuses_a_project_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.toml").write_text('[model]\nscale = "tiny"\n', encoding="utf-8")
    code, _, err = main_in_process(["sample", "run.toml"], capsys)
    assert code == 1
    assert _error_lines(err) == [("error: 'run.toml' is text, not a checkpoint; give the ckpt.safetensors "
                                  "that `nanods train` wrote, or its run folder")]


def test_a_missing_path_is_not_found(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = main_in_process(["sample", "runs/tiny"], capsys)
    assert code == 1
    assert _error_lines(err) == ["error: 'runs/tiny' not found; check the path"]


# ---------------------------------------------------------------------------------------------
# version, help


def test_version(capsys):
    code, out, err = main_in_process(["--version"], capsys)
    assert code == 0, err
    assert out == f"nanods {nanods.__version__}\n"


def _flags(command):
    """The long names of a click command's flags, --help included."""
    return [name for p in command.params if getattr(p, "is_flag", False) for name in p.opts if name.startswith("--")]


@pytest.mark.parametrize("command", ["", "train", "sample", "inspect", "bench", "components", "init"])
def test_help_shows_flags_without_a_value_type(command, monkeypatch, capsys):
    import typer

    monkeypatch.setenv("COLUMNS", "200")
    group = typer.main.get_command(app)
    flags = [*_flags(group.commands[command] if command else group), "--help"]
    assert len(flags) > 1
    code, out, err = main_in_process([command, "--help"] if command else ["--help"], capsys)
    assert code == 0, err
    for flag in flags:
        row = re.search(rf"^\W*{flag}(?:\s+-\w)?\s+(\S+)", out, re.MULTILINE)
        assert row, f"{flag} missing from:\n{out}"
        assert not re.fullmatch(r"<.*>|[A-Z_]{3,}", row[1]), f"{flag} is shown taking a value {row[1]}:\n{out}"


# ---------------------------------------------------------------------------------------------
# init shows its scale's values


def test_profile_option_and_its_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no ./nanods.toml
    code, out, err = main_in_process(["inspect", "--scale", "tiny", "--profile", "deepseek", "--json"], capsys)
    assert code == 0, err
    config = json.loads(out)["config"]
    assert (config["activation"], config["norm_weights"]) == ("swiglu", True)
    code, _, err = main_in_process(["inspect", "--scale", "tiny", "--profile", "deepsek"], capsys)
    assert code == 1 and _error_lines(err) == ["error: unknown profile 'deepsek' (did you mean 'deepseek'?); "
                                               "choose one of: nanochat, deepseek"]


@pytest.mark.parametrize("scale", list(PRESETS))
def test_init_shows_the_values_of_its_scale(scale, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = main_in_process(["init", "--scale", scale], capsys)
    assert code == 0, err
    expected = resolve_project({}, scale=scale)
    assert load_project("nanods.toml") == expected
    text = (tmp_path / "nanods.toml").read_text(encoding="utf-8")
    train = expected.train
    for line in (f"# n_layer = {PRESETS[scale]['n_layer']}", f"# steps = {train.steps}", f"# lr = {train.lr!r}",
                 f"# seq_len = {train.seq_len}", f"# eval_every = {train.eval_every}"):
        assert f"\n{line} " in text or f"\n{line}\n" in text, line
    # every value shown is the real one: uncommented, the file still resolves to the preset
    shown = re.sub(r"^# (\w+ = (?!.*an example).*)$", r"\1", text, flags=re.MULTILINE)
    assert shown.count("\n# ") < text.count("\n# ") - 20
    (tmp_path / "shown.toml").write_text(shown, encoding="utf-8")
    assert load_project("shown.toml") == expected


# ---------------------------------------------------------------------------------------------
# the README's Python API


@pytest.mark.parametrize("readme", ["README.md", "README.zh-CN.md"])
def test_readme_python_api_prints_clean_text(readme, tmp_path, monkeypatch, capsys):
    text = (Path(__file__).resolve().parent.parent / readme).read_text(encoding="utf-8")
    code = text.split("\n## Python API\n", 1)[1].split("```python\n", 1)[1].split("\n```", 1)[0]
    model = build(vocab_size=320, tokenizer_vocab_size=257, sequence_len=128)
    path = checkpoint.save(tmp_path, model, model.config, byte_tokenizer(), 1, {}, {}, {})
    assert "runs/nanods/ckpt.safetensors" in code
    monkeypatch.setattr("nanods.generate.stream", _stream_of([*b"hi", byte_tokenizer().eot_id]))
    exec(compile(code.replace("runs/nanods/ckpt.safetensors", str(path)), readme, "exec"), {})
    assert capsys.readouterr().out == "hi\n"  # no <|endoftext|> before or after the text


def test_a_prompt_file_that_is_not_a_regular_file_is_named_as_such(sample_ckpt, capsys):
    code, out, err = main_in_process(["sample", sample_ckpt, "-q", "--prompt-file", "/dev/zero"], capsys)
    assert code == 1 and _error_lines(err) == ["error: prompt file '/dev/zero' is not a regular file; give a text file"]


def test_a_prompt_on_stdin_is_read_bounded(sample_ckpt, monkeypatch, capsys):
    monkeypatch.setattr("nanods.generate.MAX_PROMPT_BYTES", 100)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"x" * 101)))
    code, out, err = main_in_process(["sample", sample_ckpt, "-q"], capsys)
    assert code == 1 and "the prompt on stdin is longer than 100 B" in err


def test_too_many_samples_for_the_memory_are_refused_before_allocating(sample_ckpt, monkeypatch, capsys):
    monkeypatch.setattr("nanods.device.physical_memory", lambda: 2**20)
    code, out, err = main_in_process(["sample", sample_ckpt, "-q", "--num-samples", "1000", "--max-new-tokens", "4"],
                                     capsys)
    assert code == 1 and re.search(r"--num-samples 1000 needs about [\d.]+ MiB .* than half of this machine's "
                                   r"1 MiB; lower --num-samples", " ".join(err.split())), err
