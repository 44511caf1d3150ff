"""The `nanods` command line: train, sample, inspect, bench, components, init."""

from __future__ import annotations

import json
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Optional

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from nanods.errors import NanodsError

app = typer.Typer(
    name="nanods",
    help="nanoDeepSeek: train, sample, inspect and benchmark a small, faithful DeepSeek-V3.2 "
         "(MLA, DeepSeekMoE, auxiliary-loss-free routing).\n\n"
         "Start with [bold]nanods train --scale tiny --steps 40[/bold], then "
         "[bold]nanods inspect runs/nanods/ckpt.safetensors[/bold].",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()
DEBUG = {"on": bool(os.environ.get("NANODS_DEBUG"))}


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False) -> None:
    DEBUG["on"] = DEBUG["on"] or debug


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------------
@app.command()
def components(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    check: Annotated[bool, typer.Option("--check", help="Import each component to see whether it loads.")] = False,
) -> None:
    """List every registered attention, FFN and router, with the package that provides it.

    Components come from entry points (groups nanods.attention, nanods.ffn, nanods.router);
    nanods' built-ins are registered the same way a plugin is. Nothing is imported unless --check.
    """
    from nanods import registry

    rows = registry.as_rows(check_import=check)
    if as_json:
        _print_json({"components": rows})
        return
    table = Table(title="nanods components", caption=escape("select one in nanods.toml [model] or with --attention/--ffn/--router"))
    for col in ("group", "name", "package", "version", "imports", "target"):
        table.add_column(col)
    for r in rows:
        imports = "-" if "imports" not in r else ("[green]yes[/]" if r["imports"] else f"[red]no[/]: {escape(r['error'])}")
        table.add_row(r["group"], r["name"], r["package"], r["version"], imports, r["target"])
    out.print(table)
    if not check:
        err.print("[dim]imports: not checked; run `nanods components --check` to import each one[/]")


# ---------------------------------------------------------------------------------------------
@app.command()
def init(
    path: Annotated[Path, typer.Argument(help="Where to write the project file.")] = Path("nanods.toml"),
    scale: Annotated[str, typer.Option(help="Preset to start from: tiny, small, base or large.")] = "small",
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented nanods.toml that `nanods train` will pick up."""
    from nanods.config import preset

    preset(scale)
    if path.exists() and not force:
        raise NanodsError(f"'{path}' already exists; pass --force to overwrite it")
    text = resources.files("nanods").joinpath("templates/nanods.toml").read_text(encoding="utf-8")
    path.write_text(text.replace("{scale}", scale), encoding="utf-8")
    err.print(f"wrote {path}; edit it, then run `nanods train`")


# ---------------------------------------------------------------------------------------------
def _fmt_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


@app.command()
def inspect(
    target: Annotated[Optional[str], typer.Argument(help="A checkpoint (.safetensors) or a project file (.toml).")] = None,
    scale: Annotated[Optional[str], typer.Option(help="Inspect a preset instead: tiny, small, base, large.")] = None,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="Context length for cache and FLOPs [default: sequence_len].")] = None,
    batch: Annotated[int, typer.Option(help="Batch size for the total cache size.")] = 1,
    dtype: Annotated[str, typer.Option(help="Cache dtype: bfloat16/bf16 or float32/fp32.")] = "bfloat16",
    sets: Annotated[Optional[list[str]], typer.Option("--set", help="Override a key, e.g. --set model.attention=mha.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
) -> None:
    """Parameters (total and active per token), KV-cache bytes and FLOPs per token of a model.

    A checkpoint is read from its header only (no tensor data); a .toml or --scale is built on
    the meta device, so even `large` costs no memory.
    """
    from nanods.config import load_project, read_toml, resolve_project
    from nanods.device import DTYPES, resolve_dtype
    from nanods.inspect import checkpoint_report, report

    if dtype == "auto":
        raise NanodsError("inspect needs an explicit --dtype: bfloat16 or float32")
    torch_dtype = resolve_dtype(dtype, None)  # type: ignore[arg-type]
    if batch < 1 or (seq_len is not None and seq_len < 1):
        raise NanodsError("--batch and --seq-len must be positive")
    kwargs = dict(seq_len=seq_len, batch=batch, dtype=torch_dtype)
    if target is not None and target.endswith(".safetensors"):
        info = checkpoint_report(target, **kwargs)
    elif target is not None:
        info = report(resolve_project(read_toml(target), scale=scale, sets=sets, where=target).model, **kwargs)
    else:
        info = report(load_project(None, scale=scale, sets=sets).model, **kwargs)
    del DTYPES
    if as_json:
        _print_json(info)
        return
    _print_inspect(info)


def _print_inspect(info: dict[str, Any]) -> None:
    cfg = info["config"]
    title = (f"{cfg['attention']} x {cfg['ffn']}" + (f" ({cfg['router']} router)" if cfg["ffn"] == "moe" else "")
             + f", {cfg['n_layer']} layers, d={cfg['n_embd']}, vocab {cfg['vocab_size']}")
    table = Table(title=f"parameters: {title}")
    for col in ("component", "total", "active per token"):
        table.add_column(col, justify="right" if col != "component" else "left")
    for name, g in info["params_by_component"].items():
        table.add_row(name, f"{g['total']:,}", f"{g['active']:,}")
    table.add_row("[bold]all[/]", f"[bold]{info['params_total']:,}[/]", f"[bold]{info['params_active']:,}[/]")
    out.print(table)
    cost = Table(title=f"costs at seq_len={info['seq_len']}, batch={info['batch']}, {info['dtype']}")
    cost.add_column("measure")
    cost.add_column("value", justify="right")
    per = info["kv_cache_bytes_per_token"]
    cost.add_row("KV cache per token (all layers)", _fmt_bytes(per))
    cost.add_row("MHA-equivalent cache per token", f"{_fmt_bytes(info['kv_cache_bytes_per_token_mha'])} "
                 f"({info['kv_cache_bytes_per_token_mha'] / per:.1f}x)")
    if "kv_cache_bytes_per_token_decompressed" in info:
        d = info["kv_cache_bytes_per_token_decompressed"]
        cost.add_row("MLA decompressed per token", f"{_fmt_bytes(d)} ({d / per:.1f}x the latent)")
    cost.add_row(f"KV cache for {info['batch']} x {info['seq_len']}", _fmt_bytes(info["kv_cache_bytes"]))
    cost.add_row("FLOPs per token, forward (train/prefill)", _fmt_count(info["flops_per_token"]))
    cost.add_row("FLOPs per token, decode", _fmt_count(info["flops_per_token_decode"]))
    out.print(cost)
    if "expert_load" in info:
        load = Table(title="expert load at save time (share of routed tokens)")
        load.add_column("layer")
        load.add_column("shares")
        load.add_column("max/mean", justify="right")
        for i, shares in enumerate(info["expert_load"]):
            load.add_row(str(i), " ".join(f"{s:.2f}" for s in shares), f"{max(shares) * len(shares):.2f}")
        out.print(load)


# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    """Entry point: one clear line per error (traceback with --debug), DESIGN's exit codes."""
    command = typer.main.get_command(app)
    args = sys.argv[1:] if argv is None else argv
    debug = DEBUG["on"] or "--debug" in args
    try:
        command.main(args=args, prog_name="nanods", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.UsageError as e:
        e.show()
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):
        err.print("interrupted")
        sys.exit(130)
    except NanodsError as e:
        if debug:
            raise
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except Exception as e:  # an unexpected failure still gets one line unless --debug
        if debug:
            raise
        err.print(f"[bold red]error:[/] {type(e).__name__}: {escape(str(e))} (run with --debug for the traceback)",
                  highlight=False, soft_wrap=True)
        sys.exit(1)
