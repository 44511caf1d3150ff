"""nanods: a small, hackable, faithful DeepSeek-V3.2 (MLA, DeepSeekMoE, auxiliary-loss-free routing)."""

from __future__ import annotations

from typing import Any

from nanods.config import NanoDeepSeekConfig, preset
from nanods.model import NanoDeepSeek

__version__ = "0.1.0"


def create_nano_deepseek(scale: str = "base", **overrides: Any) -> NanoDeepSeek:
    """A model at a preset scale, e.g. create_nano_deepseek(scale="small", use_mla=True, use_moe=False)."""
    return NanoDeepSeek(NanoDeepSeekConfig(**{**preset(scale), **overrides}))


__all__ = ["NanoDeepSeek", "NanoDeepSeekConfig", "create_nano_deepseek", "__version__"]
