import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanods.errors import NanodsError
from nanods.tokenizer import EOT, StreamDecoder, Tokenizer, byte_tokenizer, train_bpe

SAMPLE = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\r\n\tdef __init__(self, x):\r\n\t\tself.x = x\r\n",
    "héllo wörld, 世界 🙂 — ünïcödé text repeated " * 3,
    "  leading spaces and trailing   \n\n\n",
] * 40

cases = settings(max_examples=200, deadline=None)


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe(SAMPLE, 300)


@pytest.fixture(scope="module", params=["byte", "bpe"])
def tok(request, bpe) -> Tokenizer:
    return bpe if request.param == "bpe" else byte_tokenizer()


@cases
@given(st.text())
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < len(tok) and i != tok.eot_id for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode()


@cases
@given(st.lists(st.text(), max_size=5))
def test_encode_batch_matches_encode(tok, texts):
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


@pytest.mark.parametrize("text", ["", " leading", "a\r\nb\tc", "<|endoftext|>", "x<|endoftext|>y", "🙂" * 3])
def test_edge_cases_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.eot_id not in ids  # the special string inside a document is ordinary text


def test_sizes_and_eot(tok, bpe):
    assert tok.decode([tok.eot_id]) == EOT
    assert tok.decode(tok.encode("a") + [tok.eot_id]) == "a" + EOT
    byte = byte_tokenizer()
    assert (byte.kind, len(byte), byte.eot_id) == ("byte", 257, 256)
    assert bpe.kind == "bpe" and 257 < len(bpe) <= 300
    assert len(bpe.encode(SAMPLE[0])) < len(SAMPLE[0])  # merges were learned


def test_json_round_trip(tok):
    text = "".join(SAMPLE[:4])
    again = Tokenizer.from_json(tok.to_json())
    assert again.kind == tok.kind and len(again) == len(tok) and again.eot_id == tok.eot_id
    assert again.encode(text) == tok.encode(text)
    assert again.to_json() == tok.to_json() and again.fingerprint() == tok.fingerprint()


def test_fingerprints_differ(bpe):
    assert bpe.fingerprint() != byte_tokenizer().fingerprint()
    assert train_bpe(SAMPLE, 280).fingerprint() != bpe.fingerprint()


def test_stream_decoder_holds_back_partial_characters():
    tok = byte_tokenizer()
    text = "héllo 世界 🙂"
    stream = StreamDecoder(tok)
    pieces = [stream.push([i]) for i in tok.encode(text)]
    assert "".join(pieces) + stream.flush() == text
    assert "\ufffd" not in "".join(pieces)
    assert pieces[1] == "" and pieces[2] == "é"  # é is two bytes: nothing until the second arrives


@cases
@given(st.text(), st.integers(1, 4))
def test_stream_decoder_any_chunking(tok, text, chunk):
    ids = tok.encode(text) + [tok.eot_id]
    stream = StreamDecoder(tok)
    out = "".join(stream.push(ids[i:i + chunk]) for i in range(0, len(ids), chunk)) + stream.flush()
    assert out == tok.decode(ids)


def test_stream_decoder_flushes_invalid_bytes():
    stream = StreamDecoder(byte_tokenizer())
    assert stream.push([0xE4, 0xB8]) == ""  # the first two of 世's three bytes
    assert stream.flush() == "\ufffd"
    assert stream.push(list("ok".encode())) == "ok"


def test_errors(bpe):
    with pytest.raises(ValueError, match="outside"):
        bpe.decode([len(bpe)])
    with pytest.raises(NanodsError, match="byte"):
        train_bpe(SAMPLE, 257)
    with pytest.raises(NanodsError, match="not valid JSON"):
        Tokenizer.from_json("{")
    with pytest.raises(NanodsError, match="neither"):
        Tokenizer.from_json('{"kind": "wordpiece"}')
