import pytest
import torch
from nanods_noisy_topk import NoisyTopKRouter

from nanods.testing import check_component, tiny_config


def test_conforms_to_the_nanods_router_contract():
    check_component("router", "noisy-topk")


def test_conforms_without_noise_or_balance_loss():
    check_component("router", "noisy-topk", router_options={"noise_std": 0.0, "balance_alpha": 0.0})


def test_noise_only_in_training():
    router = NoisyTopKRouter(tiny_config("router", "noisy-topk"), 0)
    with torch.no_grad():
        router.w_gate.normal_()
        router.w_noise.fill_(1.0)
    x = torch.randn(2, 6, 64)
    router.eval()
    assert torch.equal(router(x)[1], router(x)[1])
    router.train()
    choices = {tuple(router(x)[1].flatten().tolist()) for _ in range(5)}
    assert len(choices) > 1  # the noise changes the choice from call to call


def test_unknown_option_is_refused():
    from nanods import NanoDeepSeek
    from nanods.errors import NanodsError

    with pytest.raises(NanodsError, match="unknown key 'noise_sd'.*did you mean 'noise_std'"):
        NanoDeepSeek(tiny_config("router", "noisy-topk", router_options={"noise_sd": 1.0}))
