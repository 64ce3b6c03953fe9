"""Hugging Face `tokenizers` behind jaxlm's tokenizer interface (see `tokenizer.TokenizerAPI`).

Reads a tokenizer.json, GPT-2 style vocab.json + merges.txt (byte-level BPE) or a BERT vocab.txt
(WordPiece). jaxlm encodes without special tokens (documents get EOS from the data layer) and
decodes skipping them. As with SentencePiece's control pieces, text cannot inject one: a
document holding the string `<|endoftext|>` encodes it as text (tokenizers'
`encode_special_tokens`), so it neither ends the document early nor escapes byte accounting;
models insert special tokens by id.

Byte accounting (`byte_lengths`, for bits per byte):
- byte-level BPE (GPT-2): a piece's characters stand for one byte each, so the byte lengths of
  the ids of a text encoded without special tokens sum to its UTF-8 length exactly.
- WordPiece (BERT): the normalizer lowercases, strips accents and drops whitespace, so no
  per-piece count can equal the original bytes. A piece counts the UTF-8 bytes of its text
  without the `##` prefix: bits per byte is then over the normalized text without whitespace.
- anything else (SentencePiece-like tokenizer.json): `<0xNN>` byte pieces count 1, `▁` a space.
Special tokens and unk count 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
from collections.abc import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

# Conventional names of each special role, in order of preference. tokenizer.json does not
# say which added token is EOS (transformers keeps that in other files), so roles go by name.
ROLE_NAMES = {
    "eos": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]"),
    "pad": ("<pad>", "[PAD]", "<|padding|>", "<|pad|>"),
    "bos": ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>", "<|endoftext|>"),
    "unk": ("<unk>", "[UNK]", "<|endoftext|>"),
    "mask": ("<mask>", "[MASK]"),
    "cls": ("[CLS]", "<s>"),
    "sep": ("[SEP]", "</s>"),
}
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_WS = "\u2581"
_BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_GPT2_SPECIALS = ("<|endoftext|>",)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, mapped back to the byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


_BYTE_CHARS = _byte_level_alphabet()


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer, saved in a run directory as tokenizer.json."""

    filename = "tokenizer.json"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = pathlib.Path(path)
        self._tok, self._bytes = _read(self._path)
        self._sha256 = hashlib.sha256(self._bytes).hexdigest()
        spec = json.loads(self._tok.to_str())
        self._specials = {
            int(i): t.content for i, t in self._tok.get_added_tokens_decoder().items() if t.special
        }
        self._roles = {role: self._first(names) for role, names in ROLE_NAMES.items()}
        self._byte_lengths = self._piece_byte_lengths(_kind(spec))
        self._tok.encode_special_tokens = True  # a runtime flag: to_bytes() is unchanged

    def _first(self, names: Sequence[str]) -> int | None:
        for name in names:
            idx = self._tok.token_to_id(name)
            if idx is not None:
                return idx
        return None

    @property
    def path(self) -> pathlib.Path:
        return self._path

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int | None:
        return self._roles["pad"]

    @property
    def eos_id(self) -> int | None:
        return self._roles["eos"]

    @property
    def bos_id(self) -> int | None:
        return self._roles["bos"]

    @property
    def unk_id(self) -> int | None:
        return self._roles["unk"]

    @property
    def mask_id(self) -> int | None:
        return self._roles["mask"]

    @property
    def cls_id(self) -> int | None:
        return self._roles["cls"]

    @property
    def sep_id(self) -> int | None:
        return self._roles["sep"]

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Every special token but the mask (masking excludes that one itself)."""
        ids = {i for r, i in self._roles.items() if r != "mask" and i is not None}
        ids |= set(self._specials)
        return tuple(sorted(ids - {self.mask_id}))

    def sentinel_id(self, i: int) -> int | None:
        """Id of `<extra_id_{i}>`, if the vocabulary has it."""
        return self._tok.token_to_id(f"<extra_id_{i}>")

    def piece_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)

    @property
    def sha256(self) -> str:
        """Hex digest of the tokenizer.json bytes this tokenizer is saved as."""
        return self._sha256

    def to_bytes(self) -> bytes:
        """The tokenizer.json a run directory keeps (the file itself when one was given)."""
        return self._bytes

    @property
    def byte_lengths(self) -> np.ndarray:
        """int32 [vocab_size]: bytes each piece counts for bits per byte (module docstring)."""
        return self._byte_lengths

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """Encode many texts (`tokenizers` parallelises itself; num_threads is ignored)."""
        del num_threads
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, idx: int) -> str:
        return self._tok.id_to_token(int(idx))

    def _piece_byte_lengths(self, kind: str) -> np.ndarray:
        out = np.zeros(self.vocab_size, np.int32)
        zero = set(self._specials) | {self.unk_id}
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i)
            if i in zero or piece is None:
                continue
            if kind == "byte_level" and all(c in _BYTE_CHARS for c in piece):
                out[i] = len(piece)
            elif kind == "wordpiece":
                out[i] = len(piece.removeprefix("##").encode("utf-8"))
            elif _BYTE_PIECE.match(piece):
                out[i] = 1
            else:
                out[i] = len(piece.replace(_WS, " ").encode("utf-8"))
        return out


def _kind(spec: dict) -> str:
    """byte_level, wordpiece or other, from the serialized decoder and model."""
    decoder = json.dumps(spec.get("decoder"))
    if '"ByteLevel"' in decoder:
        return "byte_level"
    if '"WordPiece"' in decoder or spec.get("model", {}).get("type") == "WordPiece":
        return "wordpiece"
    return "other"


def _read(path: pathlib.Path) -> tuple[tokenizers.Tokenizer, bytes]:
    """The tokenizer at path and the tokenizer.json bytes it is saved as."""
    if path.is_dir():
        for name in ("tokenizer.json", "vocab.json", "vocab.txt"):
            if (path / name).is_file():
                return _read(path / name)
        raise FileNotFoundError(
            f"{path} has no tokenizer.json, vocab.json + merges.txt or vocab.txt; point "
            "data.tokenizer at a tokenizer file or a folder that has one"
        )
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} does not exist")
    if path.suffix == ".txt":
        tok = _wordpiece(path)
    elif path.name == "vocab.json" or _is_vocab_json(path):
        tok = _byte_level_bpe(path)
    else:
        data = path.read_bytes()
        try:
            return tokenizers.Tokenizer.from_str(data.decode("utf-8")), data
        except Exception as e:  # tokenizers raises its own Exception subclass
            raise ValueError(
                f"{path} is not a Hugging Face tokenizer.json ({e}); point data.tokenizer at a "
                "tokenizer.json, vocab.json (+ merges.txt), vocab.txt or SentencePiece .model"
            ) from None
    return tok, tok.to_str().encode("utf-8")


def _is_vocab_json(path: pathlib.Path) -> bool:
    """A GPT-2 vocab.json is one flat {piece: id} object; a tokenizer.json has a model."""
    try:
        obj = json.loads(path.read_text("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(obj, dict) and "model" not in obj


def _byte_level_bpe(vocab: pathlib.Path) -> tokenizers.Tokenizer:
    merges = vocab.parent / "merges.txt"
    if not merges.is_file():
        raise FileNotFoundError(f"{vocab} needs {merges} beside it (GPT-2 BPE merges)")
    tok = tokenizers.Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    # GPT-2's settings (transformers' GPT2TokenizerFast): no prefix space, byte-level decoding.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([t for t in _GPT2_SPECIALS if tok.token_to_id(t) is not None])
    return tok


def _wordpiece(vocab: pathlib.Path) -> tokenizers.Tokenizer:
    # transformers' BertTokenizerFast defaults (uncased); a tokenizer_config.json beside it may
    # say do_lower_case=false (a cased model) or set strip_accents (None: as lowercasing).
    settings = {}
    config = vocab.parent / "tokenizer_config.json"
    if config.is_file():
        settings = json.loads(config.read_text("utf-8"))
    tok = tokenizers.Tokenizer(models.WordPiece.from_file(str(vocab), unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(
        lowercase=bool(settings.get("do_lower_case", True)),
        strip_accents=settings.get("strip_accents"),
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([t for t in _BERT_SPECIALS if tok.token_to_id(t) is not None])
    return tok
