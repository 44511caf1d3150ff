import pytest
import torch

from nanods import NanoDeepSeek, NanoDeepSeekConfig

COMBOS = [(a, f) for a in ("mha", "mla") for f in ("dense", "moe")]


def tiny_config(**overrides) -> NanoDeepSeekConfig:
    base = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, vocab_size=128, sequence_len=64, num_experts=4, top_k=2)
    return NanoDeepSeekConfig(**{**base, **overrides})


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def build(seed: int = 0, **overrides) -> NanoDeepSeek:
    torch.manual_seed(seed)
    return NanoDeepSeek(tiny_config(**overrides))
