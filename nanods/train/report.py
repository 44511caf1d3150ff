"""What the user sees during training: a rich progress bar (or log lines), eval tables, metrics.jsonl, loss.png."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from nanods.atomic import atomic_write
from nanods.terminal import escape, format_bytes, format_duration


class TrainReport:
    """Progress on stderr (a bar on a terminal, periodic lines otherwise), metrics on disk."""

    def __init__(self, out_dir: Path, log_every: int, enabled: bool = True) -> None:
        self.console = Console(stderr=True)
        self.out_dir, self.log_every, self.enabled = out_dir, log_every, enabled
        self.metrics_path = out_dir / "metrics.jsonl"
        self.bar: Progress | None = None  # started by begin(), once the run is sure to start
        self.budget: float | None = None  # seconds: the bar then measures time, so its ETA is the budget's
        self._torn = self._write_failed = False  # metrics.jsonl: a line left unfinished, a failure reported
        self.layer_names: list[str] = []  # the MoE layers' names in expert-load order, e.g. L1, L2, MTP1

    @contextlib.contextmanager
    def phase(self, doing: str) -> Iterator[Callable[[str], None]]:
        """A spinner saying what runs (on a terminal); the block reports its result, shown with the duration."""
        start, result = time.perf_counter(), []
        spinner = self.console.status(doing) if self.enabled and self.console.is_terminal else contextlib.nullcontext()
        with spinner:
            yield result.append
        for line in result:
            self.print(f"{escape(line)} [dim]({format_duration(time.perf_counter() - start)})[/]")

    def _layer(self, i: int) -> str:
        """The name of the i-th MoE layer (layer_names, set by the trainer, else L{i})."""
        return self.layer_names[i] if i < len(self.layer_names) else f"L{i}"

    def print(self, *args: Any) -> None:
        if self.enabled:
            (self.bar.console if self.bar is not None else self.console).print(*args)

    def step(self, row: dict[str, Any], total: int) -> None:
        self._append(row)
        if not self.enabled:
            return
        steps = f"{row['step']}/{'~' if self.budget else ''}{total}"  # ~: a budget's total is an estimate
        if self.bar is not None:
            # with a budget the bar fills with time, or with steps when the step count ends the run first
            done = max(row["wall"], self.budget * row["step"] / total) if self.budget else row["step"]
            self.bar.update(self.task, completed=min(done, self.budget or total), total=self.budget or total, steps=steps,
                            loss=f"{row['loss']:.4f}{_extra_losses(row)}", lr=f"{row['lr']:.2e}",
                            tps=f"{row['tok_per_s']:,.0f}", mfu=f"{100 * row['mfu']:.1f}%")
        elif row["step"] % self.log_every == 0 or row["step"] in (1, total):
            self.console.print(f"step {steps}  loss {row['loss']:.4f}{_extra_losses(row)}  lr {row['lr']:.2e}  "
                               f"{row['tok_per_s']:,.0f} tok/s  MFU {100 * row['mfu']:.1f}%", highlight=False)

    def eval(self, row: dict[str, Any], expert_load: list[list[float]] | None) -> None:
        if expert_load:
            row["expert_load_max_mean"] = [round(max(s) * len(s), 4) for s in expert_load]
        self._append(row)
        if not self.enabled:
            return
        table = Table(title=f"eval at step {row['step']}", title_justify="left")
        for col in ("val loss", "val bits/byte", "train loss"):
            table.add_column(col, justify="right")
        table.add_row(f"{row['val_loss']:.4f}", f"{row['val_bpb']:.4f}", f"{row.get('train_loss', float('nan')):.4f}")
        self.print(table)
        if expert_load:
            ratios = "  ".join(f"{self._layer(i)}: {r:.2f}" for i, r in enumerate(row["expert_load_max_mean"]))
            self.print(f"expert load max/mean per layer  {ratios}")
        self.plot()

    def summary(self, row: dict[str, Any], checkpoint: str) -> None:
        """The end of a run: one line on the terminal, the same numbers as the last row of metrics.jsonl."""
        self._append(row)
        parts = [f"done: {row['step']} steps, {row['tokens']:,} tokens in {format_duration(row['wall'])} "
                 f"({row['tok_per_s']:,.0f} tok/s)"]
        if row["val_loss"] is not None:
            parts.append(f"val loss {row['val_loss']:.4f}, {row['val_bpb']:.4f} bits/byte")
        if row["peak_memory_bytes"]:
            parts.append(f"peak memory {format_bytes(row['peak_memory_bytes'])}")
        self.print(escape("; ".join(parts) + f"; checkpoint {checkpoint}"))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def begin(self, step: int, total: int, budget: float | None = None) -> None:
        """Start the bar and the log at `step`: a fresh run empties the log, a resumed one drops the rows
        past its checkpoint (they are redone now). With a time budget (seconds) the bar fills with time."""
        self.budget = budget
        if self.enabled and self.console.is_terminal:
            self.bar = Progress(
                TextColumn("[bold]train"), BarColumn(), TextColumn("{task.fields[steps]}"),
                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s  "
                           "MFU {task.fields[mfu]}"),
                TimeRemainingColumn(), console=self.console, transient=False)
            self.task = self.bar.add_task("train", total=budget or total, completed=0 if budget else step,
                                          steps=f"{step}/{'~' if budget else ''}{total}", loss="-", lr="-",
                                          tps="-", mfu="-")
            self.bar.start()
        if not self.enabled or not self.metrics_path.exists():
            return
        rows = [r for r in self.rows() if r["step"] <= step and not r.get("summary")]  # a new run, a new summary
        atomic_write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows).encode())

    def rows(self, warn: bool = True) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl; a line a failed write left torn (or any unreadable line) is dropped
        with a warning, so a damaged log never blocks a run."""
        rows, bad = [], []
        with self.metrics_path.open("rb") as f:
            for n, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                except ValueError:  # also UnicodeDecodeError
                    row = None
                if isinstance(row, dict) and isinstance(row.get("step"), int):
                    rows.append(row)
                elif line.strip():
                    bad.append(n)
        if bad and warn:
            self.print(f"[yellow]warning:[/] dropped {len(bad)} damaged line(s) of {escape(self.metrics_path)} "
                       f"(line {', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''})")
        return rows

    def _append(self, row: dict[str, Any]) -> None:
        """One line, one write() on an O_APPEND file: a failure can only tear the last line. The log is a
        record, not the run: a full disk warns (once) and training goes on to its next save."""
        if not self.enabled:
            return
        line = (("\n" if self._torn else "") + json.dumps(row) + "\n").encode()  # first end a line a short write tore
        written = 0
        try:
            fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                written = os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as e:
            error = e.strerror or str(e)
        else:
            error = None if written == len(line) else "a short write"
        self._torn = 0 < written < len(line)
        if error and not self._write_failed:
            self.print(f"[yellow]warning:[/] could not append to {escape(self.metrics_path)} ({escape(error)}); "
                       "training goes on")
        self._write_failed = self._write_failed or bool(error)

    def plot(self) -> None:
        """loss.png: training loss and validation loss against step."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rows(warn=False)  # begin() already warned about (and dropped) damaged lines
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        load = [(r["step"], r["expert_load_max_mean"]) for r in rows if r.get("expert_load_max_mean")]
        fig, axes = plt.subplots(2 if load else 1, 1, figsize=(8, 7.5 if load else 4.5), dpi=100, sharex=True,
                                 squeeze=False, height_ratios=[3, 2] if load else None)
        ax = axes[0, 0]
        if train:
            steps, values = zip(*train)
            ax.plot(steps, values, color="#4C72B0", alpha=0.3, linewidth=1)
            ax.plot(steps, _ema(values), label="train loss (EMA 0.9)", color="#4C72B0", linewidth=1.5)
        mtp = [(r["step"], r["mtp"]) for r in rows if r.get("mtp")]
        if mtp:  # each MTP depth's own loss: it predicts further ahead, so it sits above the main loss
            steps, per_depth = zip(*mtp)
            for depth, values in enumerate(zip(*per_depth), start=1):
                ax.plot(steps, _ema(values), "--", linewidth=1.2, label=f"MTP depth {depth} loss (EMA 0.9)")
        if val:
            ax.plot(*zip(*val), "o-", label="val loss", color="#DD8452")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(f"nanods: {self.out_dir}".replace("$", r"\$"))  # a $ would start matplotlib's math mode
        ax.grid(alpha=0.3)
        ax.legend()
        if load:  # the MoE balance: 1.0 is perfectly even, E means one expert takes every token
            steps, ratios = zip(*load)
            for layer, series in enumerate(zip(*ratios)):
                axes[1, 0].plot(steps, series, "o-", markersize=3, label=self._layer(layer))
            axes[1, 0].axhline(1.0, color="grey", linewidth=0.8)
            axes[1, 0].set_ylabel("expert load max/mean")
            axes[1, 0].grid(alpha=0.3)
            axes[1, 0].legend(fontsize="small", ncol=4)
        axes[-1, 0].set_xlabel("optimizer step")
        fig.tight_layout()
        try:
            atomic_write(self.out_dir / "loss.png", lambda f: fig.savefig(f, format="png"))
        except OSError as e:  # the plot is a view of metrics.jsonl: a full disk must not stop training here
            self.print(f"[yellow]warning:[/] could not write {escape(self.out_dir / 'loss.png')} ({e.strerror or e})")
        finally:
            plt.close(fig)


def _ema(values: tuple[float, ...]) -> list[float]:
    """An exponential moving average (0.9): it shows the trend through batch noise."""
    smooth, ema = [], values[0]
    for v in values:
        ema = 0.9 * ema + 0.1 * v
        smooth.append(ema)
    return smooth


def _extra_losses(row: dict[str, Any]) -> str:
    """What follows the main loss: the MTP depths' losses and DSA's indexer loss with its stage and
    what a uniform indexer would score, e.g. '  mtp 4.1021/4.5310  indexer 0.0132 of 0.2051 uniform
    (sparse)' (nothing without them)."""
    text = "  mtp " + "/".join(f"{v:.4f}" for v in row["mtp"]) if row.get("mtp") else ""
    if "indexer" not in row:
        return text
    uniform = f" of {row['indexer_uniform']:.4f} uniform" if "indexer_uniform" in row else ""
    return text + f"  indexer {row['indexer']:.4f}{uniform} ({row['dsa_stage']})"
