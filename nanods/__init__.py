"""nanods: a small, hackable, faithful DeepSeek-V3 (MLA, DeepSeekMoE, auxiliary-loss-free routing).

The public names are imported lazily, so `nanods --help` does not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nanods.config import NanoDeepSeekConfig
    from nanods.model import NanoDeepSeek
    from nanods.tokenizer import Tokenizer

__version__ = "0.1.0"


def create_nano_deepseek(scale: str = "base", **overrides: Any) -> NanoDeepSeek:
    """A model at a preset scale, e.g. create_nano_deepseek(scale="small", use_mla=True, use_moe=False)."""
    from nanods.config import NanoDeepSeekConfig, preset
    from nanods.model import NanoDeepSeek

    return NanoDeepSeek(NanoDeepSeekConfig(**{**preset(scale), **overrides}))


def load(path: str, device: str = "cpu") -> tuple[NanoDeepSeek, Tokenizer | None]:
    """A checkpoint -> (model in eval mode, tokenizer, or None for a model imported without one);
    reads safetensors only, never pickle."""
    from nanods.checkpoint import load as load_checkpoint

    return load_checkpoint(path, device)


def __getattr__(name: str) -> Any:
    if name == "NanoDeepSeek":
        from nanods.model import NanoDeepSeek

        return NanoDeepSeek
    if name == "NanoDeepSeekConfig":
        from nanods.config import NanoDeepSeekConfig

        return NanoDeepSeekConfig
    raise AttributeError(f"module 'nanods' has no attribute '{name}'")


__all__ = ["NanoDeepSeek", "NanoDeepSeekConfig", "create_nano_deepseek", "load", "__version__"]
