"""End to end as a user runs it: train tiny on the stdlib corpus, then sample and inspect the checkpoint."""

import json
import os
import subprocess
import sys

import pytest

from nanods.safetensors_header import read_header

pytestmark = pytest.mark.slow


def nanods(*args, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "nanods", *args], capture_output=True, text=True,
                          env=env, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`nanods train --scale tiny --steps 40 --out runs/tiny` in a fresh directory, once for the module."""
    root = tmp_path_factory.mktemp("e2e")
    env = {**os.environ, "NANODS_CACHE": os.environ.get("NANODS_CACHE") or str(root / "cache")}
    proc = nanods("train", "--scale", "tiny", "--steps", "40", "--out", "runs/tiny", env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root, env, proc


def test_tiny_run_learns_and_saves_the_design_metadata(run):
    root, _, proc = run
    out = root / "runs" / "tiny"
    tensors, meta = read_header(out / "ckpt.safetensors")
    assert {"nanods.config", "nanods.tokenizer", "nanods.version", "nanods.step", "nanods.components",
            "nanods.data", "nanods.expert_load"} <= meta.keys()
    assert meta["nanods.step"] == "40" and json.loads(meta["nanods.data"])["corpus"] == "stdlib"
    from safetensors import safe_open

    with safe_open(out / "ckpt.safetensors", "pt") as f:
        biases = [f.get_tensor(k) for k in tensors if k.endswith("expert_bias")]
    assert biases and all(b.abs().sum() > 0 for b in biases)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first_loss = next(r["loss"] for r in rows if r.get("step") == 1 and "loss" in r)
    final_val = [r["val_loss"] for r in rows if "val_loss" in r][-1]
    assert final_val < first_loss - 1.0, (first_loss, final_val)  # a nat below the uniform start
    assert (out / "loss.png").stat().st_size > 10_000
    assert proc.stdout.strip(), "the run prints a sample at the end"


def test_greedy_sampling_is_repeatable_and_equal_without_cache(run):
    root, env, _ = run
    ckpt = str(root / "runs" / "tiny" / "ckpt.safetensors")
    args = ["sample", ckpt, "--prompt", "def ", "--temperature", "0", "--max-new-tokens", "50", "--quiet"]
    a, b, c, d = (nanods(*args, *extra, env=env) for extra in ([], [], ["--no-cache"], ["--compile"]))
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.strip()
    assert a.stdout == c.stdout  # the latent cache with absorbed decode reproduces the full recomputation
    assert d.returncode == 0 and a.stdout == d.stdout, d.stderr  # the compiled decode step too
    for extra in (["--num-samples", "2"], ["--no-cache"]):
        refused = nanods(*args, "--compile", *extra, env=env)
        assert refused.returncode == 1 and "--compile decodes one sample" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr


def test_sampling_with_a_seed_is_repeatable_and_pipes_cleanly(run):
    root, env, _ = run
    ckpt = str(root / "runs" / "tiny" / "ckpt.safetensors")
    a = nanods("sample", ckpt, "--seed", "3", "--max-new-tokens", "40", "--num-samples", "2", env=env)
    b = nanods("sample", ckpt, "--seed", "3", "--max-new-tokens", "40", "--num-samples", "2", env=env)
    assert a.returncode == 0 and a.stdout == b.stdout and "tok/s" in a.stderr and "tok/s" not in a.stdout
    piped = nanods("sample", ckpt, "--max-new-tokens", "5", "--quiet", env=env, input="import os\n")
    assert piped.returncode == 0


def test_inspect_reads_the_checkpoint(run):
    root, env, _ = run
    proc = nanods("inspect", str(root / "runs" / "tiny" / "ckpt.safetensors"), "--json", env=env)
    info = json.loads(proc.stdout)
    assert info["checkpoint"]["values"] >= info["params_total"] > info["params_active"]
    assert len(info["expert_load"]) == info["config"]["n_layer"]


def test_bad_checkpoints_fail_with_one_line(run, tmp_path):
    root, env, _ = run
    good = (root / "runs" / "tiny" / "ckpt.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.safetensors").write_text("not a checkpoint")
    for name, words in (("cut.safetensors", "truncated"), ("text.safetensors", "not a safetensors")):
        for command in ("inspect", "sample"):
            proc = nanods(command, str(tmp_path / name), env=env)
            assert proc.returncode == 1 and words in proc.stderr and "Traceback" not in proc.stderr
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
