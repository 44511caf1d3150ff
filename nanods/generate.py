"""Autoregressive sampling on the KV cache: one prefill, then one token per step.

Below `stream`, what `nanods sample` wraps around it: its settings, the prompt, what fits the
context, and the text each sample gains per token.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nanods import fast_paths
from nanods.checks import SAMPLE_RANGES
from nanods.compiling import compiled
from nanods.device import device_memory
from nanods.errors import NanodsError
from nanods.project import sample_settings
from nanods.sampling import sample_next
from nanods.speculative import SelfSpeculation, SpeculationStats
from nanods.terminal import format_bytes
from nanods.tokenizer import StreamDecoder

if TYPE_CHECKING:  # model.py imports this module for NanoDeepSeek.generate
    from nanods.model import NanoDeepSeek
    from nanods.tokenizer import Tokenizer


def compiled_decode_step(model: NanoDeepSeek) -> Callable[..., torch.Tensor]:
    """model's forward for one new token of one sequence, through `compiled` (made within
    `nanods.fast_paths.enabled(model)`, the graph has the fast paths).

    Batch 1 only: the loop kernel's sorted dispatch of many tokens needs per-expert counts on the
    host (docs/measurements.md has the figures).
    """
    forward = compiled(model, "the decode step")

    def step(token: torch.Tensor, cache: list, start_pos: int) -> torch.Tensor:
        if token.shape != (1, 1):
            raise ValueError(f"the compiled decode step takes one token of one sequence, got {tuple(token.shape)}")
        return forward(token, cache=cache, start_pos=start_pos)

    return step


def stream(model: NanoDeepSeek, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
           eos_id: int | None = None, use_cache: bool = True, compile: bool = False,
           fast: bool = False, speculative: bool = False, stats: SpeculationStats | None = None
           ) -> Iterator[torch.Tensor]:
    """Yield the next token of every row (B,) per step; rows that hit eos_id keep yielding eos_id.

    Sampling uses a private generator (the global RNG is untouched); ids the tokenizer does not
    have (the vocabulary is padded to a multiple of 64) are never sampled. fast=True runs the
    model with `nanods.fast_paths`; compile=True decodes with `compiled_decode_step` (one
    sequence, on the cache: with fast=True, its graph has the fast paths), or with speculative=True
    compiles the verify and draft steps. speculative=True
    drafts with the MTP modules and verifies with the main model (`nanods.speculative`): the
    same distribution, the same greedy tokens, fewer main-model steps; `stats` collects how
    many drafts passed.
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
    if speculative and not use_cache:
        raise ValueError("speculative decoding verifies drafts on the KV cache: use the cache")
    generator = torch.Generator(device=idx.device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    limit = cfg.tokenizer_vocab_size or cfg.vocab_size

    def pick(logits: torch.Tensor) -> torch.Tensor:
        return sample_next(logits[:, :limit], temperature, top_k, top_p, generator)

    if max_new_tokens == 0:
        return
    was_training = model.training
    model.eval()
    inference = torch.inference_mode()  # cheaper per op than no_grad; entered only around compute, never across a yield
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    try:
        with fast_paths.enabled(model, on=fast):  # the modules' swaps may span the yields
            if speculative:
                speculation = SelfSpeculation(model, B, T + max_new_tokens, temperature, top_k, top_p, generator,
                                              limit, stats if stats is not None else SpeculationStats(), compile)
                steps = _speculative_steps(speculation, idx, pick, done, inference)
            else:
                decode = compiled_decode_step(model) if compile else model
                steps = _plain_steps(model, idx, max_new_tokens, pick, use_cache, decode, inference)
            produced = 0
            for tokens in steps:
                for token in tokens:
                    if eos_id is not None:
                        token = token.masked_fill(done, eos_id)
                        done |= token == eos_id
                    yield token.clone()  # a normal tensor again: callers may use it anywhere, autograd included
                    produced += 1
                    if produced == max_new_tokens or (eos_id is not None and bool(done.all())):
                        return
    finally:
        model.train(was_training)


def _plain_steps(model: NanoDeepSeek, idx: torch.Tensor, max_new_tokens: int, pick: Callable, use_cache: bool,
                 decode: Callable, inference: Any) -> Iterator[list[torch.Tensor]]:
    """One token per model step: the prompt, then each token on the cache (or the whole prefix again)."""
    B, T = idx.shape
    with inference:
        cache = model.init_cache(B, T + max_new_tokens) if use_cache else None
        token = pick(model(idx, cache=cache)[:, -1])
    seq = idx
    for step in range(max_new_tokens):
        yield [token]
        with inference:
            if use_cache:
                logits = decode(token[:, None], cache=cache, start_pos=T + step)[:, -1]
            else:
                seq = torch.cat([seq, token[:, None]], dim=1)
                logits = model(seq)[:, -1]
            token = pick(logits)


def _speculative_steps(speculation: SelfSpeculation, idx: torch.Tensor, pick: Callable, done: torch.Tensor,
                       inference: Any) -> Iterator[list[torch.Tensor]]:
    """The prompt's next token, then each round's accepted drafts and the main model's token."""
    with inference:
        tokens = [pick(speculation.start(idx))]
    while True:
        yield tokens
        with inference:
            tokens = speculation.round(tokens[-1], done)


# ---------------------------------------------------------------------------------------------
# `nanods sample`: its settings, the prompt, what fits, and the text of each sample

MAX_PROMPT_BYTES = 2**26  # 64 MiB: far beyond any context; a prompt from /dev/zero must not fill memory


def sampling_settings(given: dict[str, Any], path: Path = Path("nanods.toml")
                      ) -> tuple[dict[str, Any], dict[str, str | None]]:
    """Each setting from the command line (None: not given), else [sample] of path, else its default.

    Returns the values, in the order given, and where each came from (None for a default). The
    command line checks its own values as it parses them; the file's are checked as it is read.
    """
    defaults, in_file = sample_settings(path)
    values: dict[str, Any] = {}
    sources: dict[str, str | None] = {}
    for name, value in given.items():
        if value is None:
            values[name] = getattr(defaults, name)
            sources[name] = f"{name} in [sample] of {path}" if name in in_file else None
        else:
            values[name], sources[name] = value, "--" + name.replace("_", "-")
    return values, sources


def _read_bounded(f: Any, source: str) -> bytes:
    data = f.read(MAX_PROMPT_BYTES + 1)
    if len(data) > MAX_PROMPT_BYTES:
        raise NanodsError(f"{source} is longer than {format_bytes(MAX_PROMPT_BYTES)}, far beyond any model's "
                          "context; give the part to continue")
    return data


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    """The prompt text: --prompt or --prompt-file, else stdin when piped, else empty; it must be UTF-8."""
    if prompt_file is not None:
        if not prompt_file.exists():
            raise NanodsError(f"prompt file '{prompt_file}' not found")
        if not prompt_file.is_file():
            raise NanodsError(f"prompt file '{prompt_file}' is not a regular file; give a text file")
        source = f"prompt file '{prompt_file}'"
        with prompt_file.open("rb") as f:
            data = _read_bounded(f, source)
    elif prompt is not None:  # the bytes of the command line, which Python keeps as surrogates when not UTF-8
        data, source = prompt.encode("utf-8", "surrogateescape"), "--prompt"
    elif not sys.stdin.isatty():
        source = "the prompt on stdin"
        data = _read_bounded(sys.stdin.buffer, source)
    else:
        return ""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NanodsError(f"{source} is not UTF-8 text ({e.reason} at byte {e.start}); convert it, "
                          "e.g. with iconv -t UTF-8") from None


def fit_sampling(model: NanoDeepSeek, prompt_tokens: int, samples: int, max_new_tokens: int, source: str | None,
                 note: Callable[[str], None]) -> int:
    """The tokens to generate after the prompt: max_new_tokens, or the room the model's context leaves
    when that is less and max_new_tokens is the default (source None; `note` says so).

    Refused before anything is allocated: a prompt that fills the context, a max_new_tokens that
    someone set (named by source) beyond it, and samples whose KV cache and logits cannot fit.
    """
    limit = model.config.sequence_len
    if prompt_tokens >= limit:
        raise NanodsError(f"the prompt ({prompt_tokens} tokens, the start-of-text token included) fills the model's "
                          f"{limit}-token context and leaves no room to generate; shorten the prompt")
    if prompt_tokens + max_new_tokens > limit:
        if source is not None:
            raise NanodsError(f"prompt ({prompt_tokens} token{'s' * (prompt_tokens > 1)}) + {source} "
                              f"({max_new_tokens}) exceeds "
                              f"the model's context of {limit} tokens; shorten the prompt or lower it")
        note(f"note: --max-new-tokens {max_new_tokens} lowered to {limit - prompt_tokens} to fit the model's "
             f"{limit}-token context")
        max_new_tokens = limit - prompt_tokens
    weight = model.lm_head.weight
    length = prompt_tokens + max_new_tokens
    need = samples * (length * model.kv_cache_bytes_per_token(weight.dtype) + 16 * model.config.vocab_size)
    have = device_memory(weight.device)
    if have and need > have // 2:
        raise NanodsError(f"--num-samples {samples} needs about {format_bytes(need)} for the KV cache and logits, "
                          f"more than half of this machine's {format_bytes(have)}; lower --num-samples")
    return max_new_tokens


def sample_texts(model: NanoDeepSeek, tokenizer: Tokenizer, prompt_ids: list[int], samples: int,
                 max_new_tokens: int, **sampling: Any) -> Iterator[list[str]]:
    """Continue prompt_ids `samples` times through `stream` (sampling: its keyword arguments), yielding
    per generated token the text each sample gains.

    The end-of-text token adds none. A character whose bytes are not all generated yet waits for
    them; when its sample ends it comes out as it is (U+FFFD if incomplete).
    """
    idx = torch.tensor([prompt_ids] * samples, device=model.lm_head.weight.device)
    decoders = [StreamDecoder(tokenizer) for _ in range(samples)]
    for step, token in enumerate(stream(model, idx, max_new_tokens, eos_id=tokenizer.eot_id, **sampling)):
        last = step == max_new_tokens - 1
        yield [decoder.flush() if t == tokenizer.eot_id else decoder.push([t]) + (decoder.flush() if last else "")
               for decoder, t in zip(decoders, token.tolist())]
