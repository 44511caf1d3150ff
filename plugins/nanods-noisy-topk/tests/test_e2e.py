"""The plugin through the nanods command line: listed, trained, sampled, inspected."""

import json
import os
import subprocess
import sys
from pathlib import Path

NANODS_SOURCE = Path(__file__).resolve().parents[3] / "nanods"


def nanods(*args, env, cwd):
    proc = subprocess.run([sys.executable, "-m", "nanods", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_train_sample_inspect_with_the_plugin(tmp_path):
    env = {**os.environ, "NANODS_CACHE": os.environ.get("NANODS_CACHE") or str(tmp_path / "cache")}
    listed = json.loads(nanods("components", "--json", env=env, cwd=tmp_path).stdout)["components"]
    assert {"group": "router", "name": "noisy-topk", "package": "nanods-noisy-topk"}.items() <= next(
        r for r in listed if r["name"] == "noisy-topk").items()
    nanods("train", "--scale", "tiny", "--router", "noisy-topk", "--steps", "20", "--out", "runs/noisy",
           "--data", str(NANODS_SOURCE), "--set", "train.tokenizer=byte", "--set", "train.sample_tokens=20",
           "--set", "model.router_options.noise_std=0.5", env=env, cwd=tmp_path)
    ckpt = str(tmp_path / "runs" / "noisy" / "ckpt.safetensors")
    nanods("sample", ckpt, "--max-new-tokens", "20", "--seed", "0", env=env, cwd=tmp_path)
    info = json.loads(nanods("inspect", ckpt, "--json", env=env, cwd=tmp_path).stdout)
    assert info["config"]["router"] == "noisy-topk" and info["config"]["router_options"] == {"noise_std": 0.5}
