"""The README's commands run as written, in order, in a copy of the repository (a fresh clone).

Every command of README.md's ```bash, ```sh and ```console blocks is in exactly one of three lists:
AS_WRITTEN (run exactly as the README writes it), CHEAPER (run as the listed cheap equivalent, for the
reason given) or SKIPPED (not run, for the reason given; a skipped `nanods` command is still run with
`--help` appended, which fails on an option that does not exist). A command in none of them fails
test_every_readme_command_is_listed, so the README cannot gain a command that nothing checks.
README.zh-CN.md must hold the same commands in the same order.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
READMES = ("README.md", "README.zh-CN.md")
SHELL_BLOCKS = ("bash", "sh", "shell", "console")

# Run exactly as written.
AS_WRITTEN = [
    "nanods train --scale tiny --steps 40 --out runs/tiny",
    "nanods train --resume --out runs/tiny --steps 80",
    "nanods train --init-from runs/tiny/ckpt.safetensors --data nanods/ --steps 20 --out runs/ft",
    "nanods train --scale tiny --set train.optimizer=muon --steps 40 --out runs/muon",
    'nanods sample runs/nanods/ckpt.safetensors --prompt "def parse_args(" --temperature 0',
    "nanods inspect runs/nanods/ckpt.safetensors",
    "nanods inspect --scale base",
    "nanods components",
    "nanods train --scale tiny --router noisy-topk --steps 20 --out runs/noisy",
    "nanods init mine.toml",
    "nanods inspect --scale tiny --set model.n_layr=4",
    "nanods train --scale tiny --profile deepseek --steps 40 --out runs/ds",
    "nanods convert runs/ds hf-ds",
    "nanods train --scale tiny --attention dsa --steps 60 --out runs/dsa",
    "nanods train --init-from runs/tiny/ckpt.safetensors --attention dsa --steps 60 --out runs/tiny-dsa",
    "nanods train --scale tiny --set model.mtp_depth=2 --steps 40 --out runs/mtp",
    'nanods sample runs/mtp --speculative --temperature 0 --prompt "def "',
]

# Too long for a test: run as this cheaper command instead. {python} is this interpreter, {site} a folder
# that every command has on PYTHONPATH.
CHEAPER = {
    "nanods train --scale small": (
        "nanods train --scale small --steps 2",
        ("2 steps instead of the 8-minute budget: the same model, corpus, tokenizer training and run folder "
         "(runs/nanods, which the sample and inspect commands after it read)")),
    "pip install -e plugins/nanods-noisy-topk": (
        "{python} -m pip install --quiet --no-deps --target {site} plugins/nanods-noisy-topk",
        "the plugin installed into a folder on PYTHONPATH, not into the environment the other tests run in"),
}

INSTALLED = "the environment running this test is the one these lines install (.ci/run runs them)"
SKIPPED = {
    "pip install torch==2.13.0": INSTALLED,
    "pip install -e .": INSTALLED,
    'pip install -e ".[dev]"': INSTALLED,
    "pytest": "the test suite itself, which is running this test",
    'pytest -m "not slow"': "a part of the test suite, which is running this test",
    "nanods bench --scale small": "minutes on 2 cores; tests/test_bench.py::test_bench_cli_json runs the same "
                                  "command on the tiny model, timed once",
    "nanods bench --ckpt runs/mtp": "the whole bench again; tests/test_mtp.py::"
                                    "test_bench_measures_speculative_decoding_of_a_checkpoint runs its --ckpt rows",
    "nanods bench --scale small --compile": "compiling takes minutes on 2 cores; "
                                            "tests/test_bench.py::test_bench_compiled_decode_rows runs the compiled rows",
    "torchrun --standalone --nproc_per_node 2 -m nanods train --scale small": "two processes for an 8-minute budget; "
                                                                              "tests/test_distributed.py trains with "
                                                                              "DDP and FSDP2",
}


@dataclass
class Command:
    argv: tuple[str, ...]
    output: list[str] = field(default_factory=list)  # the lines a ```console block shows after it


def commands(readme: str) -> list[Command]:
    """The commands of the shell blocks, in order; `a && b` is two commands, comments are dropped."""
    text = (ROOT / readme).read_text(encoding="utf-8")
    found = []
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE):
        if lang not in SHELL_BLOCKS:
            continue
        for line in body.replace("\\\n", " ").splitlines():
            if lang == "console" and not line.startswith("$ "):
                if line.strip() and found:
                    found[-1].output.append(line.strip())
                continue
            words = shlex.split(line.removeprefix("$ "), comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                found.append(Command(tuple(words[:cut])))
                words = words[cut + 1:]
    return found


def argv(command: str) -> tuple[str, ...]:
    return tuple(shlex.split(command))


def test_every_readme_command_is_listed():
    lists = {"AS_WRITTEN": {argv(c) for c in AS_WRITTEN}, "CHEAPER": {argv(c) for c in CHEAPER},
             "SKIPPED": {argv(c) for c in SKIPPED}}
    found = {c.argv for c in commands("README.md")}
    assert len(found) > 10
    for command in found:
        homes = [name for name, listed in lists.items() if command in listed]
        assert len(homes) == 1, f"{shlex.join(command)!r} is in {homes or 'no list'}: add it to exactly one of " \
                                f"AS_WRITTEN, CHEAPER or SKIPPED in tests/test_readme.py"
    for name, listed in lists.items():
        stale = [shlex.join(c) for c in listed - found]
        assert not stale, f"{name} lists commands README.md no longer has: {stale}"


def test_the_chinese_readme_has_the_same_commands_and_sections():
    english, chinese = (commands(r) for r in READMES)
    assert [(c.argv, c.output) for c in chinese] == [(c.argv, c.output) for c in english]
    headings = [re.findall(r"^##+ ", (ROOT / r).read_text(encoding="utf-8"), flags=re.MULTILINE) for r in READMES]
    assert headings[0] == headings[1]


@pytest.mark.parametrize("readme", READMES)
def test_the_files_and_links_the_readme_names_exist(readme):
    text = (ROOT / readme).read_text(encoding="utf-8")
    named = re.findall(r"\]\(([^)#:]+)\)", text)  # relative links
    named += re.findall(r"`((?:nanods|docs|tests|plugins|benchmarks|\.ci)/[\w./-]*)`", text)
    assert len(named) > 20
    missing = sorted({path for path in named if not (ROOT / path).exists()})
    assert not missing, f"{readme} names files that do not exist: {missing}"


@pytest.mark.parametrize("readme", READMES)
def test_the_scales_table_is_what_inspect_reports(readme):
    from nanods.config import NanoDeepSeekConfig, preset
    from nanods.inspect import report

    text = (ROOT / readme).read_text(encoding="utf-8")
    rows = {cells[0]: cells[1:] for cells in (
        [c.strip() for c in line.strip("|").split("|")]
        for line in text.splitlines() if re.match(r"\| (tiny|small|base|large) ", line))}
    assert list(rows) == ["tiny", "small", "base", "large"]
    for scale, cells in rows.items():
        config = NanoDeepSeekConfig(**preset(scale))
        moe = report(config)
        dense_mha = report(NanoDeepSeekConfig(**{**preset(scale), "attention": "mha", "ffn": "dense"}))
        expected = [str(config.n_layer), str(config.n_embd), str(config.n_head),
                    f"{config.num_experts} ({config.top_k} + {config.n_shared_experts})", f"{config.vocab_size:,}",
                    f"{moe['params_total']:,}", f"{moe['params_active']:,}", f"{moe['kv_cache_bytes_per_token']:,} B",
                    f"{moe['kv_cache_bytes_per_token_mha']:,} B", f"{dense_mha['params_total']:,}"]
        assert cells == expected, scale


def runnable(command: Command, python: str, site: Path) -> list[str] | None:
    """What the test runs for a README command: itself, its cheaper equivalent, or None when skipped."""
    for listed, (cheaper, _why) in CHEAPER.items():
        if command.argv == argv(listed):
            return [w.format(python=python, site=site) for w in shlex.split(cheaper)]
    if any(command.argv == argv(listed) for listed in SKIPPED):
        return None
    return list(command.argv)


@pytest.mark.slow
def test_the_readme_commands_run_in_order_as_written(tmp_path):
    clone = tmp_path / "nanods"
    shutil.copytree(ROOT, clone, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "runs", "build", "dist", "__pycache__", "*.egg-info", ".pytest_cache", "*.safetensors"))
    site = tmp_path / "site"
    site.mkdir()
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "nanods").exists(), "the nanods command is not installed beside this python"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "NANODS_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(site), "COLUMNS": "200", "NO_COLOR": "1"}
    env.pop("NANODS_DEBUG", None)
    # build the plugin offline with this environment's setuptools where it has one
    offline = ["--no-build-isolation", "--no-index"] if importlib.util.find_spec("setuptools") else []

    ran = []
    for command in commands("README.md"):
        words = runnable(command, sys.executable, site)
        if words is None:
            nanods_part = _nanods_part(command.argv)
            if nanods_part:  # not run, but every option it names must exist
                words = [sys.executable, "-m", "nanods", *nanods_part, "--help"]
            else:
                continue
        elif words[1:4] == ["-m", "pip", "install"]:
            words += offline
        start = time.monotonic()
        proc = subprocess.run(words, cwd=clone, env=env, capture_output=True, text=True, timeout=900, check=False)
        print(f"{time.monotonic() - start:6.1f} s  {shlex.join(words)}")  # shown with -s, or on a failure
        output = " ".join((proc.stdout + proc.stderr).split())
        fails = bool(command.output) and command.output[0].startswith("error:")
        assert proc.returncode == (1 if fails else 0), f"{shlex.join(words)}:\n{proc.stderr[-3000:]}"
        for line in command.output:
            assert " ".join(line.split()) in output, f"{shlex.join(words)} did not print {line!r}:\n{output[-3000:]}"
        ran.append(shlex.join(words))
    assert len(ran) >= len(AS_WRITTEN) + len(CHEAPER)
    for run in ("runs/nanods", "runs/tiny", "runs/ft", "runs/muon", "runs/noisy"):
        assert (clone / run / "ckpt.safetensors").is_file(), run
    assert (clone / "mine.toml").is_file()


def _nanods_part(words: tuple[str, ...]) -> tuple[str, ...] | None:
    """The nanods arguments of `nanods ...` or of `... -m nanods ...` (torchrun), else None."""
    if words[0] == "nanods":
        return words[1:]
    for i in range(len(words) - 1):
        if words[i:i + 2] == ("-m", "nanods"):
            return words[i + 2:]
    return None
