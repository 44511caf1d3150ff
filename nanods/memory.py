"""What a model costs before it exists: its sizes from one block of each kind, and whether training fits."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from nanods.config import NanoDeepSeekConfig
from nanods.device import device_memory
from nanods.errors import NanodsError
from nanods.layers.norm import RMSNorm
from nanods.model import Block, MTPModule
from nanods.terminal import format_bytes

# fp32 weight, fp32 gradient and AdamW's two fp32 moments (Muon keeps one moment: less)
STATE_BYTES_PER_PARAMETER = 16


class ModelSize(NamedTuple):
    """A model's sizes, counted without building it."""

    parameters: int  # distinct parameters (a tied head once): equals count_parameters(...)["total"]
    tensors: int  # tensors its checkpoint stores: the state dict, less lm_head.weight when tied
    values: int  # values in those tensors: the parameters plus persistent buffers such as expert_bias


class TrainingMemory(NamedTuple):
    """Estimated bytes one training process holds at its peak."""

    parameters: int
    bytes_per_parameter: int
    activation_bytes: int

    @property
    def total(self) -> int:
        return self.parameters * self.bytes_per_parameter + self.activation_bytes


def _parts(config: NanoDeepSeekConfig) -> list[tuple[nn.Module, int]]:
    """(module on the meta device, how many of it NanoDeepSeek holds): every module of the model once.

    Blocks differ only in their FFN (dense below first_k_dense, config.ffn from there on), so one
    block of each kind stands for all of its layers; likewise one MTP module for every depth.
    """
    dense, routed = config.first_k_dense, config.n_layer - config.first_k_dense
    with torch.device("meta"):
        blocks = [(Block(config, first), n) for first, n in ((0, dense), (dense, routed)) if n]
        return [(nn.Embedding(config.vocab_size, config.n_embd), 1), *blocks,
                (RMSNorm(config.n_embd, config.norm_eps, config.norm_weights), 1),
                (MTPModule(config, config.n_layer), config.mtp_depth),
                (nn.Linear(config.n_embd, config.vocab_size, bias=False),
                 0 if config.tie_embeddings else 1)]  # tied: the head is embed.weight


def model_size(config: NanoDeepSeekConfig) -> ModelSize:
    """Parameters, and the tensors and values a checkpoint stores: milliseconds at any n_layer."""
    parameters = tensors = values = 0
    for module, count in _parts(config):
        state = module.state_dict()  # what save() writes: persistent buffers in, non-persistent ones out
        parameters += count * sum(p.numel() for p in module.parameters())
        tensors += count * len(state)
        values += count * sum(t.numel() for t in state.values())
    return ModelSize(parameters, tensors, values)


def _layer_activation_values(config: NanoDeepSeekConfig, routed: bool) -> int:
    """Values one layer keeps for the backward pass per token: an estimate (within 1.5x of the built-ins' real count).

    8 x n_embd: the two norms' inputs and outputs and the other residual-width tensors;
    4 x the heads' width: queries, keys, values and the attention output;
    the FFN's up-projection output and activation (3 x hidden for swiglu, 2 x for relu2), for every
    active expert; and for routed layers, 4 copies of n_embd per chosen expert (the gathered
    inputs, sorted rows, outputs and their reordering).
    """
    head = config.qk_nope_head_dim + config.qk_rope_head_dim if config.use_mla else config.head_dim
    expand = 3 if config.activation == "swiglu" else 2
    if routed:
        ffn = expand * (config.top_k + config.n_shared_experts) * config.moe_hidden + 4 * config.top_k * config.n_embd
    else:
        ffn = expand * config.ffn_hidden
    return 8 * config.n_embd + 4 * config.n_head * head + ffn


def training_memory(config: NanoDeepSeekConfig, batch_size: int, seq_len: int, dtype: torch.dtype) -> TrainingMemory:
    """Peak memory of training with AdamW: optimizer state per parameter plus the forward's activations.

    batch_size is the sequences of one forward in one process (the micro batch). Activations are
    counted at 4 bytes per value even in bfloat16: the residual stream, norms and router stay
    float32 under autocast. Left out: transient buffers (one layer's activation gradients during
    the backward, the loss's logit slices) and allocator fragmentation.
    """
    layers = config.n_layer + config.mtp_depth  # an MTP module: one block, its input norms and projection, its loss
    routed = layers - config.first_k_dense if config.use_moe else 0
    per_token = (routed * _layer_activation_values(config, routed=True)
                 + (layers - routed) * _layer_activation_values(config, routed=False)
                 + 4 * config.n_embd  # embedding output, final norm, the loss's saved gradient of the hidden states
                 + 8 * config.mtp_depth * config.n_embd)
    value_bytes = max(4, dtype.itemsize)
    # under autocast every weight's low-precision copy is kept for the backward as well
    copies = dtype.itemsize if dtype.itemsize < 4 else 0
    return TrainingMemory(model_size(config).parameters, STATE_BYTES_PER_PARAMETER + copies,
                          batch_size * seq_len * per_token * value_bytes)


def check_training_fits(config: NanoDeepSeekConfig, batch_size: int, seq_len: int, dtype: torch.dtype,
                        device: torch.device) -> None:
    """Raise NanodsError when training needs more memory than the device has (see training_memory).

    Call it before building the model: a model too large for the machine fails in a second with
    the numbers, instead of allocating until the OS kills the process. Unknown devices pass.
    """
    available = device_memory(device)
    if available is None:
        return
    need = training_memory(config, batch_size, seq_len, dtype)
    if need.total <= available:
        return
    where = "the machine" if device.type == "cpu" else str(device)
    fix = ("lower train.micro_batch_size or train.seq_len" if 2 * need.activation_bytes > need.total
           else "choose a smaller scale or n_layer/n_embd")
    raise NanodsError(f"this model needs about {format_bytes(need.total)} to train ({need.parameters:,} parameters x "
                      f"{need.bytes_per_parameter} bytes + activations ~{format_bytes(need.activation_bytes)}) "
                      f"but {where} has {format_bytes(available)}; {fix}")
