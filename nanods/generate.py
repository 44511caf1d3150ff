"""Autoregressive sampling on the KV cache: one prefill, then one token per step."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from nanods.config import SAMPLE_RANGES
from nanods.errors import NanodsError
from nanods.model import NanoDeepSeek


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator) -> torch.Tensor:
    """Pick one id per row of logits (B, V): greedy at temperature 0, else top-k / top-p sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.size(-1):  # None or 0: no top-k cut
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def compiled_decode_step(model: NanoDeepSeek) -> Callable[..., torch.Tensor]:
    """model's forward for one new token of one sequence, compiled by torch.compile into one graph.

    The cache length is a symbolic size, so one compilation serves every position; the routed
    expert ids become values inside the graph (docs/measurements.md has the figures). Batch 1
    only: the loop kernel's sorted dispatch of several tokens needs per-expert counts on the host.
    A failed compilation raises one NanodsError line.
    """
    compiled = torch.compile(model, dynamic=True, fullgraph=True)

    def step(token: torch.Tensor, cache: list, start_pos: int) -> torch.Tensor:
        if token.shape != (1, 1):
            raise ValueError(f"the compiled decode step takes one token of one sequence, got {tuple(token.shape)}")
        with torch._dynamo.config.patch(capture_scalar_outputs=True):  # expert ids as values in the graph
            try:
                return compiled(token, cache=cache, start_pos=start_pos)
            except torch._dynamo.exc.TorchDynamoException as e:  # many lines of compiler output otherwise
                first = next((line for line in str(e).splitlines() if line.strip()), "")
                raise NanodsError(f"torch.compile failed on the decode step ({type(e).__name__}: {first[:200]}); "
                                  "run without --compile / compile=False") from e

    return step


def stream(model: NanoDeepSeek, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
           eos_id: int | None = None, use_cache: bool = True, compile: bool = False) -> Iterator[torch.Tensor]:
    """Yield the next token of every row (B,) per step; rows that hit eos_id keep yielding eos_id.

    Sampling uses a private generator (the global RNG is untouched); ids the tokenizer does not
    have (the vocabulary is padded to a multiple of 64) are never sampled. compile=True decodes
    with `compiled_decode_step` (one sequence, on the cache).
    """
    cfg = model.config
    B, T = idx.shape
    if T + max_new_tokens > cfg.sequence_len:
        raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"sequence_len ({cfg.sequence_len})")
    for name, value in {"temperature": temperature, "top_k": top_k, "top_p": top_p}.items():
        if value is not None and value not in SAMPLE_RANGES[name]:  # nan or inf would end in a torch error
            raise ValueError(f"{name} must be {SAMPLE_RANGES[name]}, got {value}")
    if compile and (B != 1 or not use_cache):
        raise ValueError("compiled decoding runs one sequence on the KV cache: use one prompt row and the cache")
    decode = compiled_decode_step(model) if compile else model
    generator = torch.Generator(device=idx.device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    limit = cfg.tokenizer_vocab_size or cfg.vocab_size
    was_training = model.training
    model.eval()
    fast = torch.inference_mode()  # cheaper per op than no_grad; entered only around compute, never across a yield
    try:
        with fast:
            cache = model.init_cache(B, T + max_new_tokens) if use_cache else None
            seq = idx
            logits = model(idx, cache=cache)[:, -1]
            done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        for step in range(max_new_tokens):
            with fast:
                token = sample_next(logits[:, :limit], temperature, top_k, top_p, generator)
                if eos_id is not None:
                    token = token.masked_fill(done, eos_id)
                    done |= token == eos_id
            yield token.clone()  # a normal tensor again: callers may use it anywhere, autograd included
            if step == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
                break
            with fast:
                if use_cache:
                    logits = decode(token[:, None], cache=cache, start_pos=T + step)[:, -1]
                else:
                    seq = torch.cat([seq, token[:, None]], dim=1)
                    logits = model(seq)[:, -1]
    finally:
        model.train(was_training)
