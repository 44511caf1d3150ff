"""benchmarks/ablation.py and compare_hf.py: bad input is one line before any work; nothing on disk is lost."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "benchmarks"


def script(name: str, *args: str, prelude: str = "pass") -> subprocess.CompletedProcess:
    """Run benchmarks/<name> with args (after the Python statement prelude) -> the finished process."""
    code = f"import runpy, sys; {prelude}; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code, str(SCRIPTS / name), *args], capture_output=True, text=True,
                          timeout=120)


def load(name: str):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), SCRIPTS / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("budget", ["0", "-5", "abc", "0s"])
def test_ablation_bad_budget_is_one_line_and_creates_nothing(budget, tmp_path):
    proc = script("ablation.py", f"--budget={budget}", "--out", str(tmp_path / "abl"))
    assert proc.returncode == 2 and "is not a positive duration" in proc.stderr.splitlines()[-1]
    assert "Traceback" not in proc.stderr and not (tmp_path / "abl").exists()


def test_ablation_refuses_a_file_as_out(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    proc = script("ablation.py", "--out", str(tmp_path / "notes.txt"))
    assert proc.returncode == 2 and "exists and is not a folder" in proc.stderr
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_ablation_interrupted_variant_keeps_the_previous_run(tmp_path, monkeypatch):
    ablation = load("ablation.py")
    old = tmp_path / "mha-dense"
    old.mkdir()
    (old / "metrics.jsonl").write_text("previous run\n")

    def interrupted_training(cmd, **kwargs):
        partial = Path(cmd[cmd.index("--out") + 1])
        partial.mkdir()
        (partial / "metrics.jsonl").write_text("half a run\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(ablation.subprocess, "run", interrupted_training)
    with pytest.raises(KeyboardInterrupt):
        ablation.run_variant("mha", "dense", "1m", tmp_path)
    assert (old / "metrics.jsonl").read_text() == "previous run\n"
    assert [p.name for p in tmp_path.iterdir()] == ["mha-dense"]  # no partial folder left


def test_ablation_finished_variant_replaces_the_previous_run(tmp_path):
    ablation = load("ablation.py")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "stale").write_text("")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "fresh").write_text("")
    ablation.replace_dir(tmp_path / "new", tmp_path / "old")
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and [p.name for p in (tmp_path / "old").iterdir()] == ["fresh"]


@pytest.mark.parametrize("args,error", [(["--repeats", "0"], "must be a whole number >= 1"),
                                        (["--only", "bogus"], "matches none of: 'train 8x256', 'prefill 1x512'")])
def test_compare_hf_bad_input_fails_before_any_work(args, error):
    proc = script("compare_hf.py", *args)
    assert proc.returncode == 2 and error in proc.stderr.splitlines()[-1] and "Traceback" not in proc.stderr


def test_compare_hf_without_transformers_says_what_to_install():
    proc = script("compare_hf.py", "--only", "prefill", prelude="sys.modules['transformers'] = None")
    assert proc.returncode == 1 and proc.stderr.strip() == 'compare_hf.py needs transformers: pip install -e ".[bench]"'
