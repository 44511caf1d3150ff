"""The README's training commands, run in order by a new user in a folder with its own nanods.toml."""

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import SOURCE

from nanods.safetensors_header import read_header

pytestmark = pytest.mark.slow

TOML = '[model]\nscale = "small"\n\n[train]\ndata = "corpus"\n'  # small's 8-minute budget, a small corpus


def nanods(cwd, *args, **popen):
    env = {**os.environ, "NANODS_CACHE": str(cwd / "cache"), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    command = [sys.executable, "-m", "nanods", *args]
    if popen:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def step_of(path):
    return int(read_header(path)[1]["nanods.step"])


def test_the_readme_commands_work_as_written_beside_a_project_file(tmp_path):
    shutil.copytree(SOURCE, tmp_path / "corpus", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(SOURCE / "layers", tmp_path / "my_code", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "nanods.toml").write_text(TOML)

    first = nanods(tmp_path, "train", "--scale", "tiny", "--steps", "40", "--out", "runs/tiny")
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = nanods(tmp_path, "train", "--resume", "--out", "runs/tiny", "--steps", "80")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert step_of(tmp_path / "runs/tiny/ckpt.safetensors") == 80
    tuned = nanods(tmp_path, "train", "--init-from", "runs/tiny/ckpt.safetensors", "--out", "runs/ft",
                   "--data", "my_code/", "--steps", "20")
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    assert "training: 20 steps, batch 8 x 256 tokens" in tuned.stderr  # small's settings, its budget replaced
    assert step_of(tmp_path / "runs/ft/ckpt.safetensors") == 20

    stopped = nanods(tmp_path, "train", "--scale", "tiny", "--steps", "200", "--out", "runs/ctrl", popen=True)
    deadline = time.time() + 300
    while not (tmp_path / "runs/ctrl/metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    stopped.send_signal(signal.SIGINT)
    _, err = stopped.communicate(timeout=300)
    assert stopped.returncode == 130, err[-2000:]
    hint = re.search(r"resume with: (nanods train .*)", err)
    assert hint, err[-2000:]
    again = nanods(tmp_path, *shlex.split(hint[1])[1:])
    assert again.returncode == 0, again.stderr[-2000:]
    assert step_of(tmp_path / "runs/ctrl/ckpt.safetensors") == 200
