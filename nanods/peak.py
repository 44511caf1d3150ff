"""The machine's measured matmul peak, the denominator of every MFU figure."""

from __future__ import annotations

import time
from functools import lru_cache

import torch


def sync(device: torch.device) -> None:
    """Wait for the device to finish queued work (so wall-clock timings are honest)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@lru_cache(maxsize=8)
def matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 1024, seconds: float = 0.3) -> float:
    """Best observed FLOP/s of a square x @ W^T matmul on this device and dtype (bigger on GPUs)."""
    if device.type == "cuda":
        size = 8192
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b.T  # warm up; x @ W^T is the layout every nn.Linear multiplies in
    sync(device)
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b.T
        sync(device)
        best = max(best, 2 * size**3 / (time.perf_counter() - t0))
    return best
