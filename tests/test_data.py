import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nanods.data import TOKENS_HEADER, Batches, cache_dir, load_corpus, load_tokenizer, tokenize
from nanods.errors import NanodsError
from nanods.checks import MAX_VOCAB_SIZE
from nanods.tokenizer import byte_tokenizer, train_bpe

TEST_DIRS = {"test", "tests", "idle_test"}


@pytest.fixture(scope="module")
def stdlib():
    return load_corpus("stdlib")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NANODS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def paragraphs(n: int) -> str:
    return "\n\n".join(f"paragraph {i}: def f{i}(x):\n    return x * {i}  # ünïcode 🙂" for i in range(n))


def without_hanging(fn, fifo: Path):
    """fn() in a daemon thread; should it block opening fifo, the FIFO is released so the test fails
    instead of hanging."""
    out = {}

    def target():
        try:
            out["value"] = fn()
        except Exception as e:
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a reader is waiting, so this opens and releases it
        pytest.fail(f"blocked on the FIFO '{fifo}'")
    if "error" in out:
        raise out["error"]
    return out["value"]


needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"),
                                reason="needs FIFOs and /dev/zero")


def test_stdlib_corpus(stdlib):
    names = stdlib.train_names + stdlib.val_names
    assert len(names) > 500 and len(names) == len(stdlib.train) + len(stdlib.val)
    assert all(n.endswith(".py") for n in names)
    for name in names:
        dirs = name.split("/")[:-1]
        assert not {"site-packages", "dist-packages", "__pycache__"} & set(dirs), name
        assert not any(d in TEST_DIRS or d.startswith("test_") for d in dirs), name
    assert 0.02 < len(stdlib.val_names) / len(names) < 0.10
    assert not set(stdlib.train_names) & set(stdlib.val_names)
    assert stdlib.n_bytes > 5_000_000 and stdlib.name == "stdlib" and stdlib.split_rule


def test_stdlib_is_deterministic(stdlib):
    again = load_corpus("stdlib")
    assert again.fingerprint == stdlib.fingerprint
    assert again.val_names == stdlib.val_names and again.train_names == stdlib.train_names


def test_text_file_paragraphs(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(paragraphs(200), encoding="utf-8")
    corpus = load_corpus(str(path))
    assert len(corpus.train) + len(corpus.val) == 200 and corpus.val
    assert all(doc.startswith("paragraph ") for doc in corpus.train + corpus.val)
    assert corpus.n_bytes == sum(len(d.encode()) for d in corpus.train + corpus.val)
    assert "paragraph" in corpus.split_rule
    path.write_text(paragraphs(200) + "\n\nmore", encoding="utf-8")
    assert load_corpus(str(path)).fingerprint != corpus.fingerprint


def test_text_file_lines(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(f"line {i}" for i in range(100)) + "\n", encoding="utf-8")
    corpus = load_corpus(str(path))
    assert sorted(corpus.train + corpus.val) == sorted(f"line {i}" for i in range(100))
    assert "lines" in corpus.split_rule


def test_tiny_corpora_still_have_val(tmp_path):
    two = tmp_path / "two.txt"
    two.write_text("first\nsecond\n", encoding="utf-8")
    corpus = load_corpus(str(two))
    assert len(corpus.train) == 1 and len(corpus.val) == 1
    one = tmp_path / "one.txt"
    one.write_text("x" * 100, encoding="utf-8")
    corpus = load_corpus(str(one))
    assert corpus.train == ["x" * 95] and corpus.val == ["x" * 5]
    assert "single document" in corpus.split_rule


def test_folder(tmp_path):
    root = tmp_path / "src"
    for i in range(60):
        sub = root / f"pkg{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"mod{i}.py").write_text(f"x = {i}\n", encoding="utf-8")
    (root / "notes.md").write_text("# notes\n", encoding="utf-8")
    (root / "data.bin").write_bytes(b"\xff\xfe")  # not a listed extension: ignored
    (root / ".git").mkdir()
    (root / ".git" / "HEAD.txt").write_text("hidden\n", encoding="utf-8")
    corpus = load_corpus(str(root))
    names = corpus.train_names + corpus.val_names
    assert len(names) == 61 and "notes.md" in names and "pkg0/mod0.py" in names
    assert corpus.val_names
    only_md = load_corpus(str(root), extensions=(".md",))
    assert only_md.train + only_md.val == ["# notes", "\n"]  # one document: split by characters
    assert only_md.train_names == only_md.val_names == ["notes.md"]


def test_jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"text": f"document {i}\nwith a\u2028line separator", "id": i} for i in range(100)]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    corpus = load_corpus(str(path))
    assert sorted(corpus.train + corpus.val) == sorted(r["text"] for r in rows)
    assert corpus.val


@pytest.mark.parametrize("content, words", [
    ('{"text": "ok"}\nnot json\n', ["line 2", "not valid JSON"]),
    ('{"text": "ok"}\n{"body": "x"}\n', ["line 2", '"text"']),
    ('{"text": 3}\n', ["line 1", '"text"']),
])
def test_jsonl_errors(tmp_path, content, words):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(NanodsError) as err:
        load_corpus(str(path))
    assert all(w in str(err.value) for w in words)


def test_corpus_errors(tmp_path):
    with pytest.raises(NanodsError, match="data path '.*nope' not found"):
        load_corpus(str(tmp_path / "nope"))
    with pytest.raises(NanodsError, match="did you mean 'stdlib'"):
        load_corpus("stdlb")
    (tmp_path / "empty.txt").write_text("\n\n  \n", encoding="utf-8")
    with pytest.raises(NanodsError, match="no documents"):
        load_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.csv").write_text("1,2\n", encoding="utf-8")
    with pytest.raises(NanodsError, match="no documents"):
        load_corpus(str(tmp_path / "folder"))
    (tmp_path / "folder" / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(NanodsError, match="latin1.txt' is not UTF-8"):
        load_corpus(str(tmp_path / "folder"))


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("NANODS_CACHE", raising=False)
    assert cache_dir().parts[-2:] == (".cache", "nanods")
    monkeypatch.setenv("NANODS_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path


def test_load_tokenizer(tmp_path, cache):
    path = tmp_path / "book.txt"
    path.write_text(paragraphs(100), encoding="utf-8")
    corpus = load_corpus(str(path))
    assert load_tokenizer(corpus, "byte", 999).kind == "byte"
    bpe = load_tokenizer(corpus, "bpe", 320)
    stored = cache / "tokenizers" / f"{corpus.fingerprint}-bpe320.json"
    assert stored.exists() and not list(stored.parent.glob(".*.tmp"))
    assert load_tokenizer(corpus, "bpe", 320).fingerprint() == bpe.fingerprint()
    with pytest.raises(NanodsError, match="did you mean 'bpe'"):
        load_tokenizer(corpus, "bpee", 320)


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_tokenize_is_cached(tmp_path, cache, kind):
    path = tmp_path / "book.txt"
    path.write_text(paragraphs(300), encoding="utf-8")
    corpus = load_corpus(str(path))
    tok = load_tokenizer(corpus, kind, 400)
    splits = tokenize(corpus, tok)
    assert splits.train.dtype == np.uint16
    expected = [i for doc in corpus.val for i in tok.encode(doc) + [tok.eot_id]]
    assert splits.val.tolist() == expected
    assert (splits.train == tok.eot_id).sum() == len(corpus.train)
    files = sorted((cache / "tokens").iterdir())
    assert [f.name.rsplit("-", 1)[-1] for f in files] == ["train.tokens", "val.tokens"]
    mtimes = [f.stat().st_mtime_ns for f in files]
    start = time.perf_counter()
    again = tokenize(corpus, tok)
    assert time.perf_counter() - start < 0.5
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # read back, not rebuilt
    assert np.array_equal(again.train, splits.train) and np.array_equal(again.val, splits.val)


def test_batches():
    tokens = np.arange(10_000, dtype=np.uint16)
    batches = Batches(tokens, batch_size=8, micro_batch_size=4, seq_len=16, seed=1)
    x, y = batches.get(5)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # arange: the target is the next token
    assert torch.equal(x, Batches(tokens, 8, 4, 16, seed=1).get(5)[0])  # a resumed run sees the same batch
    assert not torch.equal(x, batches.get(6)[0])
    assert not torch.equal(x, batches.get(5, micro=1)[0])
    assert not torch.equal(x, Batches(tokens, 8, 4, 16, seed=2).get(5)[0])


def test_ranks_and_micro_batches_split_the_same_global_batch():
    tokens = np.random.default_rng(0).integers(0, 300, 5_000).astype(np.uint16)
    one = Batches(tokens, 12, 2, 8, seed=0)  # one process, 6 micro-batches
    single = torch.cat([one.get(7, m)[0] for m in range(6)])
    ranks = [Batches(tokens, 12, 2, 8, seed=0, rank=r, world_size=3) for r in range(3)]  # 2 micro each
    assert torch.equal(single, torch.cat([b.get(7, m)[0] for b in ranks for m in range(2)]))
    assert not torch.equal(ranks[0].get(7)[0], ranks[1].get(7)[0])
    assert torch.equal(Batches(tokens, 12, 12, 8, seed=0).get(7)[0], single)  # no accumulation: same rows


def test_batches_edge_cases():
    x, y = Batches(np.arange(9, dtype=np.uint16), 3, 3, 8, seed=0).get(0)  # exactly seq_len + 1 tokens
    assert x[0].tolist() == list(range(8)) and y[0].tolist() == list(range(1, 9))
    with pytest.raises(NanodsError, match="the train split has 8 tokens.*smaller train.seq_len or more data"):
        Batches(np.arange(8, dtype=np.uint16), 1, 1, 8, seed=0)
    with pytest.raises(ValueError, match="rank"):
        Batches(np.arange(100, dtype=np.uint16), 2, 1, 8, seed=0, rank=2, world_size=2)
    with pytest.raises(NanodsError, match="multiple of micro_batch_size"):
        Batches(np.arange(100, dtype=np.uint16), 6, 4, 8, seed=0)


def test_tokenize_then_batch(tmp_path, cache):
    path = tmp_path / "book.txt"
    path.write_text(paragraphs(50), encoding="utf-8")
    corpus = load_corpus(str(path))
    tok = byte_tokenizer()
    train = tokenize(corpus, tok).train
    x, y = Batches(train, 2, 2, 32, seed=0).get(0)
    assert tok.decode(x[0].tolist())[1:] == tok.decode(y[0].tolist())[:-1]


@needs_fifo
def test_folder_skips_what_is_not_a_regular_file(tmp_path, monkeypatch):
    monkeypatch.setattr("nanods.data.MAX_CORPUS_BYTES", 10_000)  # should /dev/zero be read after all, stop soon
    root = tmp_path / "src"
    root.mkdir()
    (root / "a.txt").write_text("alpha\n", encoding="utf-8")
    (root / "b.md").write_text("beta\n", encoding="utf-8")
    os.mkfifo(root / "pipe.txt")
    (root / "zero.txt").symlink_to("/dev/zero")
    (root / "gone.txt").symlink_to(tmp_path / "missing.txt")
    (root / "link.txt").symlink_to(root / "pipe.txt")
    corpus = without_hanging(lambda: load_corpus(str(root)), root / "pipe.txt")
    assert sorted(corpus.train_names + corpus.val_names) == ["a.txt", "b.md"]
    assert corpus.notes == ["skipped 'gone.txt': a broken symlink, not a regular file",
                            "skipped 'link.txt': a symlink to a FIFO, not a regular file",
                            "skipped 'pipe.txt': a FIFO, not a regular file",
                            "skipped 'zero.txt': a symlink to a character device, not a regular file"]
    for name in ("a.txt", "b.md", "gone.txt", "link.txt"):
        (root / name).unlink()
    with pytest.raises(NanodsError, match="no documents.*skipped 'pipe.txt': a FIFO.* and 1 more like it"):
        without_hanging(lambda: load_corpus(str(root)), root / "pipe.txt")


@needs_fifo
def test_data_path_must_be_a_regular_file_or_folder(tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    with pytest.raises(NanodsError, match="pipe.txt' is a FIFO, not a regular file or folder: point data at"):
        without_hanging(lambda: load_corpus(str(fifo)), fifo)
    zero = tmp_path / "zero.txt"
    zero.symlink_to("/dev/zero")
    with pytest.raises(NanodsError, match="zero.txt' is a symlink to a character device, not a regular file or"):
        load_corpus(str(zero))


def test_corpus_size_limit(tmp_path, monkeypatch):
    monkeypatch.setattr("nanods.data.MAX_CORPUS_BYTES", 100)
    (tmp_path / "exact.txt").write_text("x" * 100, encoding="utf-8")
    assert load_corpus(str(tmp_path / "exact.txt")).n_bytes == 100
    (tmp_path / "big.txt").write_text("x" * 101, encoding="utf-8")
    with pytest.raises(NanodsError, match=r"big.txt' is 101 bytes, over the corpus limit of 100 bytes"):
        load_corpus(str(tmp_path / "big.txt"))
    root = tmp_path / "src"
    root.mkdir()
    for name in ("a.txt", "b.txt"):
        (root / name).write_text("y" * 60, encoding="utf-8")
    with pytest.raises(NanodsError, match=r"b.txt' is 60 bytes and the files read before it 60 bytes, over the "
                                          r"corpus limit of 100 bytes"):
        load_corpus(str(root))
    if Path("/proc/self/status").exists():  # reports size 0 but holds far more than 100 bytes
        with pytest.raises(NanodsError, match=r"status' is more than 100 bytes, over the corpus limit"):
            load_corpus("/proc/self/status")


def cut_in_half(data: bytes) -> bytes:
    return data[:len(data) // 2]


@pytest.mark.parametrize("damage", [
    cut_in_half,
    lambda data: data[TOKENS_HEADER.size:],  # the old headerless format
    lambda data: data[:10],  # shorter than a header
    lambda data: data + b"\0\0",
    lambda data: data[:8] + b"\x09" + data[9:],  # another format version
    lambda data: data.replace(b"<u2", b"<u4", 1),
    lambda data: data[:TOKENS_HEADER.size] + b"\xff" * (len(data) - TOKENS_HEADER.size),  # ids past the vocabulary
], ids=["cut", "headerless", "shorter-than-header", "extra-bytes", "other-version", "other-dtype", "ids-out-of-range"])
def test_damaged_token_cache_is_rebuilt(tmp_path, cache, damage):
    path = tmp_path / "book.txt"
    path.write_text(paragraphs(100), encoding="utf-8")
    corpus, tok = load_corpus(str(path)), byte_tokenizer()
    splits = tokenize(corpus, tok)
    train_file = next((cache / "tokens").glob("*-train.tokens"))
    good = train_file.read_bytes()
    train_file.unlink()  # a new file: writing over the memmapped one in place would break `splits`
    train_file.write_bytes(damage(good))
    notes = []
    again = tokenize(corpus, tok, note=notes.append)
    assert len(notes) == 1 and f"'{train_file}' is damaged" in notes[0] and "rebuilding it" in notes[0]
    assert train_file.read_bytes() == good and np.array_equal(again.train, splits.train)
    assert not list(train_file.parent.glob(".*.tmp"))
    tokenize(corpus, tok, note=notes.append)
    assert len(notes) == 1  # a sound cache is used silently


def test_damaged_tokenizer_cache_is_retrained(tmp_path, cache):
    path = tmp_path / "book.txt"
    path.write_text(paragraphs(60), encoding="utf-8")
    corpus = load_corpus(str(path))
    bpe = load_tokenizer(corpus, "bpe", 300)
    stored = cache / "tokenizers" / f"{corpus.fingerprint}-bpe300.json"
    good = stored.read_bytes()
    for damaged in (cut_in_half(good), b"\xff\xfe" + good, b'{"model": {"type": "BPE"}}'):
        stored.write_bytes(damaged)
        notes = []
        assert load_tokenizer(corpus, "bpe", 300, note=notes.append).fingerprint() == bpe.fingerprint()
        assert len(notes) == 1 and f"the cached tokenizer '{stored}' is damaged" in notes[0]
        assert stored.read_bytes() == good
    load_tokenizer(corpus, "bpe", 300, notes.append)
    assert len(notes) == 1


def test_short_split_is_named():
    with pytest.raises(NanodsError, match=r"the val split has 21 tokens \(val is about 5% of the corpus\) but a "
                                          r"sequence of 128 needs at least 129; use a smaller train.seq_len"):
        Batches(np.arange(21, dtype=np.uint16), 1, 1, 128, seed=0, split="val")
    with pytest.raises(NanodsError, match="the train split has 21 tokens but"):
        Batches(np.arange(21, dtype=np.uint16), 1, 1, 128, seed=0)


def test_bpe_vocab_size_is_bounded():
    start = time.perf_counter()
    for size in (MAX_VOCAB_SIZE + 1, 10**9):
        with pytest.raises(NanodsError, match=r"model.vocab_size \(.*\) is above the BPE maximum of 1,048,576"):
            train_bpe(["some text"], size)
    assert time.perf_counter() - start < 1  # refused before any training


def test_a_cache_that_is_not_a_folder_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("x")
    monkeypatch.setenv("NANODS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(NanodsError, match=r"the cache '.*cache' is not a folder; point NANODS_CACHE at a folder"):
        tokenize(load_corpus("stdlib"), byte_tokenizer())
