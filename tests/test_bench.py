"""nanods bench: the measurements exist and are internally consistent (no timing thresholds)."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import build, tiny_config

from nanods.bench import decode_bytes_per_token, run


def tiny_run(**options) -> dict:
    """Every measurement on a tiny model with small shapes, once."""
    return run(tiny_config(sequence_len=64), torch.device("cpu"), torch.float32, repeats=1,
               train_batch=2, train_seq=32, prefill_seq=32, new_tokens=4, long_context=64, **options)


def test_bench_reports_every_measurement():
    result = tiny_run()
    assert result["peak_flops"]["float32"] > 0 and result["read_bandwidth_bytes_per_s"] > 0
    assert result["matvec_bandwidth_bytes_per_s"] > 0
    assert 0 < result["train"]["mfu"] and result["train"]["tokens_per_s"]["median"] > 0
    paths = {(d["batch"], d["path"]) for d in result["decode"]}
    assert paths == {(1, "absorbed"), (1, "naive"), (8, "absorbed"), (8, "naive")}
    for d in result["decode"]:
        t = d["tokens_per_s"]
        assert t["low"] <= t["median"] <= t["high"] and d["roofline_fraction"] == t["median"] / d["roofline_tokens_per_s"]
    assert result["moe_vs_dense"]["ratio"] > 0


def test_decode_bytes_count_weights_experts_and_cache():
    model = build(num_experts=4, top_k=2)
    one = decode_bytes_per_token(model, batch=1, context=10, dtype=torch.float32)
    longer = decode_bytes_per_token(model, batch=1, context=20, dtype=torch.float32)
    assert longer - one == model.kv_cache_bytes_per_token(torch.float32) * 10
    assert decode_bytes_per_token(model, batch=8, context=10, dtype=torch.float32) < one  # weights shared by 8 rows


@pytest.mark.slow
def test_bench_compiled_decode_rows():
    result = tiny_run(compile=True)
    compiled = [d for d in result["decode"] if d["path"] == "compiled"]
    assert [d["batch"] for d in compiled] == [1, 1] and all(d["tokens_per_s"]["median"] > 0 for d in compiled)


@pytest.mark.slow
def test_bench_cli_json():
    proc = subprocess.run([sys.executable, "-m", "nanods", "bench", "--scale", "tiny", "--repeats", "1", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["scale"] == "tiny"
