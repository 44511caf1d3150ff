"""memory: sizes from one block of each kind equal the built model's; training that cannot fit is refused."""

import pytest
import torch
from conftest import COMBOS, tiny_config

from nanods import NanoDeepSeek, device
from nanods.errors import NanodsError
from nanods.flops import build_on_meta, count_parameters
from nanods.memory import check_training_fits, model_size, training_memory
from nanods.terminal import format_bytes

GIB = 2**30


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("first_k_dense", [0, 1, 3])
@pytest.mark.parametrize("attention,ffn", COMBOS)
def test_model_size_equals_the_built_model(attention, ffn, first_k_dense, tie):
    config = tiny_config(attention=attention, ffn=ffn, n_layer=3, first_k_dense=first_k_dense, tie_embeddings=tie,
                         norm_weights=True)
    model = build_on_meta(config)
    stored = model.state_dict()  # what a checkpoint holds: a tied head is embed.weight
    if tie:
        stored.pop("lm_head.weight")
    size = model_size(config)
    assert size.parameters == count_parameters(model)["total"]
    assert (size.tensors, size.values) == (len(stored), sum(t.numel() for t in stored.values()))


def test_model_size_counts_expert_bias_as_stored_not_as_a_parameter():
    config = tiny_config(ffn="moe", n_layer=2)
    size = model_size(config)
    assert size.values - size.parameters == 2 * config.num_experts


def _saved_activation_bytes(model: NanoDeepSeek, idx: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter tensors autograd keeps for the backward of one training forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx)
    return sum(saved.values())


@pytest.mark.parametrize("attention,ffn", COMBOS)
def test_the_activation_estimate_is_within_2x_of_what_autograd_keeps(attention, ffn):
    config = tiny_config(attention=attention, ffn=ffn, n_embd=128, n_layer=3, first_k_dense=1)
    torch.manual_seed(0)
    model = NanoDeepSeek(config).train()
    idx = torch.randint(0, config.vocab_size, (2, 64))
    measured = _saved_activation_bytes(model, idx)
    estimate = training_memory(config, 2, 64, torch.float32).activation_bytes
    assert 0.5 < estimate / measured < 2


def test_bytes_per_parameter_are_adamw_state_plus_autocast_copies():
    config = tiny_config()
    assert training_memory(config, 1, 8, torch.float32).bytes_per_parameter == 16
    assert training_memory(config, 1, 8, torch.bfloat16).bytes_per_parameter == 18


@pytest.fixture
def machine_of(monkeypatch):
    """Set the memory the CPU reports."""
    def set_memory(nbytes):
        monkeypatch.setattr(device, "physical_memory", lambda: nbytes)
    return set_memory


def test_a_model_too_large_for_the_machine_is_one_line_with_the_numbers(machine_of):
    machine_of(24 * GIB)
    config = tiny_config(n_layer=1024, n_embd=8192, n_head=64, n_kv_head=64, vocab_size=2**17, num_experts=64)
    with pytest.raises(NanodsError) as info:
        check_training_fits(config, 8, 256, torch.float32, torch.device("cpu"))
    message = str(info.value)
    parameters = model_size(config).parameters
    assert f"({parameters:,} parameters x 16 bytes + activations ~" in message
    assert message.startswith("this model needs about ") and " TiB to train " in message
    assert message.endswith("but the machine has 24 GiB; choose a smaller scale or n_layer/n_embd")
    assert "\n" not in message


def test_a_batch_too_large_points_at_the_batch(machine_of):
    machine_of(8 * GIB)
    with pytest.raises(NanodsError, match=r"activations ~.* but the machine has 8 GiB; lower train.micro_batch_size"):
        check_training_fits(tiny_config(), 4096, 4096, torch.bfloat16, torch.device("cpu"))


def test_a_model_that_fits_passes(machine_of):
    machine_of(1 * GIB)
    check_training_fits(tiny_config(), 8, 64, torch.float32, torch.device("cpu"))


def test_unknown_memory_or_device_skips_the_check(machine_of):
    huge = tiny_config(n_layer=1024, n_embd=8192, n_head=64, n_kv_head=64)
    machine_of(None)
    check_training_fits(huge, 8, 256, torch.float32, torch.device("cpu"))
    check_training_fits(huge, 8, 256, torch.float32, torch.device("meta"))


def test_cuda_uses_the_gpus_total_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 * GIB, 80 * GIB))
    config = tiny_config(n_layer=1024, n_embd=8192, n_head=64, n_kv_head=64)
    with pytest.raises(NanodsError, match=r"x 18 bytes .* but cuda:0 has 80 GiB; choose a smaller scale"):
        check_training_fits(config, 1, 64, torch.bfloat16, torch.device("cuda:0"))
    check_training_fits(tiny_config(), 1, 64, torch.bfloat16, torch.device("cuda:0"))  # 1 GiB free does not matter


def test_physical_memory_is_read_here():
    assert device.physical_memory() > 2**26


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1536, "1.5 KiB"), (24 * GIB, "24 GiB"), (1.17 * 2**40, "1.17 TiB")])
def test_format_bytes(n, text):
    assert format_bytes(n) == text
