"""Corpora, cached tokenization and the deterministic batch sampler.

The default corpus is the running interpreter's standard library, so training needs no download.
Splits are decided by hashing each file's relative path (or each document's text), so a file
never moves between train and val when others are added or removed.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import platform
import re
import stat
import struct
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from nanods.atomic import atomic_write
from nanods.errors import NanodsError, did_you_mean
from nanods.device import physical_memory
from nanods.tokenizer import Tokenizer, byte_tokenizer, train_bpe

VAL_FRACTION = 0.05
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
TOKENIZER_KINDS = ("bpe", "byte")
NOT_REGULAR = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))
# Token cache files: magic, format version, numpy dtype string (e.g. "<u2"), token count; then the ids.
TOKENS_HEADER = struct.Struct("<8sI4sQ")
TOKENS_MAGIC, TOKENS_VERSION = b"NANODSTK", 1


# The corpus is held as Python strings and tokenized in memory, several copies at a time.
MAX_CORPUS_BYTES = (physical_memory() or 16 * 2**30) // 4  # 16 GiB where the OS does not say


@dataclass
class Corpus:
    """A text corpus split into train and val documents.

    train_names/val_names are the files' relative paths for folder corpora (stdlib included; a lone
    file is in both, cut by characters), empty otherwise; skipped lists stdlib files left out
    because they are not UTF-8; notes says which folder entries were skipped because they are not
    regular files (FIFOs, devices, sockets, broken symlinks). n_bytes is the UTF-8 size of all documents.
    """

    name: str
    fingerprint: str
    split_rule: str
    train: list[str]
    val: list[str]
    n_bytes: int
    train_names: list[str] = field(default_factory=list)
    val_names: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class TokenSplits:
    """Each split's documents as one id array, every document followed by <|endoftext|>."""

    train: np.ndarray
    val: np.ndarray


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hash_share(key: str) -> float:
    """Where key's hash falls in [0, 1): the split coordinate of a file or document."""
    return int(_sha256(key.encode())[:8], 16) / 2**32


def _split(keys: list[str]) -> tuple[list[int], list[int], bool]:
    """(train indices, val indices, adjusted) for two or more keys: val = the keys hashing into the
    lowest VAL_FRACTION, but never none nor all of them (then `adjusted` is True)."""
    shares = [_hash_share(k) for k in keys]
    by_share = sorted(range(len(keys)), key=shares.__getitem__)
    n_hashed = sum(s < VAL_FRACTION for s in shares)
    n_val = min(max(n_hashed, 1), len(keys) - 1)
    val = set(by_share[:n_val])
    return [i for i in range(len(keys)) if i not in val], sorted(val), n_val != n_hashed


def _pick(items: list[str], indices: list[int]) -> list[str]:
    return [items[i] for i in indices]


def _build(name: str, fingerprint: str, rule: str, docs: list[str], keys: list[str],
           names: list[str] | None = None, skipped: list[str] | None = None, notes: list[str] | None = None,
           looked_for: str = "text") -> Corpus:
    """Split docs by their keys' hashes into a Corpus; a single document is cut by characters."""
    names, skipped, notes = names or [], skipped or [], notes or []
    if not docs:
        also = f"; {notes[0]}" if notes else ""  # say why, when every file was skipped
        if len(notes) > 1:
            also += f" and {len(notes) - 1} more like it"
        raise NanodsError(f"no documents found in '{name}' (looked for non-empty {looked_for}{also}); "
                          "point data at a corpus with some text")
    n_bytes = sum(len(d.encode()) for d in docs)
    if len(docs) == 1:
        cut = min(len(docs[0]) - 1, max(1, round(len(docs[0]) * (1 - VAL_FRACTION))))  # both sides non-empty
        return Corpus(name, fingerprint, "a single document: first 95 % of its characters train, the rest val",
                      [docs[0][:cut]], [docs[0][cut:]], n_bytes, names, names, skipped, notes)
    train, val, adjusted = _split(keys)
    if adjusted:
        rule += f" (adjusted to {len(val)} of {len(docs)} so both splits are non-empty)"
    return Corpus(name, fingerprint, rule, _pick(docs, train), _pick(docs, val), n_bytes,
                  _pick(names, train) if names else [], _pick(names, val) if names else [], skipped, notes)


def _walk(root: Path, skip_dir: Callable[[str], bool], keep_file: Callable[[str], bool]) -> Iterator[tuple[str, Path]]:
    """(posix relative path, path) of the files under root, in sorted order so corpora are deterministic."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not skip_dir(d))
        for name in sorted(filenames):
            if keep_file(name):
                path = Path(dirpath, name)
                yield path.relative_to(root).as_posix(), path


def _not_regular(path: Path) -> str | None:
    """What path is when it is not a regular file, symlinks followed (e.g. "a FIFO"); None when it is one."""
    try:
        mode = path.stat().st_mode
    except OSError:
        if not path.is_symlink():
            raise
        return "a broken symlink"  # its target is missing, or it loops
    if stat.S_ISREG(mode):
        return None
    kind = next((what for is_kind, what in NOT_REGULAR if is_kind(mode)), "a special file")
    return f"a symlink to {kind}" if path.is_symlink() else kind


def _read_capped(path: Path, used: int = 0) -> bytes:
    """A regular file's bytes, refused before they take the corpus (used bytes so far) past MAX_CORPUS_BYTES."""
    room = MAX_CORPUS_BYTES - used
    size = path.stat().st_size
    data = b""
    if size <= room:
        with path.open("rb") as f:
            data = f.read(size + 1)  # read(n) allocates n bytes up front: ask for what stat says
            if len(data) > size:  # the size lied (files under /proc report 0) or grew: read on, still bounded
                data += f.read(room + 1 - len(data))
        if len(data) <= room:
            return data
    size_text = f"{size:,} bytes" if size > room else f"more than {room:,} bytes"
    others = f" and the files read before it {used:,} bytes" if used else ""
    raise NanodsError(f"'{path}' is {size_text}{others}, over the corpus limit of {MAX_CORPUS_BYTES:,} bytes "
                      "(a quarter of this machine's memory, as the corpus is tokenized in memory); use less data")


def _read_files(name: str, files: Iterator[tuple[str, Path]], tag: str, strict: bool, looked_for: str) -> Corpus:
    """A corpus of whole files split by relative-path hash; non-UTF-8 files are an error when strict,
    else skipped and listed; entries that are not regular files are skipped with a note."""
    docs, names, skipped, notes = [], [], [], []
    digest = hashlib.sha256(tag.encode())
    used = 0
    for rel, path in files:
        if what := _not_regular(path):  # opening a FIFO can block forever, and /dev/zero never ends
            notes.append(f"skipped '{rel}': {what}, not a regular file")
            continue
        raw = _read_capped(path, used)
        used += len(raw)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if strict:
                raise NanodsError(f"'{path}' is not UTF-8 text ({e.reason} at byte {e.start}); "
                                  "convert it or remove it from the data folder") from e
            skipped.append(rel)
            continue
        if text:
            docs.append(text)
            names.append(rel)
            digest.update(f"\0{rel}\0{_sha256(raw)}".encode())
    rule = f"val = files whose sha256(relative path) falls in the lowest {VAL_FRACTION:.0%}"
    return _build(name, digest.hexdigest()[:16], rule, docs, names, names, skipped, notes, looked_for)


def _stdlib_skip(dirname: str) -> bool:
    return dirname in STDLIB_SKIP_DIRS or dirname.startswith("test_")


def _folder_skip(dirname: str) -> bool:
    return dirname.startswith(".") or dirname == "__pycache__"


def _stdlib() -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = _walk(root, _stdlib_skip, lambda f: f.endswith(".py"))
    return _read_files("stdlib", files, f"stdlib {platform.python_version()}", strict=False,
                       looked_for=f".py files under {root}")


def _read_text(path: Path) -> str:
    try:
        return _read_capped(path).decode("utf-8")
    except UnicodeDecodeError as e:
        raise NanodsError(f"'{path}' is not UTF-8 text ({e.reason} at byte {e.start}); convert it first") from e


def _documents(spec: str, tag: str, docs: list[str], unit: str, raw: str) -> Corpus:
    """A corpus of documents from one file, split by each document's hash."""
    rule = f"val = {unit} whose sha256(text) falls in the lowest {VAL_FRACTION:.0%}"
    return _build(spec, _sha256(f"{tag}\0{raw}".encode())[:16], rule, docs, docs)


def _jsonl(spec: str, path: Path) -> Corpus:
    raw = _read_text(path)
    docs = []
    for n, line in enumerate(raw.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise NanodsError(f"line {n} of '{path}' is not valid JSON ({e.msg}); each line must be "
                              '{"text": "..."}') from e
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise NanodsError(f'line {n} of \'{path}\' has no "text" string field; each line must be '
                              '{"text": "..."}')
        if obj["text"]:
            docs.append(obj["text"])
    return _documents(spec, "jsonl", docs, "documents", raw)


def _text_file(spec: str, path: Path) -> Corpus:
    raw = _read_text(path)
    paragraphs = [p for p in re.split(r"\r?\n\s*\n", raw) if p.strip()]
    if len(paragraphs) > 1:
        return _documents(spec, "paragraphs", paragraphs, "paragraphs (split at blank lines)", raw)
    return _documents(spec, "lines", [ln for ln in raw.splitlines() if ln.strip()], "lines", raw)


def load_corpus(spec: str = "stdlib", extensions: tuple[str, ...] = (".py", ".txt", ".md")) -> Corpus:
    """The corpus named by spec: "stdlib", a .jsonl file ({"text": ...} per line), any other file
    (plain text: paragraphs, or lines when there are no blank lines), or a folder (its regular files
    ending in one of extensions, recursively; hidden entries and __pycache__ are skipped, other kinds
    of entries too, with a note in Corpus.notes)."""
    if spec == "stdlib":
        return _stdlib()
    path = Path(spec).expanduser()
    if not path.exists():
        raise NanodsError(f"data path '{spec}' not found{did_you_mean(spec, ['stdlib'])}; use 'stdlib', "
                          "a .txt or .jsonl file, or a folder of text files")
    if path.is_dir():
        files = _walk(path, _folder_skip, lambda f: not f.startswith(".") and f.endswith(extensions))
        return _read_files(spec, files, f"folder {' '.join(extensions)}", strict=True,
                           looked_for=f"files ending in {', '.join(extensions)}")
    if what := _not_regular(path):
        raise NanodsError(f"'{spec}' is {what}, not a regular file or folder: point data at a text file, "
                          "a .jsonl file or a folder of text files")
    if path.suffix == ".jsonl":
        return _jsonl(spec, path)
    return _text_file(spec, path)


def _silent(message: str) -> None:
    """The default `note`: callers that do not show notes drop them."""


def cache_dir() -> Path:
    """Where tokenizers and token files are cached: $NANODS_CACHE, else ~/.cache/nanods."""
    path = Path(os.environ.get("NANODS_CACHE") or "~/.cache/nanods").expanduser()
    if path.exists() and not path.is_dir():
        raise NanodsError(f"the cache '{path}' is not a folder; point NANODS_CACHE at a folder (or unset it)")
    return path


def load_tokenizer(corpus: Corpus, kind: str, vocab_size: int, note: Callable[[str], None] = _silent) -> Tokenizer:
    """The byte tokenizer (vocab_size ignored), or a BPE of vocab_size trained on corpus.train, cached
    by corpus fingerprint so each corpus trains it once; a damaged cached file is retrained and
    reported through note."""
    if kind == "byte":
        return byte_tokenizer()
    if kind != "bpe":
        raise NanodsError(f"unknown tokenizer '{kind}'{did_you_mean(kind, TOKENIZER_KINDS)}; "
                          f"choose one of {', '.join(TOKENIZER_KINDS)}")
    path = cache_dir() / "tokenizers" / f"{corpus.fingerprint}-bpe{vocab_size}.json"
    if path.exists():
        try:
            return Tokenizer.from_json(path.read_text(encoding="utf-8"))
        except Exception as e:  # from_json's NanodsError, bad UTF-8, or the bare Exception `tokenizers` raises
            note(f"the cached tokenizer '{path}' is damaged ({str(e).splitlines()[0]}); training it again")
    tokenizer = train_bpe(corpus.train, vocab_size)
    atomic_write(path, lambda f: f.write(tokenizer.to_json().encode()))
    return tokenizer


def _token_dtype(tokenizer: Tokenizer) -> type[np.unsignedinteger]:
    return np.uint16 if len(tokenizer) <= 2**16 else np.uint32


def _tokens_header(dtype: type[np.unsignedinteger], count: int) -> bytes:
    return TOKENS_HEADER.pack(TOKENS_MAGIC, TOKENS_VERSION, np.dtype(dtype).str.encode(), count)


def _write_tokens(f: BinaryIO, docs: list[str], tokenizer: Tokenizer, dtype: type[np.unsignedinteger],
                  chunk: int = 256) -> None:
    """Stream a header and docs' ids (each followed by eot) to f, encoding a chunk of documents at a
    time; the header's count is filled in last, so a file cut short never matches it."""
    f.write(_tokens_header(dtype, 0))
    count = 0
    for start in range(0, len(docs), chunk):
        ids = tokenizer.encode_batch(docs[start:start + chunk])
        flat = itertools.chain.from_iterable(itertools.chain(d, (tokenizer.eot_id,)) for d in ids)
        n = sum(map(len, ids)) + len(ids)
        np.fromiter(flat, dtype=dtype, count=n).tofile(f)
        count += n
    f.seek(0)
    f.write(_tokens_header(dtype, count))


def _tokens_damage(path: Path, dtype: type[np.unsignedinteger]) -> str | None:
    """What is wrong with the token file at path (header or size), or None when it can be used."""
    with path.open("rb") as f:
        head = f.read(TOKENS_HEADER.size)
        size = os.fstat(f.fileno()).st_size
    if len(head) < TOKENS_HEADER.size:
        return f"{size:,} bytes, shorter than its header"
    magic, version, stored, count = TOKENS_HEADER.unpack(head)
    if (magic, version) != (TOKENS_MAGIC, TOKENS_VERSION):
        return "not a token file of this nanods version"
    stored = stored.rstrip(b"\0").decode(errors="replace")  # struct pads the dtype string with NULs
    if stored != np.dtype(dtype).str:
        return f"ids stored as {stored!r}, expected {np.dtype(dtype).str!r}"
    expected = TOKENS_HEADER.size + count * np.dtype(dtype).itemsize
    return None if size == expected else f"{size:,} bytes where its header promises {expected:,}"


def _open_tokens(path: Path, dtype: type[np.unsignedinteger]) -> np.ndarray:
    return np.memmap(path, dtype=dtype, mode="r", offset=TOKENS_HEADER.size)


def _cached_tokens(path: Path, dtype: type[np.unsignedinteger], vocab: int,
                   note: Callable[[str], None]) -> np.ndarray | None:
    """The token file at path when it is usable (every id below vocab: an id past the embedding would index
    out of bounds); None when missing, and a damaged one is reported through note."""
    if not path.exists():
        return None
    damage = _tokens_damage(path, dtype)
    tokens = None if damage else _open_tokens(path, dtype)
    if tokens is not None and len(tokens) and int(tokens.max()) >= vocab:
        damage, tokens = f"id {int(tokens.max())} is outside the tokenizer's {vocab} ids", None
    if damage:
        note(f"the token cache '{path}' is damaged ({damage}); rebuilding it")
    return tokens


def tokenize(corpus: Corpus, tokenizer: Tokenizer, note: Callable[[str], None] = _silent) -> TokenSplits:
    """Both splits as read-only memmaps, built once and cached by corpus and tokenizer fingerprints; a
    damaged cache file is rebuilt and reported through note."""
    dtype = _token_dtype(tokenizer)
    arrays = {}
    for split in ("train", "val"):
        path = cache_dir() / "tokens" / f"{corpus.fingerprint}-{tokenizer.fingerprint()}-{split}.tokens"
        arrays[split] = _cached_tokens(path, dtype, len(tokenizer), note)
        if arrays[split] is None:
            atomic_write(path, functools.partial(_write_tokens, docs=getattr(corpus, split),
                                                  tokenizer=tokenizer, dtype=dtype))
            arrays[split] = _open_tokens(path, dtype)
    return TokenSplits(**arrays)


class Batches:
    """Deterministic (x, y) micro-batches: step `step` depends only on (seed, step), so a resumed run
    sees exactly the batches the uninterrupted run would have. `split` names the tokens' split in errors.

    Each step draws the offsets of its whole global batch (batch_size rows) once; rank r's micro-batch
    m takes the rows of block r * accum + m. One process accumulating over all blocks and world_size
    ranks each accumulating over their share therefore see the same rows.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, micro_batch_size: int, seq_len: int, seed: int,
                 rank: int = 0, world_size: int = 1, split: str = "train"):
        if len(tokens) < seq_len + 1:
            share = f" (val is about {VAL_FRACTION:.0%} of the corpus)" if split == "val" else ""
            raise NanodsError(f"the {split} split has {len(tokens):,} tokens{share} but a sequence of {seq_len} "
                              f"needs at least {seq_len + 1}; use a smaller train.seq_len or more data")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size % (micro_batch_size * world_size):
            raise NanodsError(f"train.batch_size ({batch_size}) must be a multiple of micro_batch_size "
                              f"({micro_batch_size}) x processes ({world_size})")
        self.tokens = tokens
        self.batch_size, self.micro, self.seq_len, self.seed = batch_size, micro_batch_size, seq_len, seed
        self.rank = rank
        self.accum = batch_size // (micro_batch_size * world_size)  # micro-batches per rank and step

    def get(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 tensors of shape (micro_batch_size, seq_len) on the CPU; y is x shifted by one."""
        key = _sha256(f"nanods-batches {self.seed} {step}".encode())
        generator = torch.Generator().manual_seed(int(key[:16], 16))
        n_starts = len(self.tokens) - self.seq_len  # the last start still leaves room for the target
        offsets = torch.randint(n_starts, (self.batch_size,), generator=generator)
        block = self.rank * self.accum + micro
        mine = offsets[block * self.micro:(block + 1) * self.micro].tolist()
        rows = np.stack([self.tokens[o:o + self.seq_len + 1] for o in mine]).astype(np.int64)
        buf = torch.from_numpy(rows)
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()
