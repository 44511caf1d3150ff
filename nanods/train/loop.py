"""`nanods train`: build data, tokenizer and model, then run optimizer steps with safe checkpoints.

A run is fully determined by its settings: batches are drawn from (seed, step), the schedule
from (step, total), so an interrupted run resumed from its checkpoint repeats the
uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from shlex import quote
from typing import Any

import torch

from nanods import checkpoint, fast_paths
from nanods.config import NanoDeepSeekConfig, round_up, short_name
from nanods.data import Batches, Corpus, load_corpus, load_tokenizer, tokenize
from nanods.device import peak_memory, resolve_device, resolve_dtype
from nanods.errors import NanodsError
from nanods.flops import flops_per_token
from nanods.layers.ffn.moe import MoE, update_expert_bias
from nanods.memory import check_training_fits
from nanods.model import NanoDeepSeek
from nanods.peak import matmul_peak
from nanods.project import Project, TrainSettings
from nanods.terminal import escape, format_bytes, printable
from nanods.tokenizer import Tokenizer
from nanods.train import optim_state
from nanods.train.budget import TimeBudget
from nanods.train.distributed import full_state_dict, init_world, shutdown, wrap
from nanods.train.optim import build_optimizers, describe_split
from nanods.train.report import TrainReport
from nanods.train.resume import resumed_project
from nanods.train.run_dir import RunDir
from nanods.train.schedule import lr_factor

# model fields --init-from may change: the MTP modules and DSA's indexer ride on the trunk, which the weights
# fix (attention only from mla to dsa: the same MLA weights; checked in _init_source)
INIT_FROM_CHANGES = ("mtp_depth", "mtp_loss_weight", "attention", "index_n_heads", "index_head_dim", "index_topk")
# settings that must not change under --resume: what a step computes, and the budget whose plan the run keeps
FROZEN_TRAIN = ("data", "extensions", "tokenizer", "batch_size", "micro_batch_size", "seq_len", "seed", "optimizer",
                "time_budget")


@dataclass
class RunOptions:
    """What the command line adds to a project: where to write and how to start."""

    resume: bool = False
    init_from: str | None = None
    overwrite: bool = False
    explicit: dict[str, dict[str, Any]] = field(default_factory=dict)  # what the command line set, by section
    scale: str | None = None  # --scale, when given
    profile: str | None = None  # --profile, when given


class StopFlag:
    """SIGINT/SIGTERM ask the loop to stop at the next optimizer step (a second signal aborts at once)."""

    def __init__(self) -> None:
        self.set = False
        self.signal = 0  # the first signal received: the exit code is 128 + it
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.set:  # asked twice: the user (or the scheduler) will not wait for the step to end
            raise KeyboardInterrupt
        self.set, self.signal = True, signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str) -> list[str]:
    return [f"{prefix}{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _sized_config(config: NanoDeepSeekConfig, tokenizer: Tokenizer) -> NanoDeepSeekConfig:
    """The model's vocabulary is the tokenizer's real size, rounded up to a multiple of 64."""
    values = config.to_dict()
    values.update(vocab_size=round_up(len(tokenizer), 64), tokenizer_vocab_size=len(tokenizer))
    return NanoDeepSeekConfig(**values)


def _describe_training(s: TrainSettings) -> str:
    """The settings that shape a run, as the line printed at its start."""
    length = f"{s.steps:,} steps" + (f" or {s.time_budget}, whichever ends first" if s.time_budget else "")
    return (f"training: {length}, batch {s.batch_size} x {s.seq_len} tokens, lr {s.lr:g} ({s.optimizer}), "
            f"warmup {s.warmup_steps}, decay over the last {s.decay_frac:.0%}, eval every {s.eval_every}")


def _bytes_per_token(corpus: Corpus, n_tokens: int) -> float:
    return sum(len(doc.encode("utf-8")) for doc in corpus.val) / max(1, n_tokens)


class Trainer:
    def __init__(self, project: Project, out_dir: Path, run: RunOptions) -> None:
        self.settings = s = project.train
        self.out_dir, self.opts = out_dir, run
        self.world, self.device = init_world(resolve_device(s.device))
        self.dtype = resolve_dtype(s.dtype, self.device)
        self.sample_settings = project.sample
        self.report = TrainReport(out_dir, s.log_every, enabled=self.world.is_main)
        self.report.print(f"device {self.device}, dtype {str(self.dtype).removeprefix('torch.')}"
                          + (" (auto: no native bf16 matmul here)" if s.dtype == "auto" and self.dtype == torch.float32
                             else " (auto)" if s.dtype == "auto" else ""))
        if self.world.distributed:
            self.report.print(f"data parallel: {self.world.world_size} processes ({s.parallel})")
        self.run_dir = RunDir(out_dir)
        self._lock_out_dir()
        try:
            self._setup(project, run)
        except BaseException:
            self.close(failing=True)
            raise

    def _setup(self, project: Project, run: RunOptions) -> None:
        s = self.settings
        self._check_out_dir()
        resumed = self._resume_state() if run.resume else None
        if resumed and self.world.distributed and s.parallel == "fsdp":
            raise NanodsError("--resume does not run under train.parallel = \"fsdp\" (its optimizer state is not "
                              "sharded back); resume with --set train.parallel=ddp, or start a new run from the "
                              f"weights: nanods train --init-from {quote(self._weights_arg())} --out NEW_DIR")
        self.run_id = resumed["run_id"] if resumed else uuid.uuid4().hex[:16]
        source = resumed or (self._init_source() if run.init_from else None)  # refusals before the corpus is read
        if not resumed and s.data != "stdlib":  # a run resumes from any folder: its data path must not be relative
            s.data = str(Path(s.data).expanduser().resolve())
        with self.report.phase("reading the corpus") as done:
            self.corpus = c = load_corpus(s.data, tuple(s.extensions))
            done(f"data: {c.name}, {len(c.train) + len(c.val):,} documents, {format_bytes(c.n_bytes)} "
                 f"({len(c.val):,} for validation)")
        for note in self.corpus.notes:
            self._note(note)
        with self.world.main_first():  # rank 0 trains the tokenizer and fills the token cache
            if source is not None:
                model_config, tokenizer = source["config"], source["tokenizer"]
            else:
                with self.report.phase(f"building the {s.tokenizer} tokenizer") as done:
                    tokenizer = load_tokenizer(self.corpus, s.tokenizer, project.model.vocab_size, self._note)
                    done(f"tokenizer: {tokenizer.kind}, {len(tokenizer):,} ids")
                model_config = _sized_config(project.model, tokenizer)
            if resumed is not None:
                self._refuse_changes(resumed, project, model_config)
            with self.report.phase("tokenizing the corpus") as done:
                tokens = tokenize(self.corpus, tokenizer, self._note)
                done(f"tokens: {len(tokens.train):,} train, {len(tokens.val):,} val")
        self.tokenizer = tokenizer
        self.train_tokens, self.val_tokens = tokens.train, tokens.val
        self.bytes_per_token = _bytes_per_token(self.corpus, len(tokens.val))
        micro = s.micro_batch_size or max(1, s.batch_size // self.world.world_size)  # default: no accumulation
        self.batches = Batches(self.train_tokens, s.batch_size, micro, s.seq_len, s.seed,
                               self.world.rank, self.world.world_size)
        self.val_batches = Batches(self.val_tokens, micro * s.eval_batches, micro, s.seq_len, s.seed + 1, split="val")
        self.accum = self.batches.accum
        if s.seq_len > model_config.sequence_len:
            raise NanodsError(f"train.seq_len ({s.seq_len}) exceeds the model's sequence_len ({model_config.sequence_len})")
        if s.seq_len <= model_config.mtp_depth:
            raise NanodsError(f"train.seq_len ({s.seq_len}) leaves nothing to predict at mtp_depth "
                              f"{model_config.mtp_depth}: depth k needs k+1 tokens; raise train.seq_len or lower it")

        check_training_fits(model_config, micro, s.seq_len, self.dtype, self.device)  # before allocating anything
        torch.manual_seed(s.seed)
        self.model = NanoDeepSeek(model_config).to(self.device)
        if source is not None:  # MTP depths and indexers added by --init-from keep their fresh initialisation
            added = {k: v for k, v in self.model.state_dict().items()
                     if (k.startswith("mtp.") or ".indexer." in k) and k not in source["weights"]}
            self.model.load_state_dict({**source["weights"], **(added if run.init_from else {})},
                                       strict=not model_config.tie_embeddings)
        self.report.layer_names = [_layer_name(name) for name, m in self.model.named_modules() if isinstance(m, MoE)]
        self.indexed = [m for m in self.model.modules() if hasattr(m, "indexer_loss")]  # DSA attentions
        if s.dsa_dense_frozen is None:  # continuing a trained model: its indexer warms up alone
            s.dsa_dense_frozen = bool(run.init_from)
        self.net = wrap(self.model, self.world, s.parallel)  # what forward and backward go through
        self.optimizers = build_optimizers(self.model, s, self.device)
        self.report.print(describe_split(self.model, s))
        if not resumed:  # a resumed run says where it stands instead
            self.report.print(escape(_describe_training(s)))
        self.step, self.total, self.elapsed, self.tokens_seen = 0, s.steps, 0.0, 0
        self.decay_start: int | None = None  # set by a time budget (and kept on resume)
        if resumed is not None:
            self._load_train_state(resumed)
        self.forward = torch.compile(self.net) if s.compile else self.net
        self.flops_per_step = 3 * flops_per_token(self.model, s.seq_len, mtp=True) * s.batch_size * s.seq_len
        self.peak = matmul_peak(self.device, self.dtype)
        self.expert_counts: torch.Tensor | None = None
        self.last_eval: tuple[float | None, float | None] = (None, None)  # (val loss, bits per byte)
        self.stopped = False  # by SIGINT/SIGTERM: no sample at the end, the user wants out
        self.last_good_step: int | None = resumed["step"] if resumed else None
        self.replacing = self.opts.overwrite and bool(self.run_dir.run_files())
        if self.replacing and self.world.is_main:  # only once everything checked out: a failed start changes nothing
            self.run_dir.set_aside(self.run_id)

    # ---- setup ------------------------------------------------------------------------------
    def _lock_out_dir(self) -> None:
        """Rank 0 locks the run folder and repairs what an interrupted trainer left; all ranks see a refusal."""
        refusal = None
        if self.world.is_main:
            try:
                self.run_dir.acquire()
                self.run_dir.recover(self._note)
            except NanodsError as e:
                refusal = e
        if self.world.any(refusal is not None, self.device):
            raise refusal or NanodsError(f"rank 0 could not take the run folder '{self.out_dir}' (see its error)")

    def close(self, failing: bool = False) -> None:
        """Release the run folder; a run that ended before its first save gives back the run it replaced.
        While an error propagates, a failure here must not hide it."""
        if not self.world.is_main:
            return
        try:
            self.run_dir.recover(self._note)
        except NanodsError:
            if not failing:
                raise
        finally:
            self.run_dir.release()

    def _note(self, text: str) -> None:
        self.report.print(f"[yellow]note:[/] {escape(text)}")

    def _weights_arg(self) -> str:
        return str(self.out_dir / checkpoint.WEIGHTS)

    def _check_out_dir(self) -> None:
        weights = self.out_dir / checkpoint.WEIGHTS
        if weights.exists() and not self.opts.resume and not self.opts.overwrite:
            raise NanodsError(f"'{weights}' already holds a run: continue it with --resume, "
                              f"start over with --overwrite, or pick another --out")
        leftovers = [p.name for p in self.run_dir.run_files()]
        if leftovers and not weights.exists() and not self.opts.overwrite:
            raise NanodsError(f"'{self.out_dir}' holds {', '.join(leftovers)} of a run that never saved a checkpoint; "
                              "start over with --overwrite, or pick another --out")
        if self.opts.resume and not weights.exists():
            raise NanodsError(f"nothing to resume: '{weights}' does not exist (drop --resume to start a run)")
        if self.opts.resume and self.opts.init_from:
            raise NanodsError("--resume and --init-from exclude each other: resume continues a run, "
                              "init-from starts a new one from a checkpoint's weights")
        if self.opts.resume and self.opts.overwrite:
            raise NanodsError("--resume and --overwrite exclude each other: resume continues the run in --out, "
                              "overwrite replaces it with a new one")

    def _read_checkpoint(self, path: Path) -> dict[str, Any]:
        model, tokenizer = checkpoint.load(path, "cpu")
        _, meta = checkpoint.read_header(path)
        if tokenizer is None and self.opts.resume:  # a run's own checkpoint always holds its tokenizer
            checkpoint.metadata_text(meta, "nanods.tokenizer", path)  # raises: damaged, naming the key
        return {"config": model.config, "tokenizer": tokenizer, "weights": model.state_dict(),
                "step": checkpoint.metadata_step(meta, path), "run_id": checkpoint.metadata_run(meta)}

    def _resume_state(self) -> dict[str, Any]:
        path = self.out_dir / checkpoint.WEIGHTS
        source = self._read_checkpoint(path)
        source["state"], source["meta"] = checkpoint.latest_state(self.out_dir, source["step"], source["run_id"])
        state_file = checkpoint.state_path(self.out_dir, source["step"])
        meta = source["meta"]
        if not isinstance(meta.get("settings"), dict) or not isinstance(meta.get("optimizers"), list):
            raise NanodsError(f"'{state_file}' is damaged: its nanods.train metadata lacks settings or optimizers")
        if not meta["optimizers"]:
            raise NanodsError(f"'{state_file}' was saved by an FSDP run, which keeps no optimizer state, so the run "
                              f"cannot be resumed exactly; start a new run from its weights: nanods train --init-from "
                              f"{quote(self._weights_arg())} --out NEW_DIR")
        return source

    def _init_source(self) -> dict[str, Any]:
        path = Path(self.opts.init_from)
        if not path.is_file():
            raise NanodsError(f"--init-from '{path}' not found")
        source = self._read_checkpoint(path)
        if source["tokenizer"] is None:
            raise NanodsError(f"--init-from '{path}' holds no tokenizer (it was imported without a tokenizer.json), "
                              "and training needs the one its weights were trained with; convert the original "
                              "folder again with its tokenizer.json")
        stored = source["config"].to_dict()
        given = {k: v for k, v in self.opts.explicit.get("model", {}).items() if k not in ("scale", "profile")}
        changed = [f"model.{k}: {stored.get(k)!r} -> {v!r}" for k, v in given.items()
                   if stored.get(k) != v and k not in INIT_FROM_CHANGES]
        if changed:  # the weights fix the model: a silently ignored option would mislead
            raise NanodsError(f"--init-from takes the model from '{path}', which differs from the command line: "
                              f"{'; '.join(changed)}; drop those options, or train a new model without --init-from")
        attention = given.get("attention", stored["attention"])
        if attention != stored["attention"] and (short_name(stored["attention"]), short_name(attention)) != ("mla", "dsa"):
            raise NanodsError(f"--init-from '{path}' has attention '{stored['attention']}'; a checkpoint's attention can "
                              "only change from mla to dsa (the same MLA weights, plus a new indexer)")
        values = {**stored, **{k: v for k, v in given.items() if k in INIT_FROM_CHANGES}}
        if short_name(attention) != short_name(stored["attention"]):
            # mla -> dsa: the mla model never used its index_* fields (resolved when it was saved, perhaps by an
            # older default), so those the command line does not give take today's defaults
            values = {k: v for k, v in values.items() if not k.startswith("index_") or k in given}
        source["config"] = NanoDeepSeekConfig.from_dict(values, "the command line")
        depth, before = source["config"].mtp_depth, stored["mtp_depth"]
        source["weights"] = {k: v for k, v in source["weights"].items()
                             if not k.startswith("mtp.") or int(k.split(".")[1]) < depth}
        added = f"; MTP depths {before + 1}-{depth} start from scratch" if depth > before else ""
        self.report.print(f"initialised from {escape(path)} (step {source['step']}){added}; a new run starts at step 0")
        return source

    def _refuse_changes(self, resumed: dict[str, Any], project: Project, model_config: NanoDeepSeekConfig) -> None:
        requested = _sized_config(project.model, resumed["tokenizer"]).to_dict()
        stored_train = resumed["meta"]["settings"]
        new_train = asdict(self.settings)
        problems = _diff(model_config.to_dict(), requested, "model.")
        problems += _diff({k: stored_train.get(k) for k in FROZEN_TRAIN}, {k: new_train[k] for k in FROZEN_TRAIN},
                          "train.")
        if resumed["meta"].get("data_fingerprint") != self.corpus.fingerprint:
            problems.append(f"data fingerprint: {resumed['meta'].get('data_fingerprint')} -> {self.corpus.fingerprint}")
        if problems:
            raise NanodsError("--resume refuses a changed run (start a new one with --init-from, or undo): "
                              + "; ".join(problems))

    def _load_train_state(self, resumed: dict[str, Any]) -> None:
        meta, state = resumed["meta"], resumed["state"]
        path = checkpoint.state_path(self.out_dir, resumed["step"])
        try:
            self.step, self.total = int(meta["step"]), int(meta["total"])
            self.elapsed, self.tokens_seen = float(meta["elapsed"]), int(meta["tokens_seen"])
        except (KeyError, TypeError, ValueError):
            raise NanodsError(f"'{path}' is damaged: its nanods.train metadata lacks the run's progress") from None
        decay_start = meta.get("decay_start")
        plausible = self.step == resumed["step"] and self.step <= self.total and math.isfinite(self.elapsed) and (
            decay_start is None or type(decay_start) is int and 0 <= decay_start <= self.total)
        if not plausible:
            raise NanodsError(f"'{path}' is damaged: step {self.step} of {self.total} (decay from {decay_start}) does "
                              f"not pair with the weights' step {resumed['step']}")
        self.decay_start = decay_start
        replan = "steps" in self.opts.explicit.get("train", {}) and self.settings.steps != self.total
        if replan and self.settings.steps <= self.step:
            raise NanodsError(f"--steps {self.settings.steps} is not beyond the saved step {self.step}")
        optim_state.restore(self.optimizers, self.model, state, meta["optimizers"], path)
        if replan:
            self.report.print(f"re-planned the schedule's tail: total {self.total} -> {self.settings.steps} steps "
                              f"from step {self.step}")
            self.total, self.decay_start = self.settings.steps, None
        self.report.print(f"resumed at step {self.step} of {self.total}")

    # ---- the loop ---------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def train_step(self) -> dict[str, float]:
        s = self.settings
        factor = lr_factor(self.step, self.total, s.warmup_steps, s.decay_frac, self.decay_start)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
        dense = self.step < s.dsa_dense_steps
        for attention in self.indexed:  # DSA's stage: dense warm-up, then sparse
            attention.dense = dense
        frozen = dense and bool(self.indexed) and s.dsa_dense_frozen
        # (ce, aux, indexer, indexer_uniform, mtp...) summed over micro-batches
        parts = torch.zeros(4 + self.model.config.mtp_depth, device=self.device)
        for micro in range(self.accum):
            x, y = self.batches.get(self.step, micro)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            last = micro == self.accum - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.net, "no_sync") else self.net.no_sync()
            with sync:  # DDP all-reduces gradients once, on the last micro-batch
                with self.autocast():
                    terms = self.forward(x, y, return_terms=True)
                (terms.total / self.accum).backward()
            parts += torch.cat([terms.ce.detach()[None], terms.aux.detach()[None], terms.indexer.detach()[None],
                                self._indexer_uniform(), terms.mtp.detach()]) / self.accum
        ce, aux, indexer, uniform, *mtp = (self.world.all_reduce_sum(parts) / self.world.world_size).tolist()
        loss = ce + aux
        if not math.isfinite(loss + sum(mtp)):
            kept = f"the last good checkpoint (step {self.last_good_step}) is kept" if self.last_good_step \
                else "no checkpoint was written"
            what = f"loss became {loss}" if not math.isfinite(loss) else f"the MTP loss became {sum(mtp)}"
            raise NanodsError(f"{what} at step {self.step + 1}; stopped without saving ({kept}). "
                              "Try a lower train.lr or train.dtype = \"float32\"")
        if frozen:  # the frozen warm-up: only the indexers learn, the rest (expert biases included) stays
            for name, p in self.model.named_parameters():
                if ".indexer." not in name:
                    p.grad = None
        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
        # before the optimizer step: the bias follows this step's load
        counts = None if frozen else update_expert_bias(self.model, self.world.all_reduce_sum)
        if counts is not None:
            self.expert_counts = counts if self.expert_counts is None else self.expert_counts + counts
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += s.batch_size * s.seq_len
        row = {"loss": loss, "ce": ce, "aux": aux, "lr": s.lr * factor}
        if self.indexed:
            row |= {"indexer": indexer, "dsa_stage": ("dense, frozen" if frozen else "dense") if dense else "sparse"}
            row |= {"indexer_uniform": uniform} if uniform else {}
        return row | ({"mtp": mtp} if mtp else {})

    def _indexer_uniform(self) -> torch.Tensor:
        """(1,) the mean over the indexed attentions that report it of the KL a uniform indexer would have
        had in the last forward (0 without any)."""
        values = [u for m in self.indexed if (u := getattr(m, "indexer_uniform", None)) is not None]
        return torch.stack(values).mean()[None].to(self.device) if values else torch.zeros(1, device=self.device)

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Mean val loss over eval_batches fixed batches, and bits per byte."""
        self.net.eval()
        losses = []
        for i in range(self.settings.eval_batches):  # every rank evaluates the same batches (FSDP needs all)
            x, y = self.val_batches.get(0, i)
            with self.autocast():
                losses.append(self.net(x.to(self.device), y.to(self.device), return_terms=True).ce.float())
        self.net.train()
        val = float(torch.stack(losses).mean())
        return val, val / math.log(2) / self.bytes_per_token

    def expert_load(self) -> list[list[float]] | None:
        if self.expert_counts is None:
            return None
        shares = self.expert_counts / self.expert_counts.sum(-1, keepdim=True).clamp_min(1)
        return [[round(v, 4) for v in row] for row in shares.tolist()]

    def save(self) -> Path:
        """Rank 0 writes the checkpoint pair (under FSDP every rank helps gather the full weights)."""
        s = self.settings
        path = self.out_dir / checkpoint.WEIGHTS
        kept, self.last_good_step = self.last_good_step, self.step
        fsdp = self.world.distributed and s.parallel == "fsdp"
        if not (self.world.is_main or fsdp):
            return path
        weights = full_state_dict(self.model, self.world, s.parallel)
        if not self.world.is_main:
            return path
        # FSDP shards optimizer state; its runs are saved without it (resume them with --init-from)
        state, opt_meta = optim_state.flatten([] if fsdp else self.optimizers)
        meta = {"step": self.step, "total": self.total, "decay_start": self.decay_start, "elapsed": self.elapsed,
                "tokens_seen": self.tokens_seen, "settings": asdict(s), "optimizers": opt_meta,
                "data_fingerprint": self.corpus.fingerprint}
        data = {"corpus": self.corpus.name, "fingerprint": self.corpus.fingerprint, "split": self.corpus.split_rule,
                "tokens_seen": self.tokens_seen}
        try:
            checkpoint.save(self.out_dir, weights, self.model.config, self.tokenizer, self.step, data, state, meta,
                            self.expert_load(), self.run_id)
        except OSError as e:  # a full disk, a quota, a folder made read-only: the previous pair is untouched
            previous = f"the checkpoint of step {kept} is kept" if kept else "no checkpoint was written"
            raise NanodsError(f"could not save step {self.step} in '{self.out_dir}' ({e.strerror or e}); "
                              f"{previous}. Free space or fix the folder, then run again (--resume "
                              "continues a saved run)") from e
        if self.replacing:
            self.run_dir.finish_overwrite()
            self.replacing = False
        return path

    def _replan(self, budget: TimeBudget, step_seconds: float, first: bool) -> None:
        """Fit the total to the time left; every rank plans the same total (the smallest)."""
        step_seconds = self.world.max(step_seconds, self.device)  # the slowest rank's, as the plan uses
        planned = int(self.world.min(budget.plan(self.step, self.total, step_seconds, first), self.device))
        budget.settle(self.step, planned)
        self.decay_start = budget.decay_start
        if not first and self.total == self.settings.steps and planned != self.total:  # the first plan
            self.report.print(f"time budget {self.settings.time_budget}: about {planned} steps at "
                              f"{step_seconds:.2f} s/step (re-planned after every step)")
        self.total = planned

    def run(self) -> int:
        """Train to the planned total (or a stop request); the progress bar ends however this does."""
        try:
            with fast_paths.enabled(self.model, on=self.settings.fast_paths):
                return self._loop()
        finally:
            self.report.close()

    def _loop(self) -> int:
        s = self.settings
        self.model.train()
        # a resumed run keeps the total its budget planned
        budget = TimeBudget(s.budget_seconds, s.steps, s.decay_frac, s.eval_every) \
            if s.time_budget is not None and not self.opts.resume else None
        self.report.begin(self.step, self.total, budget.seconds if budget else None)
        start, first_step, tokens_before = time.perf_counter(), self.step + 1, self.tokens_seen
        with StopFlag() as stop:
            while self.step < self.total:
                t0 = time.perf_counter()
                row = self.train_step()
                dt = time.perf_counter() - t0
                self.elapsed += dt
                if budget is not None:
                    self._replan(budget, dt, first=self.step == first_step)
                tps = s.batch_size * s.seq_len / dt
                mfu = self.flops_per_step / dt / (self.peak * self.world.world_size)  # global batch on N devices
                row.update(step=self.step, tok_per_s=tps, mfu=mfu, tokens=self.tokens_seen, time=round(self.elapsed, 3),
                           wall=round(time.perf_counter() - start, 3))
                self.report.step(row, self.total)
                if self.step % s.eval_every == 0 or self.step == self.total:
                    t1 = time.perf_counter()
                    self.last_eval = self.evaluate()
                    self.report.eval({"step": self.step, "val_loss": self.last_eval[0], "val_bpb": self.last_eval[1],
                                      "train_loss": row["loss"]}, self.expert_load())
                    self.save()
                    self.expert_counts = None  # each eval reports the load of its own interval
                    if budget is not None:
                        budget.eval_took(time.perf_counter() - t1)
                if self.world.any(stop.set, self.device):
                    path = self.save() if self.last_good_step != self.step else self.out_dir / checkpoint.WEIGHTS
                    self.report.close()
                    self.stopped = True
                    self.report.print(f"stopped at step {self.step} of {self.total}; saved {escape(path)}.\n"
                                      f"resume with: nanods train --resume --out {escape(quote(str(self.out_dir)))}")
                    return 128 + stop.signal
        if self.last_good_step != self.step:
            self.save()
        self.report.close()
        if self.step == first_step - 1:
            self.report.print(f"already at step {self.step} of {self.total}: nothing to train "
                              "(--resume --steps N continues to a new total)")
        else:
            self._summary(time.perf_counter() - start, self.tokens_seen - tokens_before)
        return 0

    def _summary(self, wall: float, tokens: int) -> None:
        """This session in one line (tokens and time since it started), also the last row of metrics.jsonl."""
        val_loss, val_bpb = self.last_eval
        self.report.summary({"step": self.step, "summary": True, "wall": round(wall, 3), "tokens": tokens,
                             "tok_per_s": tokens / max(wall, 1e-9), "val_loss": val_loss, "val_bpb": val_bpb,
                             "peak_memory_bytes": peak_memory(self.device)},
                            self._weights_arg())

    def sample(self) -> str:
        """A short sample from the saved model (rank 0), starting a fresh document."""
        if self.settings.sample_tokens <= 0 or not self.world.is_main or self.stopped:
            return ""
        model = self.model if not self.world.distributed else checkpoint.load(self.out_dir / checkpoint.WEIGHTS)[0]
        n = min(self.settings.sample_tokens, model.config.sequence_len - 1)
        idx = torch.tensor([[self.tokenizer.eot_id]], device=model.lm_head.weight.device)
        p = self.sample_settings
        out = model.generate(idx, n, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=self.settings.seed,
                             eos_id=self.tokenizer.eot_id, fast=self.settings.fast_paths)
        return self.tokenizer.decode([t for t in out[0, 1:].tolist() if t != self.tokenizer.eot_id])


def _layer_name(module_name: str) -> str:
    """'blocks.3.ffn' -> 'L3', 'mtp.0.block.ffn' -> 'MTP1' (the expert load's labels)."""
    kind, index = module_name.split(".")[:2]
    return f"L{index}" if kind == "blocks" else f"MTP{int(index) + 1}"


def train(project: Project, run: RunOptions) -> int:
    """Run `nanods train`; returns the exit code."""
    if run.resume:
        project = resumed_project(project, run.explicit, run.scale, run.profile)
    try:
        trainer = Trainer(project, Path(project.train.out), run)
    except BaseException:
        shutdown(together=False)
        raise
    try:
        code = trainer.run()
    except BaseException:
        trainer.close(failing=True)
        shutdown(together=False)
        raise
    trainer.close()
    shutdown()
    text = trainer.sample()
    if text:
        trainer.report.print("[bold]sample:[/]")
        print(printable(text) if sys.stdout.isatty() else text, flush=True)  # model output may hold escape codes
    return code
