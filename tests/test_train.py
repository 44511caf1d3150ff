"""nanods train: exact resume, safe output directories, NaN stops, --resume refusals, kill -9 safety."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import losses, project, resuming, signal_after_step
import torch
from safetensors.torch import load_file

import nanods
from nanods import checkpoint
from nanods.errors import NanodsError
from nanods.model import NanoDeepSeek
from nanods.safetensors_header import read_header
from nanods.train.loop import RunOptions, train
from nanods.train.run_dir import RunDir


@pytest.mark.parametrize("sets", [(), ("model.mtp_depth=1",)], ids=["plain", "mtp"])
def test_interrupted_and_resumed_run_equals_uninterrupted(sets, corpus, tmp_path, monkeypatch):
    assert train(project(corpus, tmp_path / "a", *sets), RunOptions()) == 0
    undo = signal_after_step(monkeypatch, 3, signal.SIGINT)  # a Ctrl-C arriving during step 3
    assert train(project(corpus, tmp_path / "b", *sets), RunOptions()) == 128 + signal.SIGINT  # stopped, exit 130
    assert read_header(tmp_path / "b" / "ckpt.safetensors")[1]["nanods.step"] == "3"
    undo()
    assert train(project(corpus, tmp_path / "b", *sets), RunOptions(resume=True)) == 0
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert list(a) == list(range(1, 9)) and a == b
    mtp = [[json.loads(line).get("mtp") for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
           for run in "ab"]
    assert mtp[0] == mtp[1] and all(m is None for m in mtp[0]) == (not sets)
    wa = load_file(tmp_path / "a" / "ckpt.safetensors")
    wb = load_file(tmp_path / "b" / "ckpt.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(k.endswith("expert_bias") and wa[k].abs().sum() > 0 for k in wa)


def test_resume_with_a_new_total_replans_the_tail(corpus, tmp_path, capsys):
    train(project(corpus, tmp_path), RunOptions())
    train(project(corpus, tmp_path, "train.steps=12"), resuming("train.steps=12"))
    assert "re-planned the schedule's tail: total 8 -> 12" in capsys.readouterr().err
    assert read_header(tmp_path / "ckpt.safetensors")[1]["nanods.step"] == "12"


def test_resume_refuses_a_changed_run(corpus, tmp_path):
    train(project(corpus, tmp_path), RunOptions())
    with pytest.raises(NanodsError, match=r"model.n_layer: 2 -> 3"):
        train(project(corpus, tmp_path, "model.n_layer=3"), resuming("model.n_layer=3"))
    with pytest.raises(NanodsError, match=r"train.batch_size: 4 -> 8"):
        train(project(corpus, tmp_path, "train.batch_size=8"), resuming("train.batch_size=8"))
    with pytest.raises(NanodsError, match=r"model.activation: 'relu2' -> 'swiglu'"):  # a profile changes the model too
        train(project(corpus, tmp_path, "model.profile=deepseek"), resuming("model.profile=deepseek"))


def test_out_dir_with_a_run_is_never_overwritten_silently(corpus, tmp_path):
    train(project(corpus, tmp_path), RunOptions())
    before = (tmp_path / "ckpt.safetensors").read_bytes()
    with pytest.raises(NanodsError, match="--resume.*--overwrite"):
        train(project(corpus, tmp_path), RunOptions())
    assert (tmp_path / "ckpt.safetensors").read_bytes() == before
    assert train(project(corpus, tmp_path, "train.steps=2"), RunOptions(overwrite=True)) == 0


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    original = NanoDeepSeek.loss_terms
    calls = {"n": 0}

    def poisoned(self, idx, targets):
        terms = original(self, idx, targets)
        calls["n"] += 1 if self.training else 0
        if calls["n"] > 2 * 5:  # micro-batches of steps 1..5 are fine; step 6 turns to NaN
            return terms._replace(total=terms.total * float("nan"), ce=terms.ce * float("nan"))
        return terms

    monkeypatch.setattr(NanoDeepSeek, "loss_terms", poisoned)
    with pytest.raises(NanodsError, match=r"loss became nan at step 6.*step 4\) is kept"):
        train(project(corpus, tmp_path), RunOptions())
    assert read_header(tmp_path / "ckpt.safetensors")[1]["nanods.step"] == "4"


def test_checkpoint_is_self_contained(corpus, tmp_path):
    train(project(corpus, tmp_path), RunOptions())
    _, meta = read_header(tmp_path / "ckpt.safetensors")
    assert {"nanods.config", "nanods.tokenizer", "nanods.version", "nanods.step", "nanods.components",
            "nanods.data", "nanods.expert_load"} <= meta.keys()
    assert json.loads(meta["nanods.components"])["router"] == {"name": "sigmoid", "dist": "nanods",
                                                                "version": nanods.__version__}
    assert json.loads(meta["nanods.data"])["tokens_seen"] == 8 * 4 * 32
    model, tokenizer = nanods.load(tmp_path / "ckpt.safetensors")
    assert model.config.tokenizer_vocab_size == len(tokenizer) and model.config.vocab_size % 64 == 0
    assert [p.name for p in tmp_path.glob("train_state_*")] == ["train_state_0000008.safetensors"]


def test_init_from_starts_a_new_run_from_weights(corpus, tmp_path):
    train(project(corpus, tmp_path / "a"), RunOptions())
    train(project(corpus, tmp_path / "b", "train.steps=2"), RunOptions(init_from=str(tmp_path / "a" / "ckpt.safetensors")))
    first_a, first_b = losses(tmp_path / "a")[1], losses(tmp_path / "b")[1]
    assert first_b < first_a  # it starts from trained weights, not from scratch


@pytest.mark.slow
def test_kill_9_at_random_moments_leaves_a_pair_that_resumes_exactly(corpus, tmp_path):
    """Kill a training process (saving every step) 20 times at random moments; each time the pair loads, pairs by
    run id and step, and resumes; the run finished after all that equals one never interrupted."""
    args = [sys.executable, "-m", "nanods", "train", "--scale", "tiny", "--steps", "150", "--dtype", "float32",
            "--set", f"train.data={json.dumps(corpus)}", "--set", "train.tokenizer=byte", "--set", "train.eval_every=1",
            "--set", "train.eval_batches=1", "--set", "train.seq_len=32", "--set", "train.batch_size=2",
            "--set", "train.sample_tokens=0", "--device", "cpu"]
    env = {**os.environ, "NANODS_CACHE": os.environ["NANODS_CACHE"], "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"

    def saved_step() -> int:
        try:
            return int(read_header(out / "ckpt.safetensors")[1]["nanods.step"])
        except NanodsError:  # not written yet
            return 0

    rng = random.Random(0)
    steps_seen = [0]
    for attempt in range(20):
        log = tmp_path / f"attempt{attempt}.log"
        with log.open("w") as stderr:
            proc = subprocess.Popen(args + ["--out", str(out)] + (["--resume"] if steps_seen[-1] else []), env=env,
                                    stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.time() + 60
        while saved_step() <= steps_seen[-1] and time.time() < deadline:  # this attempt is saving steps now
            assert proc.poll() is None, f"attempt {attempt} exited {proc.returncode}: {log.read_text()[-2000:]}"
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        model, _ = nanods.load(out / "ckpt.safetensors")
        _, meta = read_header(out / "ckpt.safetensors")
        step = int(meta["nanods.step"])
        state, train_meta = checkpoint.latest_state(out, step, meta["nanods.run"])
        assert train_meta["step"] == step and state
        steps_seen.append(step)
    assert all(a < b for a, b in zip(steps_seen, steps_seen[1:])), steps_seen  # every resume made progress
    finish = subprocess.run(args + ["--out", str(out), "--resume"], env=env, capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr[-2000:]
    assert not list(out.glob(".*.tmp"))
    reference = subprocess.run(args + ["--out", str(tmp_path / "reference")], env=env, capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr[-2000:]
    wa, wb = load_file(out / "ckpt.safetensors"), load_file(tmp_path / "reference" / "ckpt.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_is_exact_with_muon_too(corpus, tmp_path, monkeypatch):
    assert train(project(corpus, tmp_path / "a", "train.optimizer=muon"), RunOptions()) == 0
    undo = signal_after_step(monkeypatch, 5, signal.SIGINT)
    assert train(project(corpus, tmp_path / "b", "train.optimizer=muon"), RunOptions()) == 130
    undo()
    train(project(corpus, tmp_path / "b", "train.optimizer=muon"), RunOptions(resume=True))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


@pytest.mark.slow
def test_kill_9_during_an_overwrite_leaves_one_whole_run(corpus, tmp_path):
    """Kill `--overwrite` runs at random moments (start-up, setting the old run aside, the first steps, the
    first save); after each, the folder holds one complete run, the old one or the new one, and resumes."""
    args = [sys.executable, "-m", "nanods", "train", "--scale", "tiny", "--steps", "6", "--device", "cpu",
            "--set", f"train.data={json.dumps(corpus)}", "--set", "train.tokenizer=byte", "--set", "train.eval_every=3",
            "--set", "train.eval_batches=1", "--set", "train.seq_len=32", "--set", "train.batch_size=2",
            "--set", "train.sample_tokens=0", "--out", str(tmp_path / "run")]
    env = {**os.environ, "NANODS_CACHE": os.environ["NANODS_CACHE"], "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    assert subprocess.run(args, env=env, capture_output=True).returncode == 0
    rng = random.Random(1)
    runs = {read_header(out / "ckpt.safetensors")[1]["nanods.run"]}
    for _ in range(8):
        proc = subprocess.Popen(args + ["--overwrite"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 5.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        folder = RunDir(out)  # what the next trainer does first
        folder.acquire()
        folder.recover(print)
        folder.release()
        _, meta = read_header(out / "ckpt.safetensors")
        checkpoint.latest_state(out, int(meta["nanods.step"]), meta["nanods.run"])  # a matching pair
        nanods.load(out / "ckpt.safetensors")
        assert not (out / ".replaced").exists()
        runs.add(meta["nanods.run"])
    assert len(runs) > 1, "no overwrite ever completed a save: sleep longer"
    finish = subprocess.run(args + ["--resume", "--steps", "9"], env=env, capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr[-2000:]


def test_a_run_says_what_it_does_and_sums_itself_up(corpus, tmp_path, capsys):
    assert train(project(corpus, tmp_path), RunOptions()) == 0
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    for line in (r"data: \S+, \d+ documents, [\d.]+ KiB \(\d+ for validation\) \(\S+ m?s\)",
                 r"tokenizer: byte, 257 ids", r"tokens: [\d,]+ train, [\d,]+ val",
                 r"training: 8 steps, batch 4 x 32 tokens, lr 0.01 \(adamw\), warmup 2",
                 r"done: 8 steps, 1,024 tokens in \S+ (m?s|min) \([\d,]+ tok/s\); val loss [\d.]+, [\d.]+ bits/byte; "
                 r"peak memory [\d.]+ (MiB|GiB); checkpoint"):
        assert re.search(line, err), line
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    summary = rows[-1]
    assert summary["summary"] and summary["step"] == 8 and summary["tokens"] == 1024 and summary["peak_memory_bytes"] > 0
    loads = [r["expert_load_max_mean"] for r in rows if "val_loss" in r and not r.get("summary")]
    assert len(loads) == 2 and all(len(r) == 2 and all(1.0 <= x <= 4.0 for x in r) for r in loads)
    import matplotlib.pyplot as plt

    assert plt.imread(tmp_path / "loss.png").shape[0] > 600  # two panels: the loss and the expert load
