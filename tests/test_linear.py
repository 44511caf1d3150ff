"""nanods.layers.linear: the thread-split matrix-vector path equals F.linear, values and gradients,
and is taken only where it was timed faster."""

import re

import pytest
import torch
import torch.nn.functional as F

from nanods.layers import linear as linear_module
from nanods.layers.linear import FEW_ROWS, Linear, linear, split_is_faster


@pytest.fixture(params=[1, 2, 3])
def threads(request, monkeypatch):
    """Thread counts 1-3, with the split taken wherever it applies (whatever this machine's timing says)."""
    monkeypatch.setattr(linear_module, "split_is_faster", lambda *key: True)
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@pytest.mark.parametrize("shape", [(1, 1, 24), (3, 1, 24), (2, 4, 24), (24,), (FEW_ROWS + 1, 24)])
def test_equals_f_linear(float64, threads, shape):
    weight = torch.randn(36, 24, requires_grad=True)  # 36 rows: split by 2 and 3 threads
    x = torch.randn(*shape, requires_grad=True)
    out = linear(x, weight)
    expected = F.linear(x, weight)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (x, weight), grad), torch.autograd.grad(expected, (x, weight), grad)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_odd_shapes_and_strided_input(threads):
    weight = torch.randn(35, 24)  # 35 rows: no even split by 2 threads
    x = torch.randn(24, 3)[:, 1].view(1, 1, 24)  # a strided view
    torch.testing.assert_close(linear(x, weight), F.linear(x, weight))
    even = torch.randn(36, 24)  # splits over 2 and 3 threads
    out = linear(torch.randn(2, 3, 24), even)
    assert out.is_contiguous() and out.view(-1).numel() == 2 * 3 * 36  # row-major, like F.linear's output
    assert linear(torch.randn(0, 24), even).shape == (0, 36)
    layer = Linear(24, 36)
    assert layer.bias is None and layer.weight.shape == (36, 24)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight))


def test_split_taken_only_where_timed_faster(monkeypatch):
    weight, x = torch.randn(36, 24), torch.randn(1, 24)
    calls = []
    monkeypatch.setattr(torch, "bmm", lambda *a: calls.append(a) or torch.ops.aten.bmm(*a))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    for faster in (False, True):
        monkeypatch.setattr(linear_module, "split_is_faster", lambda *key, faster=faster: faster)
        torch.testing.assert_close(linear(x, weight), F.linear(x, weight))
        assert len(calls) == faster


def test_split_timing_runs_once_per_shape(monkeypatch):
    seconds = iter([(2.0, 2.4), (1.0, 1.3)])  # (split, plain) per timed shape
    timings = []
    monkeypatch.setattr(linear_module, "_fastest", lambda paths, weights: timings.append(paths) or next(seconds))
    monkeypatch.setattr(linear_module, "_SPLIT_IS_FASTER", {})
    assert split_is_faster(36, 24, torch.float32, 2) is False  # less than SPLIT_MARGIN (1.25x) keeps F.linear
    assert split_is_faster(36, 24, torch.float32, 2) is False and len(timings) == 1  # not timed again
    assert split_is_faster(36, 24, torch.bfloat16, 2) is True and len(timings) == 2


def test_split_timing_streams_weights_from_memory(monkeypatch):
    """The paths take turns and each call reads a weight not read before: a weight hot in cache hid a 2.7x win,
    and a path timed on the weights the other just read would run from cache."""
    seen = {"split": [], "plain": []}
    monkeypatch.setattr(linear_module, "_SPLIT_IS_FASTER", {})
    monkeypatch.setattr(linear_module, "STREAM_BYTES", 64 * 36 * 24 * 4)  # 64 weights of 36 x 24 floats
    monkeypatch.setattr(linear_module, "_split", lambda x, weight, blocks: seen["split"].append(weight.data_ptr()))
    monkeypatch.setattr(linear_module.F, "linear", lambda x, weight: seen["plain"].append(weight.data_ptr()))
    split_is_faster(36, 24, torch.float32, 2)
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
        out, code = run_and_get_code(torch.compile(linear, fullgraph=True), x, weight)
        expected = F.linear(x, weight)
    assert out.dtype == expected.dtype
    assert not re.search(r"extern_kernels\.\w+\(", "".join(code))  # no mm/bmm/addmm call: the reduction itself
    tol = 1e-5 if expected.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
