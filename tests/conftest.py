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


def main_in_process(args, capsys):
    """nanods.cli.main(args) in this process -> (exit code, stdout, stderr)."""
    from nanods.cli import main

    with pytest.raises(SystemExit) as info:
        main(args)
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err
