"""Tokenizers: a byte-level BPE trained on the corpus, or plain bytes; both lossless on any text.

Encoding goes through the `tokenizers` library (BPE) or `str.encode` (bytes). Decoding always goes
through one table id -> bytes, so `decode` is the exact inverse of `encode` and a stream of ids
can be turned into text incrementally (see StreamDecoder).
"""

from __future__ import annotations

import codecs
import hashlib
import json
from collections.abc import Iterable, Sized

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from nanods.checks import MAX_VOCAB_SIZE
from nanods.errors import NanodsError

EOT = "<|endoftext|>"
N_BYTES = 256


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character, the alphabet of byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(N_BYTES):
        if b not in mapping:
            mapping[b] = chr(N_BYTES + extra)
            extra += 1
    return mapping


class Tokenizer:
    """A byte-level BPE (`kind == "bpe"`) or a byte tokenizer (`kind == "byte"`: ids 0..255 are bytes,
    256 is <|endoftext|>). Any str without lone surrogates round-trips: decode(encode(s)) == s."""

    def __init__(self, hf: HFTokenizer | None = None):
        """A byte tokenizer, or a BPE wrapping a trained byte-level `tokenizers.Tokenizer`."""
        self.kind = "byte" if hf is None else "bpe"
        self._hf = hf
        if hf is None:
            self._id_bytes = [bytes([b]) for b in range(N_BYTES)] + [EOT.encode()]
            self.eot_id = N_BYTES
            return
        # The text "<|endoftext|>" inside a document is ordinary text; only eot_id marks a boundary.
        hf.encode_special_tokens = True
        eot_id = hf.token_to_id(EOT)
        if eot_id is None:
            raise NanodsError(f"the stored BPE tokenizer has no {EOT} token; retrain it (delete the cached file)")
        self.eot_id = eot_id
        char_byte = {c: b for b, c in byte_to_unicode().items()}
        special = {tok.content for tok in hf.get_added_tokens_decoder().values()}
        vocab = hf.get_vocab(with_added_tokens=True)
        self._id_bytes = [b""] * len(vocab)
        for token, i in vocab.items():
            self._id_bytes[i] = token.encode() if token in special else bytes(char_byte[c] for c in token)

    def __len__(self) -> int:
        """The real vocabulary size, <|endoftext|> included (the model pads its own to a multiple of 64)."""
        return len(self._id_bytes)

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, size={len(self)}, fingerprint={self.fingerprint()!r})"

    def encode(self, text: str) -> list[int]:
        """The ids of text; no <|endoftext|> is added."""
        if self._hf is None:
            return list(text.encode())
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() of each text, in parallel for BPE."""
        if self._hf is None:
            return [list(t.encode()) for t in texts]
        return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of ids (which may end inside a multi-byte character)."""
        ids = [int(i) for i in ids]
        if ids and not (0 <= min(ids) and max(ids) < len(self)):
            bad = next(i for i in ids if not 0 <= i < len(self))
            raise ValueError(f"token id {bad} is outside this tokenizer's vocabulary (size {len(self)})")
        return b"".join([self._id_bytes[i] for i in ids])

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ids; invalid UTF-8 (only possible for a partial or arbitrary id sequence) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        """A self-contained description for checkpoint metadata; BPE is the `tokenizers` library's
        tokenizer.json, so other tools can load it directly."""
        if self._hf is None:
            return json.dumps({"kind": "byte", "eot": EOT})
        return self._hf.to_str()

    @classmethod
    def from_json(cls, s: str) -> Tokenizer:
        """Inverse of to_json()."""
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            raise NanodsError(f"the stored tokenizer is not valid JSON ({e}); the checkpoint or cache is damaged") from e
        if isinstance(obj, dict) and obj.get("kind") == "byte":
            return byte_tokenizer()
        if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and obj["model"].get("type") == "BPE":
            return cls(HFTokenizer.from_str(s))
        raise NanodsError("the stored tokenizer is neither a nanods byte tokenizer nor a byte-level BPE")

    def fingerprint(self) -> str:
        """A short hash of to_json(): equal fingerprints mean identical tokenization."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


def byte_tokenizer() -> Tokenizer:
    """The 257-id byte tokenizer: needs no training, works on anything."""
    return Tokenizer()


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of at most vocab_size ids (256 bytes + <|endoftext|> + merges) on texts."""
    if vocab_size <= N_BYTES + 1:
        raise NanodsError(f"a BPE vocab_size must exceed {N_BYTES + 1} (256 bytes + {EOT}), got {vocab_size}; "
                          "use the 'byte' tokenizer for a pure byte vocabulary")
    if vocab_size > MAX_VOCAB_SIZE:  # the `tokenizers` trainer aborts the whole process on far larger sizes
        raise NanodsError(f"model.vocab_size ({vocab_size:,}) is above the BPE maximum of {MAX_VOCAB_SIZE:,}; "
                          "set a smaller model.vocab_size")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()  # unused here; makes the stored tokenizer.json complete for other tools
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer, length=len(texts) if isinstance(texts, Sized) else None)
    return Tokenizer(hf)


class StreamDecoder:
    """Turns ids into text as they arrive, holding back a character whose bytes are incomplete.

    "".join(push(...) for each chunk) + flush() == tokenizer.decode(all ids).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: Iterable[int]) -> str:
        """The text completed by ids (may be empty while a multi-byte character is pending)."""
        return self._utf8.decode(self.tokenizer.decode_bytes(ids))

    def flush(self) -> str:
        """Whatever is still pending (U+FFFD for a character that never completed); resets the decoder."""
        rest = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return rest
