"""jaxlm's tokenizer interface and loader; the SentencePiece implementation (loading, training
for source code, byte accounting). Hugging Face `tokenizers` ones live in hf_tokenizer."""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import sentencepiece as spm

from jaxlm import storage
from jaxlm.data import hf_tokenizer
from jaxlm.data.types import BOS_ID, EOS_ID, PAD_ID, UNK_ID

# Training sentences are multi-line chunks of at most this many characters, so BPE sees real
# line structure while staying under SentencePiece's per-sentence length limit.
_CHUNK_CHARS = 2048
_MAX_SENTENCE_BYTES = 16384
_BYTE_PIECE = re.compile(r"^<0x[0-9A-F]{2}>$")
_WS = "\u2581"  # SentencePiece's visible-space marker.
_SEED = 1234


# The file a run directory (or prepared cache) keeps its tokenizer in, by implementation.
RUN_FILES = ("tokenizer.model", "tokenizer.json")


@runtime_checkable
class TokenizerAPI(Protocol):
    """What jaxlm needs of a tokenizer. Special ids are None where the vocabulary has none."""

    filename: str  # the name it is saved under in a run directory (one of RUN_FILES)

    @property
    def path(self) -> pathlib.Path: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def pad_id(self) -> int | None: ...
    @property
    def eos_id(self) -> int | None: ...
    @property
    def bos_id(self) -> int | None: ...
    @property
    def unk_id(self) -> int | None: ...
    @property
    def mask_id(self) -> int | None: ...
    @property
    def cls_id(self) -> int | None: ...
    @property
    def sep_id(self) -> int | None: ...
    @property
    def special_ids(self) -> tuple[int, ...]: ...
    @property
    def sha256(self) -> str: ...  # keys token caches and checkpoints to the vocabulary
    @property
    def byte_lengths(self) -> np.ndarray: ...  # int32 [vocab_size], for bits per byte
    def sentinel_id(self, i: int) -> int | None: ...
    def to_bytes(self) -> bytes: ...  # what is saved as `filename`; sha256 is its digest
    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def id_to_piece(self, idx: int) -> str: ...


def load(path: str | os.PathLike[str]) -> TokenizerAPI:
    """The tokenizer at path: a SentencePiece `.model`, else (a folder, tokenizer.json,
    vocab.json + merges.txt, vocab.txt) Hugging Face `tokenizers`. A folder with a
    tokenizer.model and no Hugging Face files (a jaxlm run) is SentencePiece."""
    p = pathlib.Path(path)
    hf_names = ("tokenizer.json", "vocab.json", "vocab.txt")
    if p.is_dir() and not any((p / n).is_file() for n in hf_names):
        if (p / RUN_FILES[0]).is_file():
            return Tokenizer(p / RUN_FILES[0])
    if p.is_dir() or p.suffix in (".json", ".txt"):
        return hf_tokenizer.HFTokenizer(p)
    return Tokenizer(p)


def generation_pad_id(tok: TokenizerAPI) -> int:
    """The id written after a generated sequence ends: pad, else EOS (GPT-2 has no pad piece,
    and transformers pads with EOS too)."""
    return tok.eos_id if tok.pad_id is None else tok.pad_id


def run_file(directory: str | os.PathLike[str]) -> pathlib.Path | None:
    """The tokenizer file a run directory or prepared cache keeps, if any."""
    for name in RUN_FILES:
        if (pathlib.Path(directory) / name).is_file():
            return pathlib.Path(directory) / name
    return None


class Tokenizer:
    """A SentencePiece model loaded from a `.model` file."""

    filename = RUN_FILES[0]

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = pathlib.Path(path)
        if not self._path.is_file():
            raise FileNotFoundError(f"tokenizer model {self._path} does not exist")
        data = self._path.read_bytes()
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(data)
            ok = sp.GetPieceSize() > 0
        except (RuntimeError, OSError):
            ok = False
        if not ok:
            raise ValueError(
                f"{self._path} is not a SentencePiece model; point data.tokenizer at a .model "
                "file written by SentencePiece or leave it empty to train one"
            )
        self._sp = sp
        self._data = data
        self._sha256 = hashlib.sha256(data).hexdigest()
        self._byte_lengths = _piece_byte_lengths(sp)

    @property
    def path(self) -> pathlib.Path:
        return self._path

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    # SentencePiece says -1 for a piece the model lacks; the interface says None.
    @property
    def pad_id(self) -> int | None:
        return _none(self._sp.pad_id())

    @property
    def eos_id(self) -> int | None:
        return _none(self._sp.eos_id())

    @property
    def bos_id(self) -> int | None:
        return _none(self._sp.bos_id())

    @property
    def unk_id(self) -> int | None:
        return _none(self._sp.unk_id())

    @property
    def cls_id(self) -> int | None:
        """SentencePiece models have no [CLS]: the bos id plays that part."""
        return self.bos_id

    @property
    def sep_id(self) -> int | None:
        """SentencePiece models have no [SEP]: the eos id plays that part."""
        return self.eos_id

    @property
    def special_ids(self) -> tuple[int, ...]:
        """pad, eos, bos and unk ids that the model has."""
        ids = (self.pad_id, self.eos_id, self.bos_id, self.unk_id)
        return tuple(i for i in ids if i is not None)

    @property
    def mask_id(self) -> int | None:
        """Id of the `<mask>` piece, if the model has one."""
        return self.piece_id("<mask>")

    def sentinel_id(self, i: int) -> int | None:
        """Id of `<extra_id_{i}>`, if the model has it."""
        return self.piece_id(f"<extra_id_{i}>")

    def piece_id(self, piece: str) -> int | None:
        idx = self._sp.PieceToId(piece)
        return None if idx == self.unk_id and piece != self.id_to_piece(idx) else idx

    @property
    def sha256(self) -> str:
        """Hex digest of the model file bytes (identifies the vocabulary in caches)."""
        return self._sha256

    def to_bytes(self) -> bytes:
        """The model file's bytes (what a run directory keeps)."""
        return self._data

    @property
    def byte_lengths(self) -> np.ndarray:
        """int32 [vocab_size]: UTF-8 bytes each piece contributes to decoded text."""
        return self._byte_lengths

    def encode(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """Encode many texts with SentencePiece's thread pool (-1: all cores)."""
        return self._sp.Encode(list(texts), out_type=int, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def id_to_piece(self, idx: int) -> str:
        return self._sp.IdToPiece(int(idx))


def _none(idx: int) -> int | None:
    return None if idx < 0 else idx


def _piece_byte_lengths(sp: spm.SentencePieceProcessor) -> np.ndarray:
    out = np.zeros(sp.GetPieceSize(), np.int32)
    for i in range(sp.GetPieceSize()):
        if sp.IsControl(i) or sp.IsUnknown(i) or sp.IsUnused(i):
            continue  # pad/eos/bos/unk decode to nothing (unk is excluded from the invariant).
        piece = sp.IdToPiece(i)
        if sp.IsByte(i) and _BYTE_PIECE.match(piece):
            out[i] = 1
        else:
            out[i] = len(piece.replace(_WS, " ").encode("utf-8"))
    return out


def _chunks(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Split documents into multi-line chunks, stopping after max_chars characters in total."""
    total = 0
    for text in texts:
        buf: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            if buf and size + len(line) > _CHUNK_CHARS:
                yield "".join(buf)
                buf, size = [], 0
            buf.append(line)
            size += len(line)
            total += len(line)
            if total >= max_chars:
                break
        if buf:
            yield "".join(buf)
        if total >= max_chars:
            return


def train_tokenizer(
    texts: Iterable[str],
    out_path: str | os.PathLike[str],
    vocab_size: int,
    model_type: str = "bpe",
    max_chars: int = 20_000_000,
    *,
    byte_fallback: bool = True,
    mask: bool = False,
    sentinels: int = 0,
) -> Tokenizer:
    """Train a SentencePiece model and write it atomically to out_path.

    Ids 0-3 are pad, eos, bos and unk. `mask` adds a `<mask>` piece and `sentinels` adds
    `<extra_id_0>`... pieces, both as control symbols: the encoder never produces them from
    text, so raw text cannot inject them; models insert them by id.
    """
    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    specials = (["<mask>"] if mask else []) + [f"<extra_id_{i}>" for i in range(sentinels)]
    # Sentence sampling and shuffling use SentencePiece's global RNG; fixing it makes training
    # a pure function of the input.
    spm.set_random_generator_seed(_SEED)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=_chunks(texts, max_chars),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=PAD_ID,
            eos_id=EOS_ID,
            bos_id=BOS_ID,
            unk_id=UNK_ID,
            byte_fallback=byte_fallback,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            character_coverage=1.0,
            # "\n" is an atomic piece: it is kept verbatim inside multi-line sentences, so
            # encode/decode is lossless on whole files; indentation is learned as runs of "▁".
            user_defined_symbols=["\n"],
            control_symbols=specials,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            # A char model has one piece per character seen: its vocab_size is only a ceiling.
            hard_vocab_limit=model_type != "char",
            input_sentence_size=1_000_000,
            shuffle_input_sentence=True,
            train_extremely_large_corpus=False,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as e:
        # Byte fallback reserves 256 pieces and character_coverage=1.0 needs every character:
        # turn SentencePiece's internal error into an actionable one-liner.
        if "required_chars" in str(e) or "Vocabulary size is smaller" in str(e):
            raise ValueError(
                f"vocab_size {vocab_size} is too small for this corpus (256 byte pieces, 4 special "
                "ids and one piece per distinct character are required); raise the vocab size"
            ) from e
        if "Vocabulary size too high" in str(e):
            raise ValueError(
                f"vocab_size {vocab_size} is too large for the sampled text; lower "
                "data.tokenizer_vocab_size or sample more text (data.tokenizer_sample_chars)"
            ) from e
        raise
    storage.write_bytes(out_path, model.getvalue())
    return Tokenizer(out_path)


def tokenizer_cache_path(
    cache_dir: str | os.PathLike[str], key: str, model_type: str, vocab_size: int
) -> pathlib.Path:
    """Where an automatically trained tokenizer for this source and settings is kept."""
    return pathlib.Path(cache_dir) / "tokenizers" / f"{key}_{model_type}_{vocab_size}.model"
