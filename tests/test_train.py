"""nanods train: exact resume, safe output directories, NaN stops, --resume refusals, kill -9 safety."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import nanods
from nanods import checkpoint
from nanods.config import resolve_project
from nanods.errors import NanodsError
from nanods.model import NanoDeepSeek
from nanods.safetensors_header import read_header
from nanods.train import loop
from nanods.train.loop import RunOptions, train

SOURCE = Path(__file__).resolve().parent.parent / "nanods"


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """A small folder corpus (nanods' own sources) and a private token cache."""
    monkeypatch.setenv("NANODS_CACHE", str(tmp_path / "cache"))
    return str(SOURCE)


def project(corpus, out, *sets):
    base = [f"train.data={json.dumps(corpus)}", "train.tokenizer=byte", f"train.out={json.dumps(str(out))}",
            "train.steps=8", "train.batch_size=4", "train.micro_batch_size=2", "train.seq_len=32",
            "train.eval_every=4", "train.eval_batches=2", "train.warmup_steps=2", "train.sample_tokens=0",
            "train.device=cpu", "model.n_layer=2", "model.sequence_len=64"]
    return resolve_project({}, scale="tiny", sets=base + list(sets))


def losses(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_interrupted_and_resumed_run_equals_uninterrupted(corpus, tmp_path, monkeypatch):
    assert train(project(corpus, tmp_path / "a"), RunOptions()) == 0
    original_step = loop.TrainReport.step

    def interrupt_after_3(self, row, total):  # a Ctrl-C arriving during step 3
        original_step(self, row, total)
        if row["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(loop.TrainReport, "step", interrupt_after_3)
    assert train(project(corpus, tmp_path / "b"), RunOptions()) == 0
    assert read_header(tmp_path / "b" / "ckpt.safetensors")[1]["nanods.step"] == "3"
    monkeypatch.setattr(loop.TrainReport, "step", original_step)
    assert train(project(corpus, tmp_path / "b"), RunOptions(resume=True)) == 0
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert list(a) == list(range(1, 9)) and a == b
    wa = load_file(tmp_path / "a" / "ckpt.safetensors")
    wb = load_file(tmp_path / "b" / "ckpt.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(k.endswith("expert_bias") and wa[k].abs().sum() > 0 for k in wa)


def test_resume_with_a_new_total_replans_the_tail(corpus, tmp_path, capsys):
    train(project(corpus, tmp_path), RunOptions())
    train(project(corpus, tmp_path, "train.steps=12"), RunOptions(resume=True, steps_given=True))
    assert "re-planned the schedule's tail: total 8 -> 12" in capsys.readouterr().err
    assert read_header(tmp_path / "ckpt.safetensors")[1]["nanods.step"] == "12"


def test_resume_refuses_a_changed_run(corpus, tmp_path):
    train(project(corpus, tmp_path), RunOptions())
    with pytest.raises(NanodsError, match=r"model.n_layer: 2 -> 3.*|train.batch_size"):
        train(project(corpus, tmp_path, "model.n_layer=3"), RunOptions(resume=True))
    with pytest.raises(NanodsError, match=r"train.batch_size: 4 -> 8"):
        train(project(corpus, tmp_path, "train.batch_size=8"), RunOptions(resume=True))


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
def test_kill_9_at_any_moment_leaves_a_loadable_matching_pair(corpus, tmp_path):
    """Kill a training process (saving every step) at several moments; each time the pair loads and resumes."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "nanods", "train", "--scale", "tiny", "--out", str(out), "--steps", "400",
            "--set", f"train.data={json.dumps(corpus)}", "--set", "train.tokenizer=byte", "--set", "train.eval_every=1",
            "--set", "train.eval_batches=1", "--set", "train.seq_len=32", "--set", "train.batch_size=2",
            "--set", "train.sample_tokens=0", "--device", "cpu"]
    env = {**os.environ, "NANODS_CACHE": os.environ["NANODS_CACHE"]}
    def saved_step() -> int:
        try:
            return int(read_header(out / "ckpt.safetensors")[1]["nanods.step"])
        except NanodsError:  # not written yet
            return 0

    steps_seen = [0]
    for attempt, delay in enumerate([0.7, 1.3, 0.35]):
        cmd = args + (["--resume"] if attempt else [])
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while saved_step() <= steps_seen[-1] and time.time() < deadline:  # this attempt is saving steps now
            time.sleep(0.02)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        model, _ = nanods.load(out / "ckpt.safetensors")
        step = int(read_header(out / "ckpt.safetensors")[1]["nanods.step"])
        state, meta = checkpoint.latest_state(out, step)
        assert meta["step"] == step and state
        steps_seen.append(step)
    assert all(a < b for a, b in zip(steps_seen, steps_seen[1:])), steps_seen  # every resume made progress


def test_resume_is_exact_with_muon_too(corpus, tmp_path, monkeypatch):
    assert train(project(corpus, tmp_path / "a", "train.optimizer=muon"), RunOptions()) == 0
    original_step = loop.TrainReport.step

    def interrupt_after_5(self, row, total):
        original_step(self, row, total)
        if row["step"] == 5:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(loop.TrainReport, "step", interrupt_after_5)
    train(project(corpus, tmp_path / "b", "train.optimizer=muon"), RunOptions())
    monkeypatch.setattr(loop.TrainReport, "step", original_step)
    train(project(corpus, tmp_path / "b", "train.optimizer=muon"), RunOptions(resume=True))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
