"""nanods bench: the measurements exist and are internally consistent (no timing thresholds)."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import build, main_in_process, tiny_config

from nanods.bench import decode_bytes_per_token, run
from nanods.errors import NanodsError


def tiny_run(**options) -> dict:
    """Every measurement on a tiny model with small shapes, once."""
    return run(tiny_config(sequence_len=64), torch.device("cpu"), torch.float32, repeats=1, train_batch=2,
               train_seq=32, prefill_seq=32, new_tokens=4, short_prompt=8, long_context=64, **options)


def test_bench_reports_every_measurement():
    result = tiny_run()
    assert result["peak_flops"]["float32"] > 0 and result["read_bandwidth_bytes_per_s"] > 0
    assert result["matvec_bandwidth_bytes_per_s"] > 0
    assert 0 < result["train"]["mfu"] and result["train"]["tokens_per_s"]["median"] > 0
    rows = [(d["batch"], d["context"], d["path"]) for d in result["decode"]]
    assert rows == [(batch, context, path) for batch, context in ((1, 12), (8, 12), (1, 64))
                    for path in ("absorbed", "naive")]
    assert result["decode_runs"] == 1 and result["moe_vs_dense"]["rounds"] == 3
    assert result["moe_vs_dense"]["kernel"] == "loop"  # what `auto` picks on CPU, not "auto"
    assert result["model"] == {"attention": "mla", "ffn": "moe", "router": "sigmoid"}
    for d in result["decode"]:
        t = d["tokens_per_s"]
        assert t["low"] <= t["median"] <= t["high"] and d["roofline_fraction"] == t["median"] / d["roofline_tokens_per_s"]
    assert result["moe_vs_dense"]["ratio"] > 0


def test_short_contexts_get_no_duplicate_or_empty_decode_rows(monkeypatch):
    monkeypatch.setattr("nanods.bench.matmul_peak", lambda *a, **k: 1e9)  # the shapes matter here, not the speed
    result = run(tiny_config(sequence_len=16, ffn="dense"), torch.device("cpu"), torch.float32, repeats=1,
                 train_batch=1, train_seq=8, prefill_seq=8)
    rows = [(d["batch"], d["context"], d["path"]) for d in result["decode"]]
    assert rows == [(1, 16, "absorbed"), (1, 16, "naive"), (8, 16, "absorbed"), (8, 16, "naive")]  # no long row
    with pytest.raises(NanodsError, match="sequence_len must be at least 2"):
        run(tiny_config(sequence_len=1), torch.device("cpu"), torch.float32, repeats=1)


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
def test_bench_cli_json(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nanods", "bench", "--scale", "tiny", "--repeats", "1", "--json"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)  # no nanods.toml there
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["scale"] == "tiny"


def bench_cli(args, monkeypatch, capsys, run=None) -> tuple[int, str, str]:
    """`nanods bench` in this process with nanods.bench.run replaced -> (exit code, stdout, stderr)."""
    monkeypatch.setattr("nanods.bench.run", run)
    return main_in_process(["bench", *args], capsys)


def test_bench_measures_the_project_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "nanods.toml").write_text('[model]\nscale = "tiny"\nattention = "mha"\nffn = "dense"\n')
    monkeypatch.chdir(tmp_path)
    seen = []
    code, out, err = bench_cli(["--json", "--dtype", "float32"], monkeypatch, capsys,
                               run=lambda config, *args, **kwargs: seen.append(config) or {})
    assert code == 0, err
    assert (seen[0].attention, seen[0].ffn, seen[0].n_layer) == ("mha", "dense", 2)
    assert json.loads(out) == {"scale": "nanods.toml"}
    code, out, err = bench_cli(["--json", "--scale", "small", "--set", "model.attention=mla"], monkeypatch, capsys,
                               run=lambda config, *args, **kwargs: seen.append(config) or {})
    assert (seen[1].attention, seen[1].ffn, seen[1].n_layer) == ("mla", "dense", 6)  # --scale overrides the file's
    assert json.loads(out) == {"scale": "small + nanods.toml"}  # the file's other [model] keys still apply


def test_bench_ctrl_c_says_interrupted(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    code, out, err = bench_cli(["--scale", "tiny", "--json"], monkeypatch, capsys, run=interrupted)
    assert code == 130 and out == "" and err.strip() == "interrupted"


@pytest.mark.slow  # compiles both layers
def test_long_context_rows_time_mla_and_dsa_per_layer():
    from nanods.bench import bench_long_context

    rows = bench_long_context(tiny_config(), torch.device("cpu"), torch.float32, repeats=1, contexts=(16, 48), topk=8,
                              compile=True)
    assert [(r["context"], r["index_topk"]) for r in rows] == [(16, 8), (48, 8)]
    for r in rows:
        assert all(r[f"{a}_{s}_s"] > 0 for a in ("mla", "dsa") for s in ("prefill", "decode", "decode_compiled"))


def test_crossover_is_where_dsa_stays_faster():
    from nanods.bench import crossover

    def row(context, mla, dsa):
        return {"context": context, "mla_decode_s": mla, "dsa_decode_s": dsa}

    rows = [row(1024, 1, 2), row(2048, 2, 1), row(4096, 3, 4), row(8192, 4, 3), row(16384, 5, 2)]
    assert crossover(rows, "decode") == 8192  # faster at 2048 too, but not from there on
    assert crossover(rows[:3], "decode") is None
    assert crossover(rows[1:2], "decode") == 2048


def test_long_context_cells_name_each_stage_and_its_crossover():
    from nanods.bench import long_context_cells

    rows = [{"context": c, "index_topk": 512, "mla_decode_s": m, "dsa_decode_s": d, "mla_decode_compiled_s": m,
             "dsa_decode_compiled_s": d / 2} for c, m, d in ((1024, 1e-3, 2e-3), (16384, 4e-3, 1e-3))]
    cells = long_context_cells(rows)
    assert cells[0] == ("attention layer, context 1,024: decode mla / dsa", "1.00 / 2.00 ms",
                        "dsa 2.0x slower (index_topk 512)")
    assert cells[3][2].startswith("dsa 8.00x faster")
    assert cells[-2:] == [("attention layer: decode crossover", "16,384", "the context from which dsa is faster "
                           "(of those measured)"), ("attention layer: decode compiled crossover", "16,384",
                                                    "the context from which dsa is faster (of those measured)")]
