"""benchmarks/ablation.py, compare_hf.py and dsa_decode.py: bad input is one line before any work; nothing on disk
is lost."""

import importlib.util
import json
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


def test_ablation_refuses_to_delete_files_that_are_not_a_run(tmp_path):
    (tmp_path / "mla-moe").mkdir()
    (tmp_path / "mla-moe" / "metrics.jsonl").write_text("")
    (tmp_path / "mla-moe" / "notes.txt").write_text("keep me")
    proc = script("ablation.py", "--out", str(tmp_path))
    assert proc.returncode == 2 and "mla-moe/notes.txt: not part of a nanods run" in proc.stderr
    assert (tmp_path / "mla-moe" / "notes.txt").read_text() == "keep me"


def fake_training(returncode: int = 0, interrupt: bool = False):
    """A stand-in for subprocess.run(nanods train ...) that writes half a run into --out."""
    def run(cmd, **kwargs):
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir()
        (out / "metrics.jsonl").write_text("new run\n")
        if interrupt:
            raise KeyboardInterrupt
        return subprocess.CompletedProcess(cmd, returncode)
    return run


def previous_run(root: Path) -> Path:
    (root / "mha-dense").mkdir()
    (root / "mha-dense" / "metrics.jsonl").write_text("previous run\n")
    return root / "mha-dense" / "metrics.jsonl"


@pytest.mark.parametrize("failure", ["interrupt", "error"])
def test_ablation_unfinished_variant_keeps_the_previous_run(failure, tmp_path, monkeypatch):
    ablation = load("ablation.py")
    metrics = previous_run(tmp_path)
    monkeypatch.setattr(ablation.subprocess, "run", fake_training(1, interrupt=failure == "interrupt"))
    with pytest.raises(KeyboardInterrupt if failure == "interrupt" else SystemExit):
        ablation.run_variant("mha", "dense", "1m", tmp_path)
    assert metrics.read_text() == "previous run\n" and [p.name for p in tmp_path.iterdir()] == ["mha-dense"]


def test_ablation_finished_variant_replaces_the_previous_run(tmp_path, monkeypatch):
    ablation = load("ablation.py")
    metrics = previous_run(tmp_path)
    monkeypatch.setattr(ablation.subprocess, "run", fake_training())
    monkeypatch.setattr(ablation, "read_run", lambda *args: {"val_bpb": 1.0})
    assert ablation.run_variant("mha", "dense", "1m", tmp_path) == {"val_bpb": 1.0}
    assert metrics.read_text() == "new run\n" and [p.name for p in tmp_path.iterdir()] == ["mha-dense"]


def test_ablation_puts_back_a_run_a_killed_ablation_left_aside(tmp_path, monkeypatch):
    ablation = load("ablation.py")
    metrics = previous_run(tmp_path)
    (tmp_path / "mha-dense").rename(tmp_path / ".mha-dense.previous")  # killed while training a new one
    (tmp_path / "mha-dense").mkdir()
    (tmp_path / "mha-dense" / "metrics.jsonl").write_text("half a run\n")
    monkeypatch.setattr(ablation.subprocess, "run", fake_training(interrupt=True))
    with pytest.raises(KeyboardInterrupt):
        ablation.run_variant("mha", "dense", "1m", tmp_path)
    assert metrics.read_text() == "previous run\n" and [p.name for p in tmp_path.iterdir()] == ["mha-dense"]


@pytest.mark.parametrize("name,args,error", [
    ("compare_hf.py", ["--repeats", "0"], "must be a whole number >= 1"),
    ("compare_hf.py", ["--only", "bogus"], "matches none of: 'train 8x256', 'prefill 1x512'"),
    ("dsa_decode.py", ["--contexts", "1,x"], "--contexts: must be comma-separated"),
    ("dsa_decode.py", ["--repeats", "0"], "--repeats: must be a whole number >= 1"),
])
def test_bad_input_fails_before_any_work(name, args, error):
    proc = script(name, *args)
    assert proc.returncode == 2 and error in proc.stderr.splitlines()[-1] and "Traceback" not in proc.stderr


def test_compare_hf_without_transformers_says_what_to_install():
    proc = script("compare_hf.py", "--only", "prefill", prelude="sys.modules['transformers'] = None")
    assert proc.returncode == 1 and proc.stderr.strip() == ('compare_hf.py needs transformers with DeepseekV3 (>= 5.24): '
                                                     'pip install -e ".[bench]"')


def test_dsa_decode_times_mla_and_dsa_decode_steps():
    proc = script("dsa_decode.py", "--scale", "tiny", "--contexts", "64,128", "--repeats", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["context"] for r in rows] == [64, 128] and all("mla_prefill_s" not in r for r in rows)
    assert all(r[f"{a}_decode_s"] > 0 for r in rows for a in ("mla", "dsa"))
