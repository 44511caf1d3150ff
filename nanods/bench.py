"""`nanods bench`: what this machine does with a model, measured side by side in one process.

Every figure is a median over repeats with its spread (min-max). MFU divides the shared FLOPs
function by the matmul peak measured here, in the same run; the decode roofline divides the
measured read bandwidth by the bytes a decode step must touch.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from nanods import compiling, fast_paths, registry
from nanods.config import NanoDeepSeekConfig
from nanods.errors import NanodsError
from nanods.flops import count_parameters, flops_per_token
from nanods.generate import compiled_decode_step, stream
from nanods.layers.ffn.dense import MLP
from nanods.layers.ffn.experts import RoutedExperts, pick_kernel
from nanods.layers.ffn.moe import MoE
from nanods.model import NanoDeepSeek
from nanods.peak import matmul_peak, sync
from nanods.speculative import SpeculationStats
from nanods.terminal import escape, format_bytes
from nanods.train.optim import fused_adamw


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median, min and max seconds of fn() over repeats (after warm-up calls)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def read_bandwidth(nbytes: int, device: torch.device, repeats: int = 5) -> float:
    """Bytes/s of reading a buffer of nbytes (what a decode step does with weights and cache)."""
    buf = torch.ones(max(nbytes // 4, 1 << 20), dtype=torch.float32, device=device)
    t = timed(lambda: buf.sum(), device, repeats)
    return buf.numel() * 4 / t["min"]


@torch.no_grad()
def matvec_bandwidth(model: NanoDeepSeek, device: torch.device, repeats: int = 5) -> float:
    """Bytes/s at which one row times each weight matrix reads it, through the model's own projections.

    Every nn.Linear weight and every routed expert (embedding excluded): a read rate, not a
    decode step (which skips unchosen experts and, absorbed, `wkv_b`), but the rate that
    bounds decoding at batch 1 on a CPU, next to the plain read bandwidth.
    """
    projections = [(m, m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    projections += [(lambda x, w=w[e], m=m: m.linear(x, w), w[e]) for m in model.modules()
                    if isinstance(m, RoutedExperts) for w in (m.w_in, m.w_out) for e in range(w.size(0))]
    dtype = model.lm_head.weight.dtype
    rows = {n: torch.ones(1, n, device=device, dtype=dtype) for n in {w.size(1) for _, w in projections}}

    def read_all() -> None:
        for project, w in projections:
            project(rows[w.size(1)])

    t = timed(read_all, device, repeats)
    return sum(w.numel() * w.element_size() for _, w in projections) / t["min"]


def _rate(t: dict[str, float], work: float) -> dict[str, float]:
    """Seconds -> work per second (median, and the spread as slowest-fastest)."""
    return {"median": work / t["median"], "low": work / t["max"], "high": work / t["min"]}


def _autocast(device: torch.device, dtype: torch.dtype):  # noqa: ANN202
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def bench_train(model: NanoDeepSeek, batch: int, seq: int, dtype: torch.dtype, device: torch.device,
                repeats: int) -> dict[str, float]:
    """Tokens/s of a full optimizer step (forward, backward, AdamW), parameters in float32."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused_adamw(device))  # as nanods train
    idx = torch.randint(0, model.config.vocab_size, (batch, seq + 1), device=device)

    def step() -> None:
        with _autocast(device, dtype):
            loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _rate(timed(step, device, repeats), batch * seq)


@torch.inference_mode()  # as nanods.generate runs the model
def bench_prefill(model: NanoDeepSeek, seq: int, dtype: torch.dtype, device: torch.device, repeats: int) -> dict:
    idx = torch.randint(0, model.config.vocab_size, (1, seq), device=device)

    def prefill() -> None:
        with _autocast(device, dtype):
            model(idx, cache=model.init_cache(1, seq))

    return _rate(timed(prefill, device, repeats), seq)


@torch.inference_mode()
def bench_decode(model: NanoDeepSeek, batch: int, prompt: int, new: int, device: torch.device,
                 repeats: int, step: Callable[..., torch.Tensor] | None = None) -> dict[str, float]:
    """Greedy decode tokens/s (all rows) after a prompt, on the cache, in the model's dtype.

    `step` replaces the model for the decode steps (e.g. `compiled_decode_step(model)`); the first
    of the repeats is a warm-up and not counted.
    """
    idx = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)
    step = step or model

    def decode() -> None:
        cache = model.init_cache(batch, prompt + new)
        token = model(idx, cache=cache)[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for i in range(new):
            token = step(token, cache=cache, start_pos=prompt + i)[:, -1].argmax(-1, keepdim=True)
        sync(device)
        decode.seconds = time.perf_counter() - start  # exclude the prefill

    seconds = []
    for _ in range(repeats + 1):
        decode()
        seconds.append(decode.seconds)
    return _rate({"median": statistics.median(seconds[1:]), "min": min(seconds[1:]), "max": max(seconds[1:])},
                 batch * new)


def decode_bytes_per_token(model: NanoDeepSeek, batch: int, context: int, dtype: torch.dtype) -> float:
    """Bytes one decode step must read, per generated token: weights (experts hit) + lm_head + KV cache."""
    cfg = model.config
    params = count_parameters(model)["groups"]
    itemsize = dtype.itemsize
    dense = sum(g["total"] for name, g in params.items() if name not in ("embedding", "routed experts"))
    experts = params.get("routed experts", {"total": 0})["total"]
    hit = cfg.num_experts * (1 - (1 - cfg.top_k / cfg.num_experts) ** batch) if experts else 0  # expected union
    expert_bytes = experts * hit / cfg.num_experts if experts else 0
    embed_rows = batch * cfg.n_embd
    kv = model.kv_cache_bytes_per_token(dtype) * context * batch
    return ((dense + expert_bytes + embed_rows) * itemsize + kv) / batch


def bench_moe_vs_dense(config: NanoDeepSeekConfig, batch: int, seq: int, dtype: torch.dtype, device: torch.device,
                       repeats: int) -> dict[str, Any]:
    """fwd+bwd seconds of one MoE layer vs a dense FFN with the same active parameters, run alternately
    (one of each per repeat, so that the machine's drift hits both alike), and the ratio of the medians."""
    moe = MoE(config, 0).to(device)
    active_hidden = (config.top_k + config.n_shared_experts) * config.moe_hidden
    dense = MLP(config.n_embd, active_hidden, config.activation).to(device)
    x = torch.randn(batch, seq, config.n_embd, device=device, requires_grad=True)

    def run(module: torch.nn.Module) -> Callable[[], None]:
        def step() -> None:
            with _autocast(device, dtype):
                out = module(x)
            (out[0] if isinstance(out, tuple) else out).float().square().mean().backward()
        return step

    steps = {"moe": run(moe), "dense": run(dense)}
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    rounds = max(repeats, 3)
    for i in range(rounds + 1):  # the first round warms up
        for name, step in steps.items():
            t = timed(step, device, 1, warmup=0)["median"]
            if i:
                seconds[name].append(t)
    t_moe, t_dense = statistics.median(seconds["moe"]), statistics.median(seconds["dense"])
    with _autocast(device, dtype):  # the kernel `auto` picks for these inputs
        kernel = pick_kernel(moe.experts.kernel, x)
    return {"moe_s": t_moe, "dense_s": t_dense, "ratio": t_moe / t_dense, "rounds": rounds, "kernel": kernel}


def run(config: NanoDeepSeekConfig, device: torch.device, dtype: torch.dtype, repeats: int = 5,
        train_batch: int = 8, train_seq: int = 256, prefill_seq: int = 512, new_tokens: int = 64,
        short_prompt: int = 64, long_context: int = 1024, compile: bool = False, fast: bool = True,
        progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """All measurements for one config; decode runs in `dtype` (weights cast), training under autocast.

    fast=False measures the plain model, without `nanods.fast_paths`.
    compile=True adds batch-1 decode rows through `compiled_decode_step` (path "compiled"). Decode
    rows take min(repeats, 3) runs each; a model whose context holds no longer prompt than the short
    rows' gets no long-context row.
    """
    limit = config.sequence_len  # every length fits the model's context
    if limit < 2:
        raise NanodsError(f"bench decodes after a prompt: model.sequence_len must be at least 2, got {limit}")
    train_seq, prefill_seq, long_context = min(train_seq, limit), min(prefill_seq, limit), min(long_context, limit)
    new_tokens = min(new_tokens, long_context // 2)
    decode_runs = min(repeats, 3)
    out: dict[str, Any] = {"device": str(device), "dtype": str(dtype).removeprefix("torch."),
                           "threads": torch.get_num_threads(), "repeats": repeats, "decode_runs": decode_runs,
                           "fast_paths": fast,
                           "model": {"attention": config.attention, "ffn": config.ffn, "router": config.router}}
    progress("matmul peak")
    out["peak_flops"] = {name: matmul_peak(device, dt, seconds=1.0)
                         for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    torch.manual_seed(0)
    model = NanoDeepSeek(config).to(device)
    with fast_paths.enabled(model, on=fast):
        params = count_parameters(model)
        out["params_total"], out["params_active"] = params["total"], params["active"]
        out["kv_cache_bytes_per_token"] = model.kv_cache_bytes_per_token(dtype)
        progress("train step")
        train = bench_train(model, train_batch, train_seq, dtype, device, repeats)
        flops = 3 * flops_per_token(model, train_seq)
        peak = out["peak_flops"]["bfloat16" if dtype == torch.bfloat16 else "float32"]
        out["train"] = {"batch": train_batch, "seq": train_seq, "tokens_per_s": train,
                        "mfu": train["median"] * flops / peak}
        model.eval().to(dtype)
        progress("prefill")
        out["prefill"] = {"seq": prefill_seq, "tokens_per_s": bench_prefill(model, prefill_seq, dtype, device, repeats)}
        bandwidth = read_bandwidth(int(sum(p.numel() for p in model.parameters()) * dtype.itemsize), device)
        out["read_bandwidth_bytes_per_s"] = bandwidth
        out["matvec_bandwidth_bytes_per_s"] = matvec_bandwidth(model, device)
        decode = []
        paths = ["absorbed", "naive"] if config.use_mla else ["cache"]
        short = min(short_prompt, long_context - new_tokens)
        compiled = compiled_decode_step(model) if compile else None  # compiles on its first call, in the warm-up
        prompts = [(1, short), (8, short)] + ([(1, long_context - new_tokens)] if long_context - new_tokens > short else [])
        for batch, prompt in prompts:
            for path in paths + (["compiled"] if compile and batch == 1 else []):
                progress(f"decode batch {batch}, context {prompt + new_tokens}, {path}")
                for block in model.blocks:
                    if config.use_mla:
                        block.attn.absorb = "never" if path == "naive" else "auto"
                rate = bench_decode(model, batch, prompt, new_tokens, device, decode_runs,
                                    compiled if path == "compiled" else None)
                roofline = bandwidth / decode_bytes_per_token(model, batch, prompt + new_tokens // 2, dtype)
                decode.append({"batch": batch, "context": prompt + new_tokens, "path": path, "tokens_per_s": rate,
                               "roofline_tokens_per_s": roofline, "roofline_fraction": rate["median"] / roofline})
        for block in model.blocks:
            if config.use_mla:
                block.attn.absorb = "auto"
        out["decode"] = decode
    if config.use_moe:
        progress("MoE vs dense FFN")
        out["moe_vs_dense"] = bench_moe_vs_dense(config, train_batch, train_seq, dtype, device, repeats)
    return out


def bench_speculative(model: NanoDeepSeek, prompt: list[int], new: int, device: torch.device, repeats: int,
                      compile: bool = False) -> dict[str, Any]:
    """Greedy tokens/s of plain and of speculative decoding (`new` tokens after prompt, one sequence),
    eager and, with compile=True, compiled too; run alternately so that the machine's drift hits
    all alike; the first round warms up (and compiles).

    Meant for a trained model with MTP: the speed-up follows from how often its drafts pass.
    """
    idx = torch.tensor([prompt], device=device)
    modes = [False, True] if compile else [False]
    runs = [(speculative, compiled) for compiled in modes for speculative in (False, True)]
    seconds: dict[tuple[bool, bool], list[float]] = {run: [] for run in runs}
    outputs, stats = {}, {}
    for i in range(repeats + 1):
        for speculative, compiled in runs:
            stats[speculative, compiled] = SpeculationStats()
            start = time.perf_counter()
            outputs[speculative, compiled] = torch.stack(list(stream(
                model, idx, new, temperature=0, compile=compiled, speculative=speculative,
                stats=stats[speculative, compiled])))
            sync(device)
            if i:
                seconds[speculative, compiled].append(time.perf_counter() - start)
    rows = []
    for compiled in modes:
        plain, spec = (_rate({"median": statistics.median(t), "min": min(t), "max": max(t)}, new)
                       for t in (seconds[False, compiled], seconds[True, compiled]))
        s = stats[True, compiled]
        rows.append({"path": "compiled" if compiled else "eager", "plain": plain, "speculative": spec,
                     "speedup": spec["median"] / plain["median"], "acceptance": s.acceptance(),
                     "tokens_per_step": s.tokens / max(s.rounds, 1),
                     "identical": torch.equal(outputs[False, compiled], outputs[True, compiled])})
    return {"new_tokens": new, "rows": rows}


LONG_CONTEXTS = (1024, 2048, 4096, 8192, 16384)
DECODE_STEPS = 10  # decode steps timed per round of bench_long_context


@torch.inference_mode()
def bench_long_context(config: NanoDeepSeekConfig, device: torch.device, dtype: torch.dtype, repeats: int,
                       contexts: tuple[int, ...] = LONG_CONTEXTS, topk: int = 512, compile: bool = False,
                       prefill: bool = True, progress: Callable[[str], None] = lambda _: None
                       ) -> list[dict[str, Any]]:
    """Seconds per attention layer of `mla` and `dsa` (index_topk = topk) at each context length, one
    sequence: a prefill of the whole context (unless not prefill), and a decode step after context - 1
    cached positions (the median of DECODE_STEPS steps per round); with compile, also compiled.

    The two layers have the same MLA weights (dsa adds its indexer) and run alternately on the same
    inputs; the cache is filled with random rows, as only its size matters for the time.
    """
    sized = NanoDeepSeekConfig(**{**config.to_dict(), "sequence_len": max(*contexts, config.sequence_len),
                                  "index_topk": topk, "q_lora_rank": config.q_lora_rank or config.kv_lora_rank})
    torch.manual_seed(0)
    layers = {name: registry.build("attention", name, NanoDeepSeekConfig(**{**sized.to_dict(), "attention": name}),
                                   0).to(device, dtype).eval() for name in ("mla", "dsa")}
    layers["dsa"].load_state_dict(layers["mla"].state_dict(), strict=False)
    stages = ({"prefill": False} if prefill else {}) | {"decode": False} | ({"decode_compiled": True} if compile else {})
    steps = {name: {False: layer, True: compiling.compiled(layer, f"the {name} layer")} for name, layer in layers.items()}
    rows = []
    for context in contexts:
        x = torch.randn(1, context, config.n_embd, device=device, dtype=dtype)
        pos = torch.arange(context, device=device)[None]
        caches = {name: layer.init_cache(1, context, device, dtype) for name, layer in layers.items()}
        for cache in caches.values():
            for buf in cache.buffers.values():
                buf.normal_()
        seconds: dict[str, dict[str, list[float]]] = {name: {stage: [] for stage in stages} for name in layers}
        for i in range(repeats + 1):  # the first round warms up (and compiles)
            for name in layers:
                progress(f"long context {context}, {name}")
                cache = caches[name]
                for stage, compiled_step in stages.items():
                    def timed(step=steps[name][compiled_step], cache=cache, prefill=stage == "prefill") -> None:
                        if prefill:
                            step(x, pos)
                        else:  # the new token after context - 1 cached ones
                            cache.length = context - 1
                            step(x[:, -1:], pos[:, -1:], cache)

                    times = [_seconds(timed, device) for _ in range(1 if stage == "prefill" else DECODE_STEPS)]
                    seconds[name][stage] += times if i else []
        row: dict[str, Any] = {"context": context, "index_topk": topk}
        for name in layers:
            for stage in stages:
                row[f"{name}_{stage}_s"] = statistics.median(seconds[name][stage])
        rows.append(row)
    return rows


def crossover(rows: list[dict[str, Any]], stage: str) -> int | None:
    """The shortest context of `bench_long_context`'s rows from which dsa's `stage` is faster than mla's
    at every longer context measured (None: at no context)."""
    first = None
    for row in rows:
        faster = row[f"dsa_{stage}_s"] < row[f"mla_{stage}_s"]
        first = (first or row["context"]) if faster else None
    return first


def long_context_cells(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """Table rows (measure, value, note) for `bench_long_context`'s rows: each stage per context, then
    each stage's crossover."""
    stages = [s for s in ("prefill", "decode", "decode_compiled") if rows and f"mla_{s}_s" in rows[0]]
    cells = []
    for row in rows:
        for stage in stages:
            mla, dsa = row[f"mla_{stage}_s"], row[f"dsa_{stage}_s"]
            cells.append((f"attention layer, context {row['context']:,}: {stage.replace('_', ' ')} mla / dsa",
                          f"{mla * 1e3:,.2f} / {dsa * 1e3:,.2f} ms",
                          f"dsa {_times(mla / dsa)} (index_topk {row['index_topk']})"))
    for stage in stages:
        at = crossover(rows, stage)
        cells.append((f"attention layer: {stage.replace('_', ' ')} crossover", f"{at:,}" if at else "none",
                      "the context from which dsa is faster (of those measured)"))
    return cells


def _times(ratio: float) -> str:
    """'1.39x faster' or '2.0x slower' for a time ratio (other / this)."""
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower"


def _seconds(run: Callable[[], object], device: torch.device) -> float:
    start = time.perf_counter()
    run()
    sync(device)
    return time.perf_counter() - start


def _spread(rate: dict[str, float]) -> str:
    return f"{rate['median']:,.0f} ({rate['low']:,.0f}-{rate['high']:,.0f})"


def print_result(r: dict[str, Any], console: Console) -> None:
    """The tables `nanods bench` prints for a result of `run`."""
    cfg = r["model"]
    table = Table(title=f"nanods bench: {escape(r['scale'])} ({escape(cfg['attention'])} x {escape(cfg['ffn'])}), "
                        f"{r['dtype']} on {r['device']} "
                        f"({r['threads']} threads); medians (min-max) of {r['repeats']} runs, decode {r['decode_runs']}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("note")
    peaks = r["peak_flops"]
    table.add_row("matmul peak fp32 / bf16", f"{peaks['float32'] / 1e9:,.0f} / {peaks['bfloat16'] / 1e9:,.0f} GFLOP/s",
                  "x @ W^T, 1024^2")
    table.add_row("read bandwidth", f"{r['read_bandwidth_bytes_per_s'] / 1e9:,.1f} GB/s",
                  "sum over a weight-sized buffer, fastest of 5")
    table.add_row("batch-1 matmul read rate", f"{r['matvec_bandwidth_bytes_per_s'] / 1e9:,.1f} GB/s",
                  "one row x every weight matrix (what bounds batch-1 decode), fastest of 5")
    t = r["train"]
    table.add_row(f"train step {t['batch']}x{t['seq']} tok/s", _spread(t["tokens_per_s"]),
                  f"MFU {100 * t['mfu']:.0f}% (optimizer included)")
    table.add_row(f"prefill 1x{r['prefill']['seq']} tok/s", _spread(r["prefill"]["tokens_per_s"]), "")
    for d in r["decode"]:
        table.add_row(f"decode b{d['batch']} ctx {d['context']} {d['path']} tok/s", _spread(d["tokens_per_s"]),
                      f"{100 * d['roofline_fraction']:.1f}% of roofline {d['roofline_tokens_per_s']:,.0f}")
    if "speculative" in r:
        n = r["speculative"]["new_tokens"]
        for sp in r["speculative"]["rows"]:
            rates = ", ".join(f"{100 * a:.0f}%" for a in sp["acceptance"])
            table.add_row(f"greedy b1, {n} new, {sp['path']}: plain tok/s", _spread(sp["plain"]), "trained weights")
            table.add_row(f"greedy b1, {n} new, {sp['path']}: speculative tok/s", _spread(sp["speculative"]),
                          f"{sp['speedup']:.2f}x; drafts accepted {rates} (per depth), {sp['tokens_per_step']:.2f} "
                          f"tokens per main step; {'same' if sp['identical'] else '[bold red]different[/]'} tokens")
    for cells in long_context_cells(r.get("long_context", [])):
        table.add_row(*cells)
    if "moe_vs_dense" in r:
        m = r["moe_vs_dense"]
        table.add_row("MoE FFN fwd+bwd / active-dense twin", f"{m['ratio']:.2f}x",
                      f"{m['moe_s'] * 1e3:.1f} ms vs {m['dense_s'] * 1e3:.1f} ms, median of {m['rounds']} "
                      f"alternating rounds, kernel {m['kernel']}")
    table.add_row("KV cache per token", format_bytes(r["kv_cache_bytes_per_token"]), "all layers")
    table.add_row("parameters total / active", f"{r['params_total']:,} / {r['params_active']:,}", "")
    console.print(table)
