import pytest
import torch

from nanods import NanoDeepSeek, NanoDeepSeekConfig
from nanods.testing import TINY

COMBOS = [(a, f) for a in ("mha", "mla") for f in ("dense", "moe")]


def tiny_config(**overrides) -> NanoDeepSeekConfig:
    return NanoDeepSeekConfig(**{**TINY, **overrides})


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def build(seed: int = 0, **overrides) -> NanoDeepSeek:
    torch.manual_seed(seed)
    return NanoDeepSeek(tiny_config(**overrides))
