"""nanods.fast_paths: each path equals the plain computation; the split follows this machine's record;
switching the paths on and off leaves the model plain."""

import json
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import build
from test_attention import SHAPES, reference

from nanods import checkpoint, fast_paths
from nanods.fast_paths import FEW_ROWS, SplitRecord, attend, explicit_causal_attention, project, recorded_choice
from nanods.layers.ffn.experts import RoutedExperts
from nanods.tokenizer import byte_tokenizer


class Always:
    """A record that takes (or never takes) the split for every shape."""

    def __init__(self, split: bool) -> None:
        self.split = split

    def takes_split(self, *key) -> bool:
        return self.split


@pytest.fixture
def split_always(monkeypatch):
    """project() splits wherever the threads allow, whatever this machine's record says."""
    monkeypatch.setattr(fast_paths, "RECORD", Always(True))


@pytest.fixture(params=[1, 2, 3])
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache, and no decisions from earlier tests of this process."""
    monkeypatch.setenv("NANODS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fast_paths, "RECORD", SplitRecord())
    return tmp_path / "cache"


@pytest.mark.parametrize("shape", [(1, 1, 24), (3, 1, 24), (2, 4, 24), (24,), (FEW_ROWS + 1, 24)])
def test_split_equals_f_linear(float64, threads, split_always, shape):
    weight = torch.randn(36, 24, requires_grad=True)  # 36 rows: split by 2 and 3 threads
    x = torch.randn(*shape, requires_grad=True)
    out = project(x, weight)
    expected = F.linear(x, weight)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (x, weight), grad), torch.autograd.grad(expected, (x, weight), grad)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_odd_shapes_and_strided_input(threads, split_always):
    weight = torch.randn(35, 24)  # 35 rows: no even split by 2 threads
    x = torch.randn(24, 3)[:, 1].view(1, 1, 24)  # a strided view
    torch.testing.assert_close(project(x, weight), F.linear(x, weight))
    even = torch.randn(36, 24)
    out = project(torch.randn(2, 3, 24), even)
    assert out.is_contiguous() and out.shape == (2, 3, 36)  # row-major, like F.linear's output
    assert project(torch.randn(0, 24), even).shape == (0, 36)


def test_split_taken_only_where_the_record_says(monkeypatch):
    weight, x = torch.randn(36, 24), torch.randn(1, 24)
    calls = []
    monkeypatch.setattr(torch, "bmm", lambda *a: calls.append(a) or torch.ops.aten.bmm(*a))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    for split in (False, True):
        monkeypatch.setattr(fast_paths, "RECORD", Always(split))
        torch.testing.assert_close(project(x, weight), F.linear(x, weight))
        assert len(calls) == split


def test_the_split_is_timed_once_per_shape_and_recorded(cache, monkeypatch):
    timed = []
    monkeypatch.setattr(fast_paths, "time_split", lambda o, i, dtype, blocks: timed.append((o, i, dtype)) or o == 36)
    record = SplitRecord()
    assert record.takes_split(36, 24, torch.float32) and not record.takes_split(48, 24, torch.float32)
    assert record.takes_split(36, 24, torch.float32) and len(timed) == 2  # decided once a process
    saved = json.loads((cache / fast_paths.RECORD_FILE).read_text())
    assert sorted(saved.values()) == [False, True] and all(f"{torch.get_num_threads()} threads" in k for k in saved)
    monkeypatch.setattr(fast_paths, "time_split", lambda *a: pytest.fail("a recorded shape was timed again"))
    fresh = SplitRecord()  # as in a new process: the record decides
    assert fresh.takes_split(36, 24, torch.float32) and not fresh.takes_split(48, 24, torch.float32)


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"key": "yes"}', ""])
def test_a_damaged_record_counts_as_empty_and_is_rewritten(cache, monkeypatch, content):
    cache.mkdir()
    (cache / fast_paths.RECORD_FILE).write_text(content)
    monkeypatch.setattr(fast_paths, "time_split", lambda *a: True)
    assert recorded_choice(36, 24, torch.float32)
    assert list(json.loads((cache / fast_paths.RECORD_FILE).read_text()).values()) == [True]


@pytest.mark.parametrize("unusable", ["read-only", "not a folder"])
def test_no_split_where_the_record_cannot_be_kept(tmp_path, monkeypatch, unusable):
    """Every run would time afresh and could choose otherwise: the plain path is the deterministic one."""
    where = tmp_path / "cache"
    if unusable == "read-only":
        where.mkdir()
        monkeypatch.setattr(fast_paths, "atomic_write", lambda *a: (_ for _ in ()).throw(PermissionError("read-only")))
    else:
        where.write_text("a file")
    monkeypatch.setenv("NANODS_CACHE", str(where))
    monkeypatch.setattr(fast_paths, "time_split", lambda *a: True)
    assert not recorded_choice(36, 24, torch.float32)


def test_split_timing_streams_weights_from_memory(monkeypatch):
    """The paths take turns and each call reads a weight not read before: a weight hot in cache hid a 2.7x win,
    and a path timed on the weights the other just read would run from cache."""
    seen = {"split": [], "plain": []}
    monkeypatch.setattr(fast_paths, "STREAM_BYTES", 64 * 36 * 24 * 4)  # 64 weights of 36 x 24 floats
    monkeypatch.setattr(fast_paths, "split", lambda x, weight, blocks: seen["split"].append(weight.data_ptr()))
    monkeypatch.setattr(fast_paths.F, "linear", lambda x, weight: seen["plain"].append(weight.data_ptr()))
    fast_paths.time_split(36, 24, torch.float32, 2)
    every = seen["split"] + seen["plain"]
    assert len(seen["split"]) == len(seen["plain"]) == 21  # a warm-up call and 5 runs of 4 per path
    assert len(set(every)) == len(every)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_compiled_one_row_is_a_reduction_equal_to_f_linear(dtype, autocast):
    """Under torch.compile one row becomes a multiply-and-sum Inductor reduction (no BLAS call), in autocast's dtype."""
    from torch._inductor.utils import run_and_get_code

    weight, x = torch.randn(36, 24, dtype=dtype), torch.randn(1, 1, 24, dtype=dtype)
    torch._dynamo.reset()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, code = run_and_get_code(torch.compile(project, fullgraph=True), x, weight)
        expected = F.linear(x, weight)
    assert out.dtype == expected.dtype
    assert not re.search(r"extern_kernels\.\w+\(", "".join(code))  # no mm/bmm/addmm call: the reduction itself
    # rounding to bf16 (eps 2^-8 per value) can cancel: bound the error by the size of the terms summed
    scale = x.abs().float() @ weight.abs().float().t()
    eps = 1e-6 if expected.dtype == torch.float32 else 2e-2
    assert ((out.float() - expected.float()).abs() <= eps * scale + 1e-6).all()


@pytest.mark.parametrize("heads,kv_heads,dk,dv", SHAPES)
def test_explicit_attention_matches_reference(float64, heads, kv_heads, dk, dv):
    q = torch.randn(2, heads, 7, dk, requires_grad=True)
    k = torch.randn(2, kv_heads, 7, dk, requires_grad=True)
    v = torch.randn(2, kv_heads, 7, dv, requires_grad=True)
    out = explicit_causal_attention(q, k, v, 0.3)
    expected = reference(q, k, v, 0.3, 0)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(expected, (q, k, v), grad)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype,past,length,explicit", [
    (torch.bfloat16, 0, 16, True), (torch.bfloat16, 0, 17, False),  # longer than EXPLICIT_MAX_LEN (16 here)
    (torch.bfloat16, 3, 13, False), (torch.float32, 0, 16, False), (torch.float16, 0, 16, False)])
def test_explicit_attention_only_for_short_bfloat16_attention_from_scratch(monkeypatch, dtype, past, length, explicit):
    monkeypatch.setattr(fast_paths, "EXPLICIT_MAX_LEN", 16)
    calls = []
    monkeypatch.setattr(fast_paths, "explicit_causal_attention",
                        lambda *a: calls.append(a) or explicit_causal_attention(*a))
    q = torch.randn(2, length - past, 4, 24).transpose(1, 2)  # (B, H, T, D) views, as the attentions pass them
    k, v = torch.randn(2, length, 2, 24).transpose(1, 2), torch.randn(2, length, 2, 16).transpose(1, 2)
    out = attend(q.to(dtype), k.to(dtype), v.to(dtype), 0.25, past)
    assert len(calls) == explicit and out.dtype == dtype and out.shape == (2, 4, length - past, 16)
    torch.testing.assert_close(out.float(), reference(q, k, v, 0.25, past), atol=3e-2, rtol=3e-2)


def test_explicit_attention_only_where_a_backward_follows(monkeypatch):
    """Forward alone (prefill, sampling), SDPA is as fast or faster: the explicit path is for training steps."""
    calls = []
    monkeypatch.setattr(fast_paths, "explicit_causal_attention",
                        lambda *a: calls.append(a) or explicit_causal_attention(*a))
    q = torch.randn(1, 4, 8, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        attend(q, q, q, 0.25, 0)
    assert not calls
    attend(q, q, q, 0.25, 0)
    assert len(calls) == 1


def test_explicit_attention_bounded_by_score_memory(monkeypatch):
    calls = []
    monkeypatch.setattr(fast_paths, "explicit_causal_attention",
                        lambda *a: calls.append(a) or explicit_causal_attention(*a))
    q, k = torch.randn(2, 4, 8, 16, dtype=torch.bfloat16), torch.randn(2, 4, 8, 16, dtype=torch.bfloat16)
    monkeypatch.setattr(fast_paths, "EXPLICIT_MAX_SCORES", 2 * 4 * 8 * 8)
    attend(q, k, k, 0.25, 0)
    monkeypatch.setattr(fast_paths, "EXPLICIT_MAX_SCORES", 2 * 4 * 8 * 8 - 1)
    attend(q, k, k, 0.25, 0)
    assert len(calls) == 1


@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_enabled_swaps_every_projection_and_attention_and_puts_them_back(cache, monkeypatch, attention):
    monkeypatch.setattr(fast_paths, "time_split", lambda *a: True)  # the split wherever it applies
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    model = build(attention=attention).eval()
    idx = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        plain_logits = model(idx)
        cache_ = model.init_cache(1, 7)
        model(idx, cache=cache_)
        plain_step = model(idx[:, :1], cache=cache_, start_pos=6)
        counted, real_split = [], fast_paths.split
        monkeypatch.setattr(fast_paths, "split", lambda *a: counted.append(a) or real_split(*a))
        with fast_paths.enabled(model):
            swapped = [m for m in model.modules() if {"forward", "linear", "attend"} & vars(m).keys()]
            assert len(swapped) == sum(isinstance(m, (torch.nn.Linear, RoutedExperts)) for m in model.modules()) \
                + len(model.blocks)  # every projection, the experts, and each attention
            with fast_paths.enabled(model):  # nested: the outer swaps stay
                pass
            assert all({"forward", "linear", "attend"} & vars(m).keys() for m in swapped)
            torch.testing.assert_close(model(idx), plain_logits, atol=1e-5, rtol=1e-5)
            cache_ = model.init_cache(1, 7)
            model(idx, cache=cache_)
            torch.testing.assert_close(model(idx[:, :1], cache=cache_, start_pos=6), plain_step, atol=1e-5, rtol=1e-5)
        assert counted  # the decode step's projections took the split
        assert not [m for m in model.modules() if {"forward", "linear", "attend"} & vars(m).keys()]


def test_subclasses_that_compute_otherwise_are_left_alone(cache):
    class Lora(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) + 1.0

    class MyExperts(RoutedExperts):
        linear = staticmethod(lambda x, w: F.linear(x, w) * 2)

    model = torch.nn.Sequential(Lora(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False),
                                MyExperts(2, 4, 8, "relu2"))
    with fast_paths.enabled(model):
        assert [name for m in model for name in ("forward", "linear") if name in vars(m)] == ["forward"]
    with fast_paths.enabled(model, on=False):
        assert not [m for m in model if {"forward", "linear"} & vars(m).keys()]


def test_a_stream_runs_fast_only_when_asked(cache, monkeypatch):
    from nanods.generate import stream

    model, seen = build(), []
    real = fast_paths.enabled
    monkeypatch.setattr(fast_paths, "enabled", lambda m, on=True: seen.append(on) or real(m, on))
    for fast, compile in ((False, False), (True, False)):
        next(stream(model, torch.zeros(1, 3, dtype=torch.long), 2, temperature=0, fast=fast, compile=compile))
    assert seen == [False, True]
    assert not [m for m in model.modules() if {"forward", "linear", "attend"} & vars(m).keys()]


@pytest.mark.slow
def test_greedy_samples_are_identical_in_fresh_processes(tmp_path):
    """Two `nanods sample --temperature 0` runs, each a new process on 2 threads, print the same text:
    the first records its choices of the fast paths, the second reads them."""
    torch.manual_seed(0)
    model = build(vocab_size=320, tokenizer_vocab_size=257, sequence_len=64, n_embd=128)
    with torch.no_grad():
        model.lm_head.weight[byte_tokenizer().eot_id] = 0  # a logit of 0 is never the largest here: no early stop
    ckpt = checkpoint.save(tmp_path / "run", model, model.config, byte_tokenizer(), 1, {}, {}, {})
    env = {"NANODS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin",
           "NO_COLOR": "1"}
    args = [sys.executable, "-m", "nanods", "sample", str(ckpt), "--temperature", "0", "--prompt", "def ",
            "--max-new-tokens", "40", "-q"]
    runs = [subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300) for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr + runs[1].stderr
    assert runs[0].stdout == runs[1].stdout and len(runs[0].stdout) > 10
    assert (tmp_path / "cache" / fast_paths.RECORD_FILE).exists()  # sample ran the fast paths
