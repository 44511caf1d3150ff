"""The device: chosen from --device / --dtype, and how much memory it has."""

from __future__ import annotations

import os
import sys

import torch

from nanods.errors import NanodsError, did_you_mean

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(name: str = "auto") -> torch.device:
    """auto -> cuda, then mps, then cpu; an unavailable explicit choice is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise NanodsError(f"unknown device '{name}'{did_you_mean(name, ['auto', 'cpu', 'cuda', 'mps'])}; "
                          "use auto, cpu, cuda or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise NanodsError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise NanodsError("--device mps was asked for but MPS is not available; use --device cpu")
    return torch.device(name)


def has_native_bf16(device: torch.device) -> bool:
    """True where bf16 matmul runs on native hardware (CUDA bf16, CPUs with AVX512-BF16/AMX, MPS)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return device.type == "mps"


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x run in: autocast's when it is on for x's device, else x's own."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto -> bfloat16 where the device has native bf16 matmul, else float32."""
    if name == "auto":
        return torch.bfloat16 if has_native_bf16(device) else torch.float32
    if name not in DTYPES:
        raise NanodsError(f"unknown dtype '{name}'{did_you_mean(name, DTYPES)}; use auto, float32/fp32 or bfloat16/bf16")
    return DTYPES[name]


def physical_memory() -> int | None:
    """This machine's physical memory in bytes (sysconf), or None where the OS does not say."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None
    return pages * page_size if pages > 0 and page_size > 0 else None


def device_memory(device: torch.device) -> int | None:
    """All the memory a device has: physical memory for the CPU, the GPU's total for CUDA; None where unknown.

    Totals, not what is free now: the check refuses only what cannot fit even on an idle machine.
    """
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    if device.type == "cpu":
        return physical_memory()
    return None


def peak_memory(device: torch.device) -> int | None:
    """The most memory this process has held: the peak resident set on the CPU, allocated memory on CUDA."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux
