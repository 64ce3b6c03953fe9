"""jaxlm.data inputs: corpus, tokenizer, source specs, readers, cleaning, bad-input errors."""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jaxlm.data import sources, tokenizer
from jaxlm.data.builtin import corpus
from jaxlm.data.clean import Cleaner
from jaxlm.data.specs import CleanConfig, ReadOptions, SourceSpec
from jaxlm.data.types import DataError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NON_ASCII = "déjà vu — naïve café, 日本語, Ελληνικά, emoji 🐍🚀 and a tab\there\r\n\x00end"


@pytest.fixture(scope="module")
def validation_texts() -> list[str]:
    return corpus.read_split("validation")


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> tokenizer.Tokenizer:
    # A small vocabulary on a subset keeps this fast; byte fallback covers everything unseen.
    texts = corpus.read_split("train")[:80]
    path = tmp_path_factory.mktemp("tok") / "small.model"
    return tokenizer.train_tokenizer(texts, path, vocab_size=512)


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def _docs(spec: str, split: str = "train", **opts) -> list[str]:
    return list(sources.documents(sources.parse_sources(spec)[0], split, ReadOptions(**opts)))


def _one_line_error(exc_info: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(exc_info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message


# --- corpus -------------------------------------------------------------------------------


def test_stdlib_files_excludes_tests_and_third_party() -> None:
    files = corpus.stdlib_files()
    rels = [rel for rel, _ in files]
    assert len(files) > 300
    assert rels == sorted(rels)
    assert {"os.py", "json/__init__.py", "asyncio/tasks.py"} <= set(rels)
    for rel, path in files:
        parts = rel.split("/")
        assert not {"test", "tests", "idle_test", "site-packages", "dist-packages"} & set(parts)
        assert not any(p.startswith("test_") for p in parts), rel
        assert path.is_absolute() and path.suffix == ".py"
        assert path.read_bytes(), rel


def test_split_is_deterministic_and_about_five_percent() -> None:
    rels = [rel for rel, _ in corpus.stdlib_files()]
    splits = [corpus.split_of(rel, 5.0) for rel in rels]
    assert splits == [corpus.split_of(rel, 5.0) for rel in rels]
    frac = splits.count("validation") / len(splits)
    assert 0.02 < frac < 0.09
    assert corpus.split_of("os.py", 0.0) == "train"
    assert corpus.split_of("os.py", 100.0) == "validation"
    n_val, n_train = len(corpus.read_split("validation")), len(corpus.read_split("train"))
    assert (n_val, n_train) == (splits.count("validation"), splits.count("train"))


# --- tokenizer ----------------------------------------------------------------------------


def test_tokenizer_special_ids(tok: tokenizer.Tokenizer) -> None:
    assert tok.vocab_size == 512
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.mask_id is None and tok.sentinel_id(0) is None
    assert len(tok.sha256) == 64
    assert tok.byte_lengths.shape == (512,) and tok.byte_lengths.dtype == np.int32
    assert tok.byte_lengths[:4].tolist() == [0, 0, 0, 0]


def test_round_trip_lossless_on_stdlib(
    tok: tokenizer.Tokenizer, validation_texts: list[str]
) -> None:
    all_ids = tok.encode_batch(validation_texts)
    for text, ids in zip(validation_texts, all_ids, strict=True):
        assert tok.unk_id not in ids
        assert tok.decode(ids) == text
    assert all_ids[0] == tok.encode(validation_texts[0])


def test_byte_lengths_invariant(tok: tokenizer.Tokenizer, validation_texts: list[str]) -> None:
    for text in [*validation_texts, NON_ASCII, "", "\n\n    x\n"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert int(tok.byte_lengths[ids].sum()) == len(text.encode("utf-8"))


def test_training_is_deterministic_and_cached(tmp_path: pathlib.Path) -> None:
    from jaxlm.config import base_config, data_spec
    from jaxlm.data import run_tokenizer

    texts = corpus.read_split("train")[:20]
    a = tokenizer.train_tokenizer(texts, tmp_path / "a.model", vocab_size=400)
    b = tokenizer.train_tokenizer(texts, tmp_path / "b.model", vocab_size=400)
    assert a.sha256 == b.sha256
    with pytest.raises(ValueError, match="vocab_size 270 is too small"):
        tokenizer.train_tokenizer(texts, tmp_path / "tiny.model", vocab_size=270)
    # Without data.tokenizer, one is trained on a sample of the source once, then reused.
    (tmp_path / "a.txt").write_text("\n".join(texts))
    c = base_config()
    c.data.source, c.data.cache_dir = f"file:{tmp_path}/a.txt", str(tmp_path / "cache")
    c.data.tokenizer_vocab_size = 400
    logs = []
    first = run_tokenizer.resolve_tokenizer(data_spec(c), logs.append)
    second = run_tokenizer.resolve_tokenizer(data_spec(c), logs.append)
    assert len(logs) == 1 and first.path == second.path and first.sha256 == second.sha256
    assert first.path.parent == tmp_path / "cache" / "tokenizers"
    assert not [p for p in first.path.parent.iterdir() if p.suffix == ".tmp"]
    c.data.tokenizer_sentinels = 2  # another setting: another tokenizer
    assert run_tokenizer.resolve_tokenizer(data_spec(c), logs.append).path != first.path


@pytest.mark.parametrize("model_type", ["unigram", "char"])
def test_tokenizer_types_and_special_pieces(tmp_path: pathlib.Path, model_type: str) -> None:
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij"), rng.integers(1, 6))) for _ in range(3000)]
    texts = [" ".join(words[i : i + 30]) + "\n" for i in range(0, 3000, 30)] + ["the cat"]
    tok = tokenizer.train_tokenizer(
        texts, tmp_path / "t.model", 100, model_type, byte_fallback=False, mask=True, sentinels=3
    )
    assert tok.mask_id is not None and tok.sentinel_id(2) is not None
    assert tok.sentinel_id(3) is None
    # Control pieces never come out of plain text, so raw text cannot inject them.
    specials = {tok.mask_id, tok.sentinel_id(0), tok.eos_id}
    assert not specials & set(tok.encode("<mask> <extra_id_0> </s> the cat"))
    assert tok.unk_id in tok.encode("ü")  # no byte fallback: unseen characters are unknown
    assert tok.decode(tok.encode("the cat")) == "the cat"


def test_bad_model_files_give_one_line_errors(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "corrupt.model"
    bad.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    with pytest.raises(ValueError, match="is not a SentencePiece model") as err:
        tokenizer.Tokenizer(bad)
    _one_line_error(err, str(bad), "data.tokenizer")
    missing = tmp_path / "missing.model"
    with pytest.raises(FileNotFoundError) as err2:
        tokenizer.Tokenizer(missing)
    _one_line_error(err2, str(missing))


# --- source specs -------------------------------------------------------------------------


def test_parse_sources() -> None:
    specs = sources.parse_sources("tfds:c4/en:3.1.0@0.3, jsonl:gs://b/x-{split}.json@0.7")
    assert specs == [
        SourceSpec("tfds", "c4/en:3.1.0", 0.3),
        SourceSpec("jsonl", "gs://b/x-{split}.json", 0.7),
    ]
    assert sources.parse_sources("python_stdlib") == [SourceSpec("python_stdlib")]
    assert specs[1].slug == "jsonl_gs_b_x-_split_.json"


@pytest.mark.parametrize(
    "text,needle",
    [
        ("lm1b", "use one of"),
        ("tfds", "needs an argument"),
        ("python_stdlib:x", "takes no argument"),
        ("tfds:lm1b@heavy", "is not a number"),
        ("tfds:lm1b@0", "must be > 0"),
        ("tfds:lm1b,,text:a", "empty entry"),
        ("synthetic,python_stdlib", "cannot be mixed"),
    ],
)
def test_bad_source_specs(text: str, needle: str) -> None:
    with pytest.raises(DataError) as err:
        sources.parse_sources(text)
    _one_line_error(err, needle)


def test_config_validates_data_keys() -> None:
    from jaxlm.config import ConfigError, apply_overrides, base_config, validate

    for override, needle in [
        ("data.source=lm1b", "'data.source'"),
        ("data.normalize=NFX", "'data.normalize'"),
        ("data.decode_errors=ignore", "'data.decode_errors'"),
        ("data.eval_fraction=1.5", "'data.eval_fraction'"),
        ("data.max_doc_chars=-1", "'data.max_doc_chars'"),
    ]:
        c = base_config()
        apply_overrides(c, [override])
        with pytest.raises(ConfigError) as err:
            validate(c)
        _one_line_error(err, needle)


# --- readers ------------------------------------------------------------------------------


def test_text_and_jsonl_readers(tmp_path: pathlib.Path) -> None:
    for i in range(40):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document {i}\n")
    train = _docs(f"text:{tmp_path}/*.txt", eval_fraction=0.25)
    valid = _docs(f"text:{tmp_path}/*.txt", "validation", eval_fraction=0.25)
    assert sorted(train + valid) == sorted(f"document {i}\n" for i in range(40))
    assert 4 <= len(valid) <= 16  # a hash split: about a quarter
    lines = [json.dumps({"body": f"line {i} ü", "id": i}) for i in range(5)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n\n")
    with gzip.open(tmp_path / "validation.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "held out"}) + "\n")
    spec = f"jsonl:{tmp_path}/{{split}}.jsonl*"
    assert _docs(spec, text_key="body") == [f"line {i} ü" for i in range(5)]
    assert _docs(spec, "validation", text_key="body") == ["held out"]


def test_single_file_split_by_fraction(tmp_path: pathlib.Path) -> None:
    text = "".join(f"line {i}\n" for i in range(100))
    (tmp_path / "book.txt").write_text(text)
    [train] = _docs(f"file:{tmp_path}/book.txt", eval_fraction=0.1)
    [valid] = _docs(f"file:{tmp_path}/book.txt", "validation", eval_fraction=0.1)
    assert train + valid == text and train.endswith("\n")
    assert 0.85 < len(train) / len(text) < 0.95


def test_bad_inputs_give_one_line_errors(tmp_path: pathlib.Path) -> None:
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    (tmp_path / "rows.jsonl").write_text('{"text": "ok"}\n{"content": "no text"}\n')
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"\n')
    cases = [
        (f"file:{tmp_path}/missing.txt", "does not exist"),
        (f"file:{tmp_path}/empty.txt", "is empty"),
        (f"text:{tmp_path}/empty.txt", "is empty"),
        (f"text:{tmp_path}/nothing-*.txt", "matches no files"),
        (f"file:{tmp_path}/latin1.txt", "data.decode_errors=replace"),
        (f"jsonl:{tmp_path}/rows.jsonl", "rows.jsonl:2 has no field 'text'"),
        (f"jsonl:{tmp_path}/broken.jsonl", "is not a JSON object"),
    ]
    for spec, needle in cases:
        with pytest.raises(DataError) as err:
            _docs(spec, eval_fraction=0.5) + _docs(spec, "validation", eval_fraction=0.5)
        _one_line_error(err, needle)
    # The configured alternative for bytes that are not UTF-8: replace them.
    [text] = _docs(f"file:{tmp_path}/latin1.txt", decode_errors="replace", eval_fraction=0.01)
    assert text == "caf\ufffd\n"


def test_tfds_errors_name_the_fix(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("tensorflow_datasets")
    cases = [
        ("tfds:no_such_dataset_xyz", {}, "TFDS has no dataset"),
        ("tfds:lm1b", {"tfds_data_dir": str(tmp_path / "missing")}, "does not exist"),
        ("tfds:lm1b", {"tfds_data_dir": str(tmp_path)}, "is not prepared"),
        ("tfds:lm1b", {"tfds_data_dir": str(tmp_path)}, "tfds build lm1b"),
    ]
    for spec, opts, needle in cases:
        with pytest.raises(DataError) as err:
            _docs(spec, **opts)
        _one_line_error(err, needle)


# --- cleaning -----------------------------------------------------------------------------


def test_cleaning_and_counts() -> None:
    cleaner = Cleaner(CleanConfig(min_chars=5, max_chars=40))
    docs = [
        "cafe\u0301 ok\r\n",  # decomposed é -> NFC; CRLF -> LF
        "tab\tkept, bell\x07 and nul\x00 dropped\n",
        "trailing   \nspaces\t\n\n\n\n\n\nend\n\n\n",
        "café ok\n",  # the first document after cleaning: a duplicate
        "tiny",
        "\ufeff\n\n",
        "x" * 41,
    ]
    out = [cleaner(d) for d in docs]
    assert out == [
        "café ok\n",
        "tab\tkept, bell and nul dropped\n",
        "trailing\nspaces\n\n\nend\n",
        None,
        None,
        None,
        None,
    ]
    assert dict(cleaner.counts) == {
        "documents": 7,
        "kept": 3,
        "changed": 4,
        "dropped_duplicate": 1,
        "dropped_too_short": 1,
        "dropped_empty": 1,
        "dropped_too_long": 1,
    }
    assert cleaner.summary() == (
        "7 documents: 3 kept, dropped 1 duplicate, 1 empty, 1 too long, 1 too short, 4 changed"
    )
    raw = Cleaner(CleanConfig("none", False, False, 1, 0, False))
    assert [raw(d) for d in docs[:3]] == docs[:3]


# --- imports --------------------------------------------------------------------------------


def test_light_modules_do_not_import_tensorflow(tmp_path: pathlib.Path) -> None:
    """Synthetic data, file sources, preparing and reading caches all work without TF."""
    (tmp_path / "a.txt").write_text(
        "".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(300))
    )
    code = (
        "import sys\n"
        "import jaxlm.data, jaxlm.data.builtin.corpus, jaxlm.data.tokenizer\n"
        "from jaxlm.data import source\n"
        "from jaxlm.data.builtin import synthetic\n"
        "from jaxlm.config import base_config, data_spec\n"
        "synthetic.synthetic_batch(0, 2, 8, 50, seed=0)\n"
        "c = base_config()\n"
        f"c.data.source = 'file:{tmp_path}/a.txt'\n"
        f"c.data.cache_dir = '{tmp_path}/cache'\n"
        "c.data.tokenizer_vocab_size = 300\n"
        "c.data.seq_len, c.data.batch_size, c.data.eval_fraction = 16, 4, 0.2\n"
        f"data = source.build_source(data_spec(c), '{tmp_path}/run', log=lambda s: None)\n"
        "assert data.train_batch(3, 0, 1)['inputs'].shape == (4, 16)\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
