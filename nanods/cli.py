"""The `nanods` command line: train, sample, inspect, bench, components, init."""

from __future__ import annotations

import json
import os
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Optional

import click
import typer
from rich.console import Console
from rich.table import Table

from nanods import __version__
from nanods.checks import SAMPLE_RANGES, integers
from nanods.errors import NanodsError
from nanods.terminal import escape, format_bytes, printable


class _PlainFlags:
    """A command whose flags show no value type in --help.

    typer's rich help (0.29) prints the value type of every option, a flag's too (`--resume <bool>`),
    although a flag takes no value; an empty metavar leaves that cell blank. Done where the help
    asks for the parameters, so it also reaches the --help option typer adds to every command.
    """

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if getattr(param, "is_flag", False):
                param.metavar = ""
        return params


class _Command(_PlainFlags, typer.core.TyperCommand):
    pass


class _Group(_PlainFlags, typer.core.TyperGroup):
    pass


app = typer.Typer(
    cls=_Group,
    name="nanods",
    help="nanoDeepSeek: train, sample, inspect and benchmark a small, faithful DeepSeek-V3 "
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


def _print_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"nanods {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    DEBUG["on"] = DEBUG["on"] or debug


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------------
@app.command(cls=_Command)
def components(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    check: Annotated[bool, typer.Option("--check", help="Import each component to see whether it loads.")] = False,
) -> None:
    """List every registered attention, FFN and router, with the package that provides it.

    Components come from entry points (groups nanods.attention, nanods.ffn, nanods.router).
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
        table.add_row(*(escape(r[k]) for k in ("group", "name", "package", "version")), imports, escape(r["target"]))
    out.print(table)
    if not check:
        err.print("[dim]imports: not checked; run `nanods components --check` to import each one[/]")


ProfileOption = Annotated[Optional[str], typer.Option(help="Architecture: nanochat (the defaults) or deepseek (SwiGLU, "
                                                     "learnable norms, MLA, MoE, sigmoid router); overrides \\[model] profile.")]


# ---------------------------------------------------------------------------------------------
@app.command(cls=_Command)
def init(
    path: Annotated[Path, typer.Argument(help="Where to write the project file.")] = Path("nanods.toml"),
    scale: Annotated[str, typer.Option(help="Preset to start from: tiny, small, base or large.")] = "small",
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented nanods.toml that `nanods train` will pick up.

    Its commented-out lines show the values the scale runs with (model size, steps, lr, budget...):
    uncomment one to change it.
    """
    from nanods.project import resolve_project

    project = resolve_project({}, scale=scale)  # an unknown scale fails here, before anything is written
    if path.exists() and not force:
        raise NanodsError(f"'{path}' already exists; pass --force to overwrite it")
    template = resources.files("nanods").joinpath("templates/nanods.toml").read_text(encoding="utf-8")
    text = template.format(scale=scale, model=_TomlValues(project.model), sample=_TomlValues(project.sample),
                           train=_TomlValues(project.train, time_budget='"5m"'))
    # the values differ in width from scale to scale: line up the comments after them
    text = re.sub(r"^(.*?\S) {2,}# ", lambda m: f"{m[1]:<28} # ", text, flags=re.MULTILINE)
    path.write_text(text, encoding="utf-8")
    err.print(f"wrote {escape(path)}; edit it, then run `nanods train`")


class _TomlValues:
    """The fields of a settings object as TOML literals, for the init template's {model.n_layer} and such.

    TOML has no null: an unset field shows the example given for it, marked as an example.
    """

    def __init__(self, settings: object, **examples: str) -> None:
        self._settings, self._examples = settings, examples

    def __getattr__(self, name: str) -> str:
        value = getattr(self._settings, name)
        if value is None:
            return f"{self._examples[name]}  # an example: unset at this scale"
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return json.dumps(value)  # a TOML basic string: the same quotes and escapes
        return repr(value)  # ints, and floats as Python writes them (0.001, 1e-06): valid TOML too


# ---------------------------------------------------------------------------------------------
@app.command(cls=_Command)
def train(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="Project file \\[default: ./nanods.toml if present].")] = None,
    scale: Annotated[Optional[str], typer.Option(help="Preset: tiny, small, base, large (overrides \\[model] scale).")] = None,
    profile: ProfileOption = None,
    attention: Annotated[Optional[str], typer.Option(help="Attention component, e.g. mla or mha.")] = None,
    ffn: Annotated[Optional[str], typer.Option(help="FFN component, e.g. moe or dense.")] = None,
    router: Annotated[Optional[str], typer.Option(help="Router component, e.g. sigmoid or softmax.")] = None,
    data: Annotated[Optional[str], typer.Option(help="Corpus: stdlib, or a .txt file, a folder, a .jsonl.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Total optimizer steps of the run; replaces the preset's time budget.")] = None,
    time_budget: Annotated[Optional[str], typer.Option("--time-budget", help="Fit the run into e.g. 90s, 5m, 1h.")] = None,
    out: Annotated[Optional[str], typer.Option(help="Run directory for checkpoints, metrics.jsonl, loss.png.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run saved in --out with its own model, data and "
                                                         "settings (nanods.toml is not read for them).")] = False,
    init_from: Annotated[Optional[str], typer.Option("--init-from", help="Start a new run from a checkpoint's weights and "
                                                                         "tokenizer; training settings come from the usual chain.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run in --out (kept aside until the new "
                                                             "run's first save).")] = False,
    device: Annotated[Optional[str], typer.Option(help="auto (cuda, else mps, else cpu), cpu, cuda or mps.")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="auto (bf16 where native, else fp32), float32/fp32, bfloat16/bf16.")] = None,
    sets: Annotated[Optional[list[str]], typer.Option("--set", metavar="SECTION.KEY=VALUE", help="Override any key: "
                                                      "--set model.n_layer=4 --set train.lr=1e-3.")] = None,
) -> None:
    """Train a model on the embedded Python-stdlib corpus (or your data); no download needed.

    Examples:
      nanods train --scale tiny --steps 40 --out runs/tiny
      nanods train --scale small    # the default project: an 8-minute budget
      nanods train --resume --out runs/tiny --steps 80
    Ctrl-C (or SIGTERM) stops at the next step, saves, prints how to resume and exits 130 (143).
    """
    from nanods.project import command_line_values, load_project
    from nanods.train.loop import RunOptions
    from nanods.train.loop import train as run_training

    cli = {"model": {"attention": attention, "ffn": ffn, "router": router},
           "train": {"data": data, "steps": steps, "time_budget": time_budget, "out": out, "device": device, "dtype": dtype}}
    project = load_project(config, scale=scale, cli=cli, sets=sets, profile=profile,
                           model_base=None if resume else _model_of(init_from))
    explicit = command_line_values(cli, sets)
    code = run_training(project, RunOptions(resume=resume, init_from=init_from, overwrite=overwrite, scale=scale,
                                            profile=profile, explicit=explicit))
    if code:
        sys.exit(code)  # a graceful stop already said what happened and how to resume


def _model_of(checkpoint_path: str | None) -> dict[str, Any] | None:
    """The model config of an --init-from checkpoint, which its options adjust (None: no readable one, for
    the trainer to explain)."""
    from nanods.checkpoint import config_from_metadata, saved_metadata

    meta = saved_metadata(Path(checkpoint_path)) if checkpoint_path and Path(checkpoint_path).is_file() else None
    return config_from_metadata(meta, checkpoint_path).to_dict() if meta and "nanods.config" in meta else None


# ---------------------------------------------------------------------------------------------
_SAMPLING_RANGES = {**SAMPLE_RANGES, **integers("num_samples", 1)}


def _in_range(param: typer.CallbackParam, value: Any) -> Any:
    """A sampling option outside its range is a usage error (exit 2), before anything is read."""
    if value is not None and value not in _SAMPLING_RANGES[param.name]:
        raise typer.BadParameter(f"must be {_SAMPLING_RANGES[param.name]}, got {value}")
    return value


@app.command(cls=_Command)
def sample(
    ckpt: Annotated[Path, typer.Argument(help="A checkpoint written by nanods train, or its run folder "
                                         "(e.g. runs/tiny for runs/tiny/ckpt.safetensors).")],
    prompt: Annotated[Optional[str], typer.Option(help="Text to continue \\[default: stdin if piped, else a new document].")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option("--prompt-file", help="Read the prompt from a file.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", callback=_in_range, help="Tokens to generate "
                                                          "\\[default: 256, lowered to what fits the context].")] = None,
    temperature: Annotated[Optional[float], typer.Option(callback=_in_range, help="0 = greedy \\[default: 0.8].")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", callback=_in_range, help="Sample among the k most likely tokens; 0 = off \\[default: 50].")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", callback=_in_range, help="Nucleus sampling threshold, in (0, 1] \\[default: off].")] = None,
    seed: Annotated[Optional[int], typer.Option(min=0, max=2**63 - 1, help="Same seed, same text.")] = None,
    num_samples: Annotated[int, typer.Option("--num-samples", callback=_in_range, help="Samples, batched in one forward.")] = 1,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute the whole prefix each step (for comparison).")] = False,
    device: Annotated[str, typer.Option(help="auto (cuda, else mps, else cpu), cpu, cuda or mps.")] = "auto",
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the decode step: tens of seconds first, then "
                                          "faster tokens (pays off for long generations; one sample).")] = False,
    echo: Annotated[bool, typer.Option("--echo", help="Print the prompt before its continuation, so stdout reads "
                                       "as one text (each sample starts with it).")] = False,
    plain: Annotated[bool, typer.Option("--plain", help="Decode with the plain model, without the CPU fast paths "
                                        "\\[default: fast paths, unless fast_paths = false in \\[sample]].")] = False,
    speculative: Annotated[bool, typer.Option("--speculative", help="Draft tokens with the model's MTP modules and "
                                              "verify them in one step of the main model: the same text at "
                                              "--temperature 0, the same distribution otherwise, fewer steps "
                                              "(needs mtp_depth >= 1).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No timing line on stderr.")] = False,
) -> None:
    """Generate text from a checkpoint, streaming it to stdout (decode runs on the KV cache).

    Examples:
      nanods sample runs/tiny --prompt "def main(" --max-new-tokens 100
      echo "import os" | nanods sample runs/tiny --echo --seed 1

    Defaults come from the \\[sample] table of ./nanods.toml when there is one.
    """
    import time

    from nanods.checkpoint import load
    from nanods.device import resolve_device
    from nanods.generate import fit_sampling, read_prompt, sample_texts, sampling_settings
    from nanods.inspect import file_kind
    from nanods.speculative import SpeculationStats

    settings, sources = sampling_settings(dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                               top_p=top_p, num_samples=num_samples, fast_paths=False if plain else None))
    max_new_tokens, temperature, top_k, top_p, num_samples, fast = settings.values()  # in the order given
    if prompt is not None and prompt_file is not None:
        raise NanodsError("give --prompt or --prompt-file, not both")
    if compile and (num_samples > 1 or no_cache):
        raise NanodsError("--compile decodes one sample on the KV cache: drop --num-samples/--no-cache or --compile")
    if speculative and no_cache:
        raise NanodsError("--speculative verifies drafts on the KV cache: drop --no-cache or --speculative")
    kind, ckpt = file_kind(ckpt)
    if kind != "checkpoint":
        raise NanodsError(f"'{ckpt}' is text, not a checkpoint; give the ckpt.safetensors that "
                          "`nanods train` wrote, or its run folder")
    model, tokenizer = load(ckpt, resolve_device(device))
    if tokenizer is None:
        raise NanodsError(f"'{ckpt}' holds no tokenizer (it was imported from a Hugging Face folder without a "
                          "tokenizer.json), so there is no text to sample; convert that folder again with its "
                          "tokenizer.json (nanods inspect works on it as it is)")
    if speculative and not model.config.mtp_depth:
        raise NanodsError(f"--speculative drafts with multi-token prediction modules, and '{ckpt}' has none "
                          "(mtp_depth = 0); train with --set model.mtp_depth=1, or drop --speculative")
    prompt_text = read_prompt(prompt, prompt_file)
    ids = [tokenizer.eot_id] + tokenizer.encode(prompt_text)
    max_new_tokens = fit_sampling(model, len(ids), num_samples, max_new_tokens, sources["max_new_tokens"],
                                  note=lambda text: err.print(text, highlight=False))
    # a terminal obeys escape codes a model may have learned from its data; a pipe or file gets the text as generated
    tty = sys.stdout.isatty()

    def emit(text: str) -> None:
        sys.stdout.write(printable(text) if tty else text)
        sys.stdout.flush()

    texts = [""] * num_samples
    prefix = prompt_text if echo else ""
    if num_samples == 1:  # streamed: the prompt now, each piece as it is decoded
        emit(prefix)
    start, produced, stats = time.perf_counter(), 0, SpeculationStats()
    for pieces in sample_texts(model, tokenizer, ids, num_samples, max_new_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, seed=seed, use_cache=not no_cache, compile=compile,
                               fast=fast, speculative=speculative, stats=stats):
        produced += 1
        if num_samples == 1:
            emit(pieces[0])
        else:
            texts = [text + piece for text, piece in zip(texts, pieces)]
    seconds = time.perf_counter() - start
    if num_samples == 1:
        emit("\n")
    else:
        emit("\n".join(f"--- sample {i + 1} ---\n{prefix}{t}" for i, t in enumerate(texts)) + "\n")
    if not quiet:
        cache = model.kv_cache_bytes_per_token(model.lm_head.weight.dtype) * (len(ids) + produced) * num_samples
        err.print(f"{produced * num_samples} tokens in {seconds:.2f} s ({produced * num_samples / seconds:,.1f} tok/s, "
                  f"{'no cache' if no_cache else f'KV cache {format_bytes(cache)}'}"
                  f"{', compiling included' if compile else ''})", highlight=False)
        if speculative:
            rates = ", ".join(f"depth {k} {100 * r:.0f}%" for k, r in enumerate(stats.acceptance(), start=1))
            err.print(f"speculative: drafts accepted {rates}; {stats.tokens / max(stats.rounds, 1):.2f} tokens per "
                      f"main-model step ({stats.rounds} steps)", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------
@app.command(cls=_Command)
def bench(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="Project file whose model to measure "
                                                   "\\[default: ./nanods.toml if present, else --scale small].")] = None,
    scale: Annotated[Optional[str], typer.Option(help="Preset: tiny, small, base, large (overrides \\[model] scale).")] = None,
    profile: ProfileOption = None,
    dtype: Annotated[str, typer.Option(help="auto (bf16 where native, else fp32), float32/fp32, bfloat16/bf16.")] = "auto",
    device: Annotated[str, typer.Option(help="auto (cuda, else mps, else cpu), cpu, cuda or mps.")] = "auto",
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs of the train step and prefill; decode rows take "
                                         "min(repeats, 3), the MoE row max(repeats, 3). Medians are reported, "
                                         "min-max beside them.")] = 5,
    sets: Annotated[Optional[list[str]], typer.Option("--set", metavar="SECTION.KEY=VALUE", help="Override a model "
                                                      "key, e.g. --set model.attention=mha.")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="Also decode through the torch.compile'd step (batch 1; "
                                          "compiling takes tens of seconds).")] = False,
    plain: Annotated[bool, typer.Option("--plain", help="Measure the plain model, without the CPU fast paths "
                                        "(docs/performance.md).")] = False,
    long_context: Annotated[bool, typer.Option("--long-context", help="Add per-layer attention times of mla and dsa "
                                               "(index_topk 512) at contexts 1K-16K: prefill and a decode step, "
                                               "also compiled with --compile (a few minutes).")] = False,
    ckpt: Annotated[Optional[Path], typer.Option("--ckpt", help="A trained checkpoint with MTP (mtp_depth >= 1): "
                                                 "measure its config, and add plain vs speculative greedy decoding "
                                                 "of 256 tokens with its weights.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
) -> None:
    """Measure train step, prefill and decode speed, MFU and the decode roofline on this machine.

    One process, one run: the matmul peak and read bandwidth are measured beside the model.
    So MFU, the fraction of the roofline, MoE vs dense and absorbed vs naive MLA are fair ratios.

    Example: nanods bench --ckpt runs/mtp  (speculative decoding's speed-up on trained weights)
    """
    from nanods import bench as benchmarks
    from nanods import fast_paths
    from nanods.checkpoint import load
    from nanods.device import resolve_device, resolve_dtype
    from nanods.inspect import file_kind
    from nanods.project import load_project, project_file

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    trained = None
    if ckpt is not None:
        if config is not None or scale is not None or profile is not None or sets:
            raise NanodsError("--ckpt measures the checkpoint's own model: drop --config/--scale/--profile/--set")
        kind, ckpt = file_kind(ckpt)
        if kind != "checkpoint":
            raise NanodsError(f"--ckpt '{ckpt}' is text, not a checkpoint; give the ckpt.safetensors that "
                              "`nanods train` wrote, or its run folder")
        trained, tokenizer = load(ckpt, torch_device)
        if not trained.config.mtp_depth or tokenizer is None:
            raise NanodsError(f"'{ckpt}' has {'no tokenizer' if tokenizer is None else 'no MTP modules (mtp_depth = 0)'}"
                              "; --ckpt needs a checkpoint trained with --set model.mtp_depth=1 (or more)")
        model, path = trained.config, None
    else:
        path = project_file(config)
        model = load_project(path, scale=scale or (None if path else "small"), sets=sets, profile=profile).model
    with err.status("measuring") as status:
        result = benchmarks.run(model, torch_device, torch_dtype, repeats, compile=compile, fast=not plain,
                                progress=lambda what: status.update(f"measuring {what}"))
        if long_context:
            result["long_context"] = benchmarks.bench_long_context(
                model, torch_device, torch_dtype, min(repeats, 2), compile=compile,
                progress=lambda what: status.update(f"measuring {what}"))
        if trained is not None:
            status.update("measuring plain vs speculative decoding")
            prompt = [tokenizer.eot_id] + tokenizer.encode("def ")
            new = min(256, trained.config.sequence_len - len(prompt))
            with fast_paths.enabled(trained.eval().to(torch_dtype), on=not plain):
                result["speculative"] = benchmarks.bench_speculative(trained, prompt, new, torch_device,
                                                                     min(repeats, 3), compile)
    result["scale"] = " + ".join(filter(None, [str(ckpt) if ckpt else None, scale or (None if path or ckpt else "small"),
                                               path and str(path), profile]))
    if as_json:
        _print_json(result)
        return
    benchmarks.print_result(result, out)


# ---------------------------------------------------------------------------------------------
@app.command(cls=_Command)
def inspect(
    target: Annotated[Optional[Path], typer.Argument(help="A checkpoint, a run folder holding ckpt.safetensors, or a "
                                                     "project file (nanods.toml) \\[default: ./nanods.toml if present].")] = None,
    scale: Annotated[Optional[str], typer.Option(help="Inspect a preset instead: tiny, small, base, large.")] = None,
    profile: ProfileOption = None,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="Context length for cache and FLOPs \\[default: sequence_len].")] = None,
    batch: Annotated[int, typer.Option(help="Batch size for the total cache size.")] = 1,
    dtype: Annotated[str, typer.Option(help="Cache dtype: bfloat16/bf16 or float32/fp32.")] = "bfloat16",
    sets: Annotated[Optional[list[str]], typer.Option("--set", metavar="SECTION.KEY=VALUE", help="Override a key, "
                                                      "e.g. --set model.attention=mha.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
) -> None:
    """Parameters (total and active per token), KV-cache bytes and FLOPs per token of a model.

    A checkpoint is read from its header only (no tensor data); it is told from a project file by
    its content, whatever its name. A project file or --scale is built on the meta device, so even
    `large` costs no memory.

    Examples:
      nanods inspect runs/tiny
      nanods inspect --scale large --seq-len 32768 --batch 8
    """
    from nanods.project import load_project
    from nanods.device import DTYPES
    from nanods.inspect import checkpoint_report, file_kind, print_report, report

    if dtype not in DTYPES:
        raise NanodsError(f"--dtype must be one of {', '.join(DTYPES)} for inspect, got '{dtype}'")
    torch_dtype = DTYPES[dtype]
    if batch < 1 or (seq_len is not None and seq_len < 1):
        raise NanodsError("--batch and --seq-len must be positive")
    kwargs = dict(seq_len=seq_len, batch=batch, dtype=torch_dtype)
    kind, path = file_kind(target) if target is not None else ("project", None)
    if kind == "checkpoint":
        info = checkpoint_report(path, **kwargs)
    else:
        info = report(load_project(path, scale=scale, sets=sets, profile=profile).model, **kwargs)
    if as_json:
        _print_json(info)
        return
    print_report(info, out)


# ---------------------------------------------------------------------------------------------
@app.command(cls=_Command)
def convert(
    src: Annotated[Path, typer.Argument(help="A nanods checkpoint (ckpt.safetensors) or its run folder; or a "
                                             "Hugging Face model folder (with config.json).")],
    dst: Annotated[Path, typer.Argument(help="A new folder for the Hugging Face model, or a new .safetensors file "
                                             "for the nanods checkpoint (never overwritten).")],
) -> None:
    """Convert a nanods checkpoint to a Hugging Face DeepseekV3ForCausalLM folder, or back.

    Writes config.json, generation_config.json, model.safetensors, tokenizer.json and
    tokenizer_config.json, loadable with transformers' AutoModelForCausalLM and AutoTokenizer.
    DeepSeek-V3's choices are needed (--profile deepseek: swiglu, MLA, MoE with the sigmoid
    router, or dense); anything else is refused before a file is written.

    A folder with config.json (from save_pretrained, or from this command) goes the other way, to
    one checkpoint file that sample, inspect and train --init-from take; it needs a tokenizer.json
    with nanods' byte tokenizer or a byte-level BPE with <|endoftext|>. FP8 weights are refused.

    Examples:
      nanods convert runs/tiny runs/tiny-hf
      nanods convert runs/tiny-hf tiny.safetensors
    """
    from nanods.convert import convert as run_convert

    written = run_convert(src, dst)
    out.print(f"wrote {escape(str(written))}", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------
def _click_classes(name: str) -> tuple[type, ...]:
    """click's exception class and the copy typer vendors (typer >= 0.2x ships its own click)."""
    modules = [click.exceptions]
    try:
        import typer._click.exceptions as vendored

        modules.append(vendored)
    except ImportError:
        pass
    return tuple(getattr(m, name) for m in modules if hasattr(m, name))


def main(argv: list[str] | None = None) -> None:
    """Entry point: one clear line per error (traceback with --debug); exit 1 for errors, 2 for usage, 130 for Ctrl-C."""
    command = typer.main.get_command(app)
    args = sys.argv[1:] if argv is None else argv
    debug = DEBUG["on"] or "--debug" in args
    try:
        code = command.main(args=args, prog_name="nanods", standalone_mode=False)
    except _click_classes("Exit") as e:
        sys.exit(e.exit_code)
    except _click_classes("ClickException") as e:  # usage errors: click prints them with the usage line
        e.message = printable(e.message)  # it may quote the command line; click leaves bidi overrides in
        e.show()
        sys.exit(e.exit_code)
    except (*_click_classes("Abort"), KeyboardInterrupt):
        code = 130
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
    if code == 130:  # Ctrl-C: raised, or inside a command already turned into this exit code by typer
        err.print("interrupted")
    sys.exit(code if isinstance(code, int) else 0)
