"""MHA/MLA x dense/MoE at `small` size and (nearly) equal active parameters, same wall-clock budget.

    python benchmarks/ablation.py [--budget 3m] [--out runs/ablation] [--json]

Each variant is trained by `nanods train` on the stdlib corpus with the same time budget, tokenizer,
batch and schedule; the table reports val bits/byte, tokens/s, active/total parameters and KV-cache
bytes per token, and ablation.png plots the validation curves against wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from nanods.atomic import atomic_write
from nanods.project import parse_duration
from nanods.errors import NanodsError

VARIANTS = [("mha", "dense"), ("mha", "moe"), ("mla", "dense"), ("mla", "moe")]
RUN_FILE = re.compile(r"ckpt\.safetensors|metrics\.jsonl|loss\.png|train_state_\d+\.safetensors")


def run_variant(attention: str, ffn: str, budget: str, out: Path) -> dict:
    """Train one variant into out/<attention>-<ffn>; its previous run there waits aside until this one has finished."""
    run_dir = out / f"{attention}-{ffn}"
    previous = out / f".{run_dir.name}.previous"
    restore(run_dir, previous)  # left aside by an ablation that was killed
    if run_dir.exists():
        run_dir.rename(previous)
    cmd = [sys.executable, "-m", "nanods", "train", "--scale", "small", "--attention", attention, "--ffn", ffn,
           "--time-budget", budget, "--out", str(run_dir), "--set", "train.sample_tokens=0",
           "--set", "train.eval_every=25"]
    try:
        code = subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode
        if code:  # nanods train printed its one-line error
            raise SystemExit(f"ablation stopped: training {run_dir.name} failed (nanods train exited with {code})")
        result = read_run(attention, ffn, run_dir)
    except BaseException:
        restore(run_dir, previous)
        raise
    shutil.rmtree(previous, ignore_errors=True)
    return result


def restore(run_dir: Path, previous: Path) -> None:
    """Put a previous run set aside back in place of an unfinished one (nothing to do without one)."""
    if previous.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        previous.rename(run_dir)


def foreign_files(out: Path) -> list[Path]:
    """Files in the variants' folders under out that no nanods run writes (a replaced run takes its folder along)."""
    found = []
    for attention, ffn in VARIANTS:
        folder = out / f"{attention}-{ffn}"
        if folder.is_dir():
            found += [p for p in sorted(folder.iterdir()) if not RUN_FILE.fullmatch(p.name)]
        elif folder.exists():
            found.append(folder)
    return found


def read_run(attention: str, ffn: str, run_dir: Path) -> dict:
    """The table's figures and the validation curve of a finished run."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tok_per_s" in r]
    evals = [r for r in rows if "val_bpb" in r]
    if not evals:  # nanods train stops early, without an error, when it alone gets a Ctrl-C or SIGTERM
        raise SystemExit(f"ablation stopped: {run_dir.name} ended before its first evaluation")
    time_at = {r["step"]: r["time"] for r in steps}
    info = json.loads(subprocess.run([sys.executable, "-m", "nanods", "inspect", str(run_dir / "ckpt.safetensors"),
                                      "--json"], check=True, capture_output=True, text=True).stdout)
    return {"attention": attention, "ffn": ffn, "val_bpb": evals[-1]["val_bpb"], "val_loss": evals[-1]["val_loss"],
            "steps": steps[-1]["step"], "tokens_per_s": sorted(r["tok_per_s"] for r in steps)[len(steps) // 2],
            "params_active": info["params_active"], "params_total": info["params_total"],
            "kv_cache_bytes_per_token": info["kv_cache_bytes_per_token"],
            "curve": [(time_at[r["step"]], r["val_bpb"]) for r in evals]}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for r in results:
        ax.plot(*zip(*r["curve"]), "o-", label=f"{r['attention']} + {r['ffn']}")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("val bits per byte")
    ax.set_title("nanods ablation at small size, equal wall clock")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


def duration(text: str) -> str:
    """argparse type: a positive duration that `nanods train --time-budget` accepts."""
    try:
        parse_duration(text)
    except NanodsError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="3m", type=duration,
                        help="training time per variant, e.g. 90s (default 3m; the table in docs/measurements.md: 8m, the budget of "
                             "nanods train --scale small)")
    parser.add_argument("--out", default="runs/ablation", type=Path,
                        help="folder for the four runs and ablation.png (default runs/ablation); a variant's earlier "
                             "run there is replaced only once its new run has finished")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args()
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a folder")
    if foreign := foreign_files(args.out):
        parser.error(f"{', '.join(map(str, foreign[:3]))}: not part of a nanods run, so replacing that variant's "
                     "run would delete it; move it or pick another --out")
    args.out.mkdir(parents=True, exist_ok=True)
    results = [run_variant(a, f, args.budget, args.out) for a, f in VARIANTS]
    plot(results, args.out / "ablation.png")
    if args.json:
        print(json.dumps(results, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ablation: small, {args.budget} each (plot: {args.out / 'ablation.png'})")
    for col in ("variant", "val bits/byte", "steps", "tokens/s", "active / total params", "KV cache B/token"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in sorted(results, key=lambda r: r["val_bpb"]):
        table.add_row(f"{r['attention']} + {r['ffn']}", f"{r['val_bpb']:.4f}", str(r["steps"]),
                      f"{r['tokens_per_s']:,.0f}", f"{r['params_active']:,} / {r['params_total']:,}",
                      f"{r['kv_cache_bytes_per_token']:,}")
    Console().print(table)


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, interrupt)
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted: a variant still training was discarded, and its previous run (if any) put back",
              file=sys.stderr)
        sys.exit(130)
