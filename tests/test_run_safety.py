"""A run folder under hostile conditions: foreign or crafted training state and weights, an --overwrite cut
short, a torn metrics log, two trainers at once, an FSDP state resumed without FSDP, signals, stale temp files."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import losses, project, resuming, signal_after_step
from safetensors.torch import load_file, save_file

import nanods
from nanods import atomic, checkpoint
from nanods.errors import NanodsError
from nanods.safetensors_header import read_header
from nanods.train.loop import RunOptions, train
from nanods.train.run_dir import RunDir


def state_file(out):
    (path,) = out.glob("train_state_*.safetensors")
    return path


def rewrite(path, edit_tensors=None, edit_meta=None):
    """Rewrite a safetensors file in place with edited tensors and/or metadata (as an attacker could)."""
    tensors = load_file(path)
    _, meta = read_header(path)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, path, metadata=meta)


@pytest.fixture
def run(corpus, tmp_path):
    """A finished 8-step run in tmp_path/run, to resume or attack."""
    out = tmp_path / "run"
    assert train(project(corpus, out), RunOptions()) == 0
    return out


def resume(corpus, out, *sets, steps=None):
    given = [*sets, *([f"train.steps={steps}"] if steps else [])]
    return train(project(corpus, out, *given), resuming(*given))


# ---- training state and weights are checked before use ------------------------------------------
def test_a_state_of_another_run_is_refused(corpus, tmp_path, run):
    other = tmp_path / "other"
    train(project(corpus, other, "model.n_embd=32"), RunOptions())
    os.replace(state_file(other), state_file(run))  # same step, another run (a smaller model)
    with pytest.raises(NanodsError, match=r"train_state_0000008.safetensors' belongs to another run"):
        resume(corpus, run, steps=12)


@pytest.mark.parametrize("attack,message", [
    (lambda t: t.update({"optimizer0.0.exp_avg": torch.zeros(1)}), r"tensor 'optimizer0.0.exp_avg' .* is \[1\] float32"),
    (lambda t: t.update({k: torch.zeros(1) for k in t if k.endswith("exp_avg_sq")}), r"is \[1\] float32, expected"),
    (lambda t: t.update({"optimizer0.0.exp_avg": t["optimizer0.0.exp_avg"].double()}), r"float64, expected .* float32"),
    (lambda t: t["optimizer0.1.exp_avg_sq"].view(-1).__setitem__(0, float("nan")), r"holds NaN or infinite values"),
    (lambda t: t.update({"optimizer0.99999.exp_avg": torch.zeros(3)}), r"'optimizer0.99999.exp_avg', which no parameter"),
    (lambda t: t.update({"optimizer7.0.exp_avg": torch.zeros(3)}), r"'optimizer7.0.exp_avg', which no parameter"),
    (lambda t: t.update({"weird": torch.zeros(3)}), r"holds tensor 'weird'"),
    (lambda t: t.update({"optimizer0.0.step": torch.tensor(float("inf"))}), r"not a step count"),
    (lambda t: t.update({"optimizer0.0.exp_avg": torch.tensor(0.5)}), r"'optimizer0.0.exp_avg' \(the state of '.*'\) is \[\] float32"),
    (lambda t: t["optimizer0.2.exp_avg_sq"].view(-1).__setitem__(0, -1.0), r"holds negative second moments"),
    (lambda t: t.pop("optimizer0.0.exp_avg_sq"), r"the state of '.*' lacks exp_avg_sq"),
    (lambda t: t.update({"optimizer0.0.momentum_buffer": torch.zeros(3)}), r"'optimizer0.0.momentum_buffer', which no"),
])
def test_a_crafted_state_is_refused_naming_the_tensor(corpus, run, attack, message):
    path = state_file(run)
    rewrite(path, edit_tensors=attack)
    with pytest.raises(NanodsError, match=rf"'{re.escape(str(path))}'.*{message}"):
        resume(corpus, run, steps=12)


def test_a_larger_foreign_state_with_a_forged_run_id_is_refused(corpus, tmp_path, run):
    big = tmp_path / "big"
    train(project(corpus, big, "model.n_embd=128"), RunOptions())
    run_id = read_header(run / "ckpt.safetensors")[1]["nanods.run"]
    os.replace(state_file(big), state_file(run))
    rewrite(state_file(run), edit_meta=lambda m: m.update({"nanods.run": run_id}))
    with pytest.raises(NanodsError, match=r"does not fit this model: tensor 'optimizer0\.\d+\.exp_avg' \(the state of"):
        resume(corpus, run, steps=12)


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.pop("nanods.train"), r"lacks its nanods.train metadata"),
    (lambda m: m.update({"nanods.step": "4"}), r"holds step 4, but the weights beside it are step 8"),
    (lambda m: m.update({"nanods.train": "{"}), r"nanods.train metadata is not valid JSON"),
    (lambda m: m.update({"nanods.train": json.dumps({**json.loads(m["nanods.train"]), "optimizers": [
        {"param_groups": [], "scalars": {}}]})}), r"parameter groups do not match"),
    (lambda m: m.update({"nanods.train": json.dumps({**json.loads(m["nanods.train"]), "step": "x"})}),
     r"lacks the run's progress"),
])
def test_damaged_state_metadata_is_one_line_naming_the_file(corpus, run, edit, message):
    path = state_file(run)
    rewrite(path, edit_meta=edit)
    with pytest.raises(NanodsError, match=rf"'{re.escape(str(path))}'.*{message}"):
        resume(corpus, run, steps=12)


def edit_optimizer_meta(edit):
    def apply(meta):
        train_meta = json.loads(meta["nanods.train"])
        edit(train_meta["optimizers"][0])
        meta["nanods.train"] = json.dumps(train_meta)

    return apply


@pytest.mark.parametrize("edit,message", [
    (lambda o: o["param_groups"][0]["params"].reverse(), r"parameter groups differ"),  # pairs moments with other params
    (lambda o: o["param_groups"][0].update(params="all"), r"parameter groups differ"),
    (lambda o: o.update(scalars={"0.exp_avg": 1.0}), r"parameter groups do not match"),
    (lambda o: o["param_groups"][0].update(betas=["x", 0.95]), r"optimizer setting 'betas' is \['x', 0.95\]"),
    (lambda o: o["param_groups"][1].update(eps=float("nan")), r"optimizer setting 'eps' is nan"),
])
def test_crafted_optimizer_groups_are_refused(corpus, run, edit, message):
    rewrite(state_file(run), edit_meta=edit_optimizer_meta(edit))
    with pytest.raises(NanodsError, match=message):
        resume(corpus, run, steps=12)


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    from conftest import tiny_config

    from nanods.model import NanoDeepSeek
    from nanods.tokenizer import byte_tokenizer

    config = tiny_config(vocab_size=128)
    checkpoint.save(tmp_path, NanoDeepSeek(config), config, byte_tokenizer(), 1, {}, {}, {})
    with pytest.raises(NanodsError, match=r"its tokenizer has 257 ids but the model was built for 128"):
        nanods.load(tmp_path / "ckpt.safetensors")


def test_resume_and_overwrite_together_are_refused(corpus, run):
    before = snapshot(run)
    options = resuming()
    options.overwrite = True
    with pytest.raises(NanodsError, match="--resume and --overwrite exclude each other"):
        train(project(corpus, run), options)
    assert snapshot(run) == before


@pytest.mark.parametrize("attack,message", [
    (lambda t: t["embed.weight"].view(-1).__setitem__(0, float("nan")), r"'embed.weight' holds NaN"),
    (lambda t: t.update({"norm_x": torch.zeros(2)}), r"unexpected \['norm_x'\]"),
    (lambda t: t.update({"embed.weight": t["embed.weight"].half()}), r"'embed.weight' is \[\d+, 64\] float16, expected"),
    (lambda t: t.update({k: torch.full_like(v, float("nan")) for k, v in t.items() if k.endswith("expert_bias")}),
     r"expert_bias' holds NaN"),
])
def test_crafted_weights_are_refused_naming_the_tensor(run, attack, message):
    rewrite(run / "ckpt.safetensors", edit_tensors=attack)
    with pytest.raises(NanodsError, match=message):
        nanods.load(run / "ckpt.safetensors")


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.update({"nanods.config": "{"}), r"nanods.config metadata is not valid JSON"),
    (lambda m: m.update({"nanods.step": "four"}), r"nanods.step metadata is not valid JSON"),
    (lambda m: m.update({"nanods.step": "-4"}), r"nanods.step metadata is '-4', not a step count"),
    (lambda m: m.update({"nanods.components": "["}), r"nanods.components metadata is not valid JSON"),
    (lambda m: m.update({"nanods.components": "[1]"}), r"nanods.components metadata is not a JSON object"),
    (lambda m: m.pop("nanods.tokenizer"), r"lacks its nanods.tokenizer metadata"),
])
def test_damaged_weights_metadata_is_one_line_naming_the_file(corpus, run, edit, message):
    rewrite(run / "ckpt.safetensors", edit_meta=edit)
    with pytest.raises(NanodsError, match=rf"'{re.escape(str(run / 'ckpt.safetensors'))}'.*{message}"):
        resume(corpus, run, steps=12)


def test_a_component_missing_from_an_installed_package_is_named_as_such(run):
    def unknown_attention(meta):
        config = json.loads(meta["nanods.config"])
        config["attention"] = "lightning"
        meta["nanods.config"] = json.dumps(config)
        components = json.loads(meta["nanods.components"])
        components["attention"] = {"name": "lightning", "dist": "nanods", "version": "9.9"}
        meta["nanods.components"] = json.dumps(components)

    rewrite(run / "ckpt.safetensors", edit_meta=unknown_attention)
    with pytest.raises(NanodsError, match=rf"needs attention 'lightning' from package 'nanods'; nanods "
                                          rf"{nanods.__version__} is installed but offers no such component "
                                          r"\(the file was written with version 9.9\): pip install 'nanods==9.9'"):
        nanods.load(run / "ckpt.safetensors")


# ---- one run per folder: --overwrite, failed saves, recovery -------------------------------------
def fail_writes_of(monkeypatch, name):
    """Make atomic writes of files called `name` fail as a full disk does."""
    original = atomic.atomic_write

    def full_disk(path, content):
        if os.path.basename(path) == name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(path, content)

    monkeypatch.setattr(checkpoint, "atomic_write", full_disk)
    return original


def snapshot(out):
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.startswith(".")}


def test_overwrite_whose_first_save_fails_keeps_the_old_run(corpus, run, monkeypatch):
    before = snapshot(run)
    original = fail_writes_of(monkeypatch, "ckpt.safetensors")  # the new state is written, then the weights fail
    with pytest.raises(NanodsError, match=r"could not save step 4 in .*No space left on device.*no checkpoint was written"):
        train(project(corpus, run, "train.steps=4", "train.lr=0.001"), RunOptions(overwrite=True))
    assert snapshot(run) == before  # the old pair, its metrics and plot, nothing of the new run
    assert not (run / ".replaced").exists()
    monkeypatch.setattr(checkpoint, "atomic_write", original)
    assert resume(corpus, run, steps=10) == 0


def test_a_failed_save_leaves_the_previous_pair(corpus, run, monkeypatch):
    fail_writes_of(monkeypatch, "ckpt.safetensors")
    with pytest.raises(NanodsError, match=r"could not save step 12 .*the checkpoint of step 8 is kept"):
        resume(corpus, run, steps=12)
    assert [p.name for p in run.glob("train_state_*")] == ["train_state_0000008.safetensors"]
    assert read_header(run / "ckpt.safetensors")[1]["nanods.step"] == "8"


def test_overwrite_replaces_the_run_after_its_first_save(corpus, run):
    old_id = read_header(run / "ckpt.safetensors")[1]["nanods.run"]
    assert train(project(corpus, run, "train.steps=4"), RunOptions(overwrite=True)) == 0
    _, meta = read_header(run / "ckpt.safetensors")
    assert meta["nanods.step"] == "4" and meta["nanods.run"] != old_id
    assert list(losses(run)) == [1, 2, 3, 4]  # the old run's rows went with it
    assert not (run / ".replaced").exists()


def test_an_overwrite_killed_before_its_first_save_is_undone_by_the_next_trainer(corpus, run, capsys):
    before = losses(run)
    folder = RunDir(run)  # what a trainer killed -9 right after setting the old run aside leaves
    folder.set_aside("0123456789abcdef")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    (run / "train_state_0000004.safetensors").write_bytes(b"half a state")
    (run / ".ckpt.safetensors.x1y2.tmp").write_bytes(b"half a checkpoint")
    assert resume(corpus, run, steps=10) == 0
    assert "put back the run" in capsys.readouterr().err
    assert not (run / ".replaced").exists() and not list(run.glob(".*.tmp"))
    assert read_header(run / "ckpt.safetensors")[1]["nanods.step"] == "10"
    after = losses(run)
    assert list(after) == list(range(1, 11)) and {k: after[k] for k in before} == before  # the old run, continued


def test_a_run_finished_before_its_overwrite_was_cleaned_up_keeps_the_new_run(corpus, run):
    aside = run / ".replaced"
    aside.mkdir()
    new_id = read_header(run / "ckpt.safetensors")[1]["nanods.run"]
    (aside / "replaced.json").write_text(json.dumps({"by_run": new_id}))
    (aside / "ckpt.safetensors").write_bytes(b"the old run")
    assert resume(corpus, run, steps=10) == 0
    assert not aside.exists()


# ---- the metrics log -------------------------------------------------------------------------------
def test_a_torn_metrics_line_is_dropped_with_a_warning(corpus, run, capsys):
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "loss": 3.1, "lr": 0.00')  # a write cut short by a full disk
    capsys.readouterr()
    assert resume(corpus, run, steps=10) == 0
    assert f"dropped 1 damaged line(s) of {run / 'metrics.jsonl'}" in capsys.readouterr().err.replace("\n", "")
    assert list(losses(run)) == list(range(1, 11))
    (run / "metrics.jsonl").write_bytes((run / "metrics.jsonl").read_bytes() + b'{"step": \xff\n')
    assert train(project(corpus, run, "train.steps=2"), RunOptions(overwrite=True)) == 0
    assert list(losses(run)) == [1, 2]


# ---- one trainer per folder --------------------------------------------------------------------------
def test_a_second_trainer_on_a_locked_folder_is_refused_at_once(corpus, run):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from nanods.train.run_dir import RunDir\n"
                               f"RunDir(Path({str(run)!r})).acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(NanodsError, match=rf"'{re.escape(str(run))}' is in use by another trainer \(pid {holder.pid} on "):
            resume(corpus, run, steps=12)
    finally:
        holder.kill()
        holder.wait()
    assert resume(corpus, run, steps=12) == 0  # the kernel dropped the dead holder's lock


def test_a_refused_start_leaves_no_folder_behind(corpus, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(NanodsError, match="nothing to resume"):
        train(project(corpus, out), RunOptions(resume=True))
    assert not out.exists()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(NanodsError, match="'.*notes.txt' is a file, not a folder"):
        train(project(corpus, tmp_path / "notes.txt"), RunOptions())
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ---- FSDP state, signals --------------------------------------------------------------------------------
def test_an_fsdp_state_resumed_without_fsdp_is_refused_with_the_command_that_works(corpus, run):
    def as_fsdp(meta):
        train_meta = json.loads(meta["nanods.train"])
        train_meta["settings"]["parallel"], train_meta["optimizers"] = "fsdp", []
        meta["nanods.train"] = json.dumps(train_meta)

    rewrite(state_file(run), edit_tensors=lambda t: t.clear(), edit_meta=as_fsdp)
    with pytest.raises(NanodsError, match=rf"saved by an FSDP run.*nanods train --init-from "
                                          rf"{re.escape(str(run))}/ckpt.safetensors --out NEW_DIR"):
        resume(corpus, run, steps=12)
    with pytest.raises(NanodsError, match=rf"saved by an FSDP run.*--init-from {re.escape(str(run))}"):
        resume(corpus, run, "train.parallel=fsdp", steps=12)  # in one process, "fsdp" changes nothing


def test_sigterm_stops_saves_and_exits_143(corpus, tmp_path, monkeypatch):
    signal_after_step(monkeypatch, 2, signal.SIGTERM)
    assert train(project(corpus, tmp_path), RunOptions()) == 128 + signal.SIGTERM
    assert read_header(tmp_path / "ckpt.safetensors")[1]["nanods.step"] == "2"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_real_full_disk_during_a_save_keeps_the_previous_pair(corpus, tmp_path, run):
    """A tmpfs with room for one checkpoint pair and a bit: the save at step 8 runs out of space."""
    one_pair = sum(p.stat().st_size for p in run.iterdir() if p.is_file())
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={one_pair // 1024 + 128}k", "tmpfs", str(disk)]).returncode:
        pytest.skip("this machine refuses to mount a tmpfs")
    try:
        with pytest.raises(NanodsError, match=r"could not save step 8 .*No space left on device.*step 4 is kept"):
            train(project(corpus, disk / "run"), RunOptions())
        shutil.copytree(disk / "run", tmp_path / "copy")
        assert not list((disk / "run").glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    assert read_header(tmp_path / "copy" / "ckpt.safetensors")[1]["nanods.step"] == "4"
    assert resume(corpus, tmp_path / "copy") == 0
    assert read_header(tmp_path / "copy" / "ckpt.safetensors")[1]["nanods.step"] == "8"


def test_init_from_refuses_model_options_it_would_ignore(corpus, tmp_path, run):
    options = RunOptions(init_from=str(run / "ckpt.safetensors"), explicit={"model": {"n_embd": 32}})
    with pytest.raises(NanodsError, match=r"--init-from takes the model from .* model.n_embd: 64 -> 32"):
        train(project(corpus, tmp_path / "ft", "model.n_embd=32"), options)


def test_a_folder_with_files_of_a_run_that_never_saved_needs_overwrite(corpus, tmp_path):
    out = tmp_path / "half"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    with pytest.raises(NanodsError, match=r"holds metrics.jsonl of a run that never saved a checkpoint; start over "
                                          r"with --overwrite"):
        train(project(corpus, out), RunOptions())
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 5.0}\n'
    assert train(project(corpus, out), RunOptions(overwrite=True)) == 0


def test_a_second_signal_aborts_at_once_and_the_last_pair_stays(corpus, tmp_path, monkeypatch):
    signal_after_step(monkeypatch, 6, signal.SIGTERM, signal.SIGTERM)  # a scheduler that does not wait
    with pytest.raises(KeyboardInterrupt):
        train(project(corpus, tmp_path), RunOptions())
    assert read_header(tmp_path / "ckpt.safetensors")[1]["nanods.step"] == "4"  # the eval at step 4 saved it


def test_resume_after_an_unfinished_overwrite_takes_the_run_set_aside(corpus, run):
    """The saved run, not the project file, decides the model, even while an --overwrite left it aside."""
    RunDir(run).set_aside("0123456789abcdef")  # killed before the new run saved
    assert train(project(corpus, run, "model.n_layer=3", "train.steps=12"), resuming("train.steps=12")) == 0
    assert json.loads(read_header(run / "ckpt.safetensors")[1]["nanods.config"])["n_layer"] == 2


def test_resume_refuses_a_new_time_budget_and_sums_up_only_its_own_session(corpus, run, capsys):
    with pytest.raises(NanodsError, match=r"train.time_budget: None -> '5m'"):
        resume(corpus, run, "train.time_budget=\"5m\"")
    capsys.readouterr()
    assert resume(corpus, run, steps=10) == 0
    assert "done: 10 steps, 256 tokens in" in " ".join(capsys.readouterr().err.split())  # 2 steps x 4 x 32
    assert resume(corpus, run) == 0
    assert "already at step 10 of 10: nothing to train" in " ".join(capsys.readouterr().err.split())
