"""nanods beside transformers' DeepseekV3ForCausalLM, configured identically, measured in one run.

    pip install -e ".[bench]"
    python benchmarks/compare_hf.py [--repeats 3] [--json]

Both sides get the same dimensions, routing and batches; the measurements alternate between the
two so machine noise hits both alike. Reported: tokens/s per side and the nanods/transformers
ratio for a training step, prefill and greedy decode, all float32, and each side's peak training
memory (measured in a fresh subprocess: peak RSS minus RSS right after `import torch`; Linux).
On a CPU with native bf16 matmul, one more row trains nanods in its default dtype there (bf16
autocast) beside transformers' float32 step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from nanods.device import resolve_dtype

SHAPE = dict(layers=6, width=384, heads=4, kv_lora=192, q_lora=192, rope=32, nope=64, v=64, experts=4, top_k=2,
             shared=1, moe_hidden=768, vocab=4096, context=2048)
MEMORY = "train peak memory"
BF16_TRAIN = "train 8x256, nanods bf16 autocast"  # vs transformers float32: nanods' default dtype where bf16 is native


def build(side: str) -> torch.nn.Module:
    s = SHAPE
    torch.manual_seed(0)
    if side == "nanods":
        from nanods import NanoDeepSeek, NanoDeepSeekConfig

        return NanoDeepSeek(NanoDeepSeekConfig(
            n_layer=s["layers"], n_embd=s["width"], n_head=s["heads"], n_kv_head=s["heads"], vocab_size=s["vocab"],
            sequence_len=s["context"], kv_lora_rank=s["kv_lora"], q_lora_rank=s["q_lora"], qk_rope_head_dim=s["rope"],
            qk_nope_head_dim=s["nope"], v_head_dim=s["v"], num_experts=s["experts"], top_k=s["top_k"],
            n_shared_experts=s["shared"], moe_hidden=s["moe_hidden"], activation="swiglu", norm_weights=True,
            route_norm=True, route_scale=1.0, attention="mla", ffn="moe", router="sigmoid"))
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        vocab_size=s["vocab"], hidden_size=s["width"], intermediate_size=s["moe_hidden"] * (s["top_k"] + s["shared"]),
        moe_intermediate_size=s["moe_hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"], n_shared_experts=s["shared"], n_routed_experts=s["experts"],
        routed_scaling_factor=1.0, kv_lora_rank=s["kv_lora"], q_lora_rank=s["q_lora"], qk_rope_head_dim=s["rope"],
        v_head_dim=s["v"], qk_nope_head_dim=s["nope"], n_group=1, topk_group=1, num_experts_per_tok=s["top_k"],
        first_k_dense_replace=0, norm_topk_prob=True, max_position_embeddings=s["context"], tie_word_embeddings=False)
    return DeepseekV3ForCausalLM(config)


def loss_of(side: str, model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy on idx (B, T + 1), computed the same way on both sides."""
    if side == "nanods":
        return model(idx[:, :-1], idx[:, 1:])
    logits = model(input_ids=idx[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), idx[:, 1:].flatten())


def train_step(side: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, idx: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> float:
    """Seconds of one optimizer step; dtype other than float32: forward under autocast (parameters stay float32)."""
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = loss_of(side, model, idx)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


@torch.no_grad()
def prefill(side: str, model: torch.nn.Module, idx: torch.Tensor) -> float:
    start = time.perf_counter()
    if side == "nanods":
        model(idx, cache=model.init_cache(idx.size(0), idx.size(1)))
    else:
        model(input_ids=idx, use_cache=True)
    return time.perf_counter() - start


@torch.no_grad()
def decode(side: str, model: torch.nn.Module, idx: torch.Tensor, new: int, compile: bool = False) -> float:
    """Seconds for `new` greedy tokens after the prompt (prefill included on both sides)."""
    start = time.perf_counter()
    if side == "nanods":
        out = model.generate(idx, new, temperature=0, compile=compile and idx.size(0) == 1)
    else:
        out = model.generate(input_ids=idx, attention_mask=torch.ones_like(idx), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0)
    assert out.shape[1] == idx.shape[1] + new
    return time.perf_counter() - start


def _status_bytes(field: str) -> int:
    """VmHWM (peak) or VmRSS (now) of this process. Not ru_maxrss: Linux keeps that across the
    exec of a subprocess, so a child would inherit its large parent's peak."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def measure_memory(side: str) -> int:
    """Peak RSS growth (bytes) of two training steps, run in this fresh process."""
    baseline = _status_bytes("VmRSS")
    model = build(side).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(0, SHAPE["vocab"], (8, 257))
    for _ in range(2):
        train_step(side, model, optimizer, idx)
    return _status_bytes("VmHWM") - baseline


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def measure(name: str, side: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, idx: torch.Tensor,
            new: int, compile: bool) -> float:
    """Seconds of one run of the measure `name` on one side."""
    if name.startswith("train"):
        model.train()
        dtype = torch.bfloat16 if name == BF16_TRAIN and side == "nanods" else torch.float32
        return train_step(side, model, optimizer, idx, dtype)
    model.eval()
    if name.startswith("prefill"):
        return prefill(side, model, idx)
    return decode(side, model, idx, new, compile)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive, default=3, help="timed runs per measure and side (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--compile", action="store_true",
                        help="nanods decodes batch 1 through its torch.compile'd step (compiled once, before timing)")
    parser.add_argument("--only", metavar="TEXT", help="run only the measures whose name contains TEXT (e.g. decode)")
    parser.add_argument("--memory-of", choices=["nanods", "transformers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        print(measure_memory(args.memory_of))
        return
    g = torch.Generator().manual_seed(0)
    train_batch = torch.randint(0, SHAPE["vocab"], (8, 257), generator=g)
    all_batches = {
        "train 8x256": (train_batch, 8 * 256),
        "prefill 1x512": (torch.randint(0, SHAPE["vocab"], (1, 512), generator=g), 512),
        "decode b1 64+256": (torch.randint(0, SHAPE["vocab"], (1, 64), generator=g), 256),
        "decode b8 64+256": (torch.randint(0, SHAPE["vocab"], (8, 64), generator=g), 8 * 256),
        "decode b1 960+64 (ctx 1024)": (torch.randint(0, SHAPE["vocab"], (1, 960), generator=g), 64),
    }
    if resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16:  # nanods' default dtype here: its own row
        all_batches[BF16_TRAIN] = (train_batch, 8 * 256)
    batches = {name: batch for name, batch in all_batches.items() if args.only is None or args.only in name}
    with_memory = args.only is None or args.only in MEMORY
    if not batches and not with_memory:
        parser.error(f"--only {args.only!r} matches none of: {', '.join(map(repr, [*all_batches, MEMORY]))}")
    try:
        from transformers import DeepseekV3ForCausalLM  # noqa: F401
    except ImportError:
        sys.exit('compare_hf.py needs transformers with DeepseekV3 (>= 5.24): pip install -e ".[bench]"')
    sides = ("transformers", "nanods")
    models = {side: build(side) for side in sides}
    params = {side: sum(p.numel() for p in m.parameters()) for side, m in models.items()}
    optimizers = {side: torch.optim.AdamW(m.parameters(), lr=1e-4) for side, m in models.items()}
    times: dict[str, dict[str, list[float]]] = {name: {s: [] for s in sides} for name in batches}
    compile_s = None
    if args.compile and any(name.startswith("decode b1") for name in batches):  # compile outside the timed runs
        start = time.perf_counter()
        decode("nanods", models["nanods"].eval(), all_batches["decode b1 64+256"][0], 2, compile=True)
        compile_s = time.perf_counter() - start
    for name, (idx, _) in batches.items():  # warm up each measured path once on each side (2 decoded tokens)
        for side in sides:
            measure(name, side, models[side], optimizers[side], idx, 2, args.compile)
    for _ in range(args.repeats):
        for name, (idx, _) in batches.items():
            for side in sides:  # alternate: noise hits both sides alike
                new = 256 if "256" in name else 64
                times[name][side].append(measure(name, side, models[side], optimizers[side], idx, new, args.compile))
    rows = []
    for name, (_, work) in batches.items():
        rate = {s: work / statistics.median(times[name][s]) for s in sides}
        rows.append({"measure": name, "transformers_tok_s": rate["transformers"], "nanods_tok_s": rate["nanods"],
                     "ratio": rate["nanods"] / rate["transformers"]})
    memory = {}
    for side in sides if with_memory else ():
        proc = subprocess.run([sys.executable, __file__, "--memory-of", side], capture_output=True, text=True, check=True)
        memory[side] = int(proc.stdout.strip().splitlines()[-1])
    result = {"shape": SHAPE, "params": params, "repeats": args.repeats, "threads": torch.get_num_threads(),
              "nanods_compiled_decode": compile_s is not None, "compile_s": compile_s,
              "rows": rows, "train_peak_memory_bytes": memory}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    compiled = f", nanods batch-1 decode compiled ({compile_s:.0f} s, not timed)" if compile_s else ""
    bf16 = " (but nanods' bf16 row)" if BF16_TRAIN in batches else ""
    table = Table(title=f"nanods vs transformers DeepseekV3, float32{bf16}, {torch.get_num_threads()} threads, "
                        f"medians of {args.repeats} alternating runs{compiled}")
    for col in ("measure", "transformers tok/s", "nanods tok/s", "nanods / transformers"):
        table.add_column(col, justify="left" if col == "measure" else "right")
    for r in rows:
        table.add_row(r["measure"], f"{r['transformers_tok_s']:,.1f}", f"{r['nanods_tok_s']:,.1f}", f"{r['ratio']:.2f}x")
    if memory:
        table.add_row(MEMORY, f"{memory['transformers'] / 2**30:.2f} GiB", f"{memory['nanods'] / 2**30:.2f} GiB",
                      f"{memory['nanods'] / memory['transformers']:.2f}x")
    Console().print(table)
    Console().print(f"parameters: transformers {params['transformers']:,}, nanods {params['nanods']:,}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
