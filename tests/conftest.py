import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from nanods import NanoDeepSeek, NanoDeepSeekConfig
from nanods.project import command_line_values, resolve_project
from nanods.testing import TINY

SOURCE = Path(__file__).resolve().parent.parent / "nanods"
COMBOS = [(a, f) for a in ("mha", "mla") for f in ("dense", "moe")]


def tiny_config(**overrides) -> NanoDeepSeekConfig:
    return NanoDeepSeekConfig(**{**TINY, **overrides})


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def build(seed: int = 0, **overrides) -> NanoDeepSeek:
    torch.manual_seed(seed)
    return NanoDeepSeek(tiny_config(**overrides))


def main_in_process(args, capsys):
    """nanods.cli.main(args) in this process -> (exit code, stdout, stderr)."""
    from nanods.cli import main

    with pytest.raises(SystemExit) as info:
        main(args)
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """A small folder corpus (a copy of nanods' own sources, so editing them mid-run changes no fingerprint)
    and a private token cache."""
    monkeypatch.setenv("NANODS_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "corpus"
    shutil.copytree(SOURCE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return str(copy)


def project(corpus, out, *sets):
    base = [f"train.data={json.dumps(corpus)}", "train.tokenizer=byte", f"train.out={json.dumps(str(out))}",
            "train.steps=8", "train.batch_size=4", "train.micro_batch_size=2", "train.seq_len=32",
            "train.eval_every=4", "train.eval_batches=2", "train.warmup_steps=2", "train.sample_tokens=0",
            "train.device=cpu", "model.n_layer=2", "model.sequence_len=64"]
    return resolve_project({}, scale="tiny", sets=base + list(sets))


def losses(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def resuming(*sets):
    """RunOptions of `nanods train --resume --set ...`: the sets are what the command line gives explicitly."""
    from nanods.train.loop import RunOptions

    explicit = command_line_values(None, list(sets))
    return RunOptions(resume=True, explicit=explicit)


def signal_after_step(monkeypatch, step, *signals):
    """Send `signals` to this process as optimizer step `step` is reported (a Ctrl-C or a kill arriving
    during training); returns what undoes it."""
    from nanods.train import loop

    original = loop.TrainReport.step

    def report_then_signal(self, row, total):
        original(self, row, total)
        if row["step"] == step:
            for sig in signals:
                os.kill(os.getpid(), sig)

    monkeypatch.setattr(loop.TrainReport, "step", report_then_signal)
    return lambda: monkeypatch.setattr(loop.TrainReport, "step", original)
