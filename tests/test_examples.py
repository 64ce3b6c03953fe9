"""Labelled-example tasks: seq2seq and classification batches from TFDS (mocked) and JSONL."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest
from conftest import tiny_config

from jaxlm.config import data_spec
from jaxlm.data import cache_format, readers, tokenizer
from jaxlm.data.examples import cache as example_cache
from jaxlm.data.examples import source as examples
from jaxlm.data.types import DataError

EOS = tokenizer.EOS_ID

WORDS = (
    "the cat sat on a mat while dogs ran far away and birds sang in trees near old houses "
    "der Hund lief schnell nach Hause und die Katze schlief lange auf dem warmen Sofa "
    "abcdefghij"
).split()


def _quiet(_: str) -> None:
    pass


def _sentence(rng: np.random.Generator, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi + 1))))


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> tokenizer.Tokenizer:
    rng = np.random.default_rng(0)
    texts = [_sentence(rng, 1, 12) for _ in range(400)] + ["a b c d e f g h i j " * 20]
    path = tmp_path_factory.mktemp("tok") / "t.model"
    return tokenizer.train_tokenizer(texts, path, vocab_size=400)


def _config(tmp_path: pathlib.Path, source: str, objective: str, **data):
    c = tiny_config(source, objective)
    c.data.cache_dir = str(tmp_path / "cache")
    c.data.seq_len, c.data.target_len, c.data.batch_size = 12, 6, 8
    if objective == "classify":
        c.model.num_classes = 2
    for key, value in data.items():
        setattr(c.data, key, value)
    return c


def _write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _pairs(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"src": _sentence(rng, 1, 16), "tgt": _sentence(rng, 1, 6) + "  "} for _ in range(n)]


def _seq2seq_jsonl(tmp_path, n_train: int = 40, n_valid: int = 13, **data):
    _write_jsonl(tmp_path / "train.jsonl", _pairs(n_train, 1))
    _write_jsonl(tmp_path / "validation.jsonl", _pairs(n_valid, 2))
    source = f"jsonl:{tmp_path}/{{split}}.jsonl"
    keys = {"input_key": "src", "target_key": "tgt", **data}
    return _config(tmp_path, source, "seq2seq", **keys)


def _expected_row(tok, text: str, width: int) -> np.ndarray:
    ids = tok.encode(text)[: width - 1] + [EOS]
    return np.array(ids + [0] * (width - len(ids)), np.int32)


def _one_line(err: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(err.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message


# --- seq2seq --------------------------------------------------------------------------------


def test_seq2seq_batch_format_truncation_and_references(tmp_path, tok) -> None:
    c = _seq2seq_jsonl(tmp_path)
    source, described = examples.build(data_spec(c), tok, _quiet)
    assert source.packed is False and source.vocab_size == tok.vocab_size
    assert source.tokenizer_sha256 == tok.sha256 and source.special_ids == tok.special_ids
    batch = source.train_batch(0)
    shapes = {k: (v.shape, v.dtype) for k, v in batch.items()}
    assert shapes == {
        "inputs": ((8, 12), np.int32),
        "input_segment_ids": ((8, 12), np.int32),
        "targets": ((8, 6), np.int32),
        "target_segment_ids": ((8, 6), np.int32),
        "loss_mask": ((8, 6), np.float32),
    }
    (valid,) = source.eval_batches(1)
    refs = source.eval_examples(0)
    assert len(refs) == 13
    raw = [json.loads(line) for line in (tmp_path / "validation.jsonl").read_text().splitlines()]
    truncated_inputs = truncated_targets = 0
    for i, ex in enumerate(refs[:8]):
        # Cleaning drops the trailing spaces of the raw target; the reference is cleaned text.
        assert ex["input"] == raw[i]["src"] and ex["reference"] == raw[i]["tgt"].rstrip()
        inputs = _expected_row(tok, ex["input"], 12)
        targets = _expected_row(tok, ex["reference"], 6)
        np.testing.assert_array_equal(valid["inputs"][i], inputs)
        np.testing.assert_array_equal(valid["targets"][i], targets)
        np.testing.assert_array_equal(ex["input_ids"], inputs[inputs != 0])
        np.testing.assert_array_equal(valid["input_segment_ids"][i], inputs != 0)
        np.testing.assert_array_equal(valid["target_segment_ids"][i], targets != 0)
        np.testing.assert_array_equal(valid["loss_mask"][i], (targets != 0).astype(np.float32))
        n_target = len(tok.encode(ex["reference"]))
        truncated_targets += n_target > 5
        truncated_inputs += len(tok.encode(ex["input"])) > 11
        if n_target <= 5:  # untruncated: the row decodes to the reference text
            assert tok.decode(valid["targets"][i][:n_target]) == ex["reference"]
        else:  # truncated: EOS sits in the last slot
            assert valid["targets"][i][-1] == EOS
    assert truncated_inputs > 0 and truncated_targets > 0  # the data exercises truncation
    assert described["validation"]["examples"] == 13 and described["train"]["examples"] == 40
    counts = [len(tok.encode(r["reference"])) > 5 for r in refs]
    assert described["validation"]["truncated_targets"] == sum(counts)
    assert described["task"] == "seq2seq" and described["target_len"] == 6


def test_wmt14_mock_data(tmp_path, tok) -> None:
    tfds = pytest.importorskip("tensorflow_datasets")
    c = _config(tmp_path, "tfds:wmt14_translate/de-en", "seq2seq", input_key="de", target_key="en")
    c.data.seq_len, c.data.target_len = 64, 64  # mock texts are short: nothing is truncated
    with tfds.testing.mock_data(num_examples=11, policy=tfds.testing.MockPolicy.USE_CODE):
        source, described = examples.build(data_spec(c), tok, _quiet)
        pairs = list(
            tfds.builder("wmt14_translate/de-en").as_dataset(split="validation").as_numpy_iterator()
        )
    assert described["train"]["examples"] == 11 and described["validation"]["examples"] == 11
    refs = source.eval_examples(0)
    batches = source.eval_batches(0)
    assert len(batches) == 2  # 11 examples in batches of 8: the second one is filled up
    targets = np.concatenate([b["targets"] for b in batches])
    for i, (ex, pair) in enumerate(zip(refs, pairs, strict=True)):
        assert ex["input"] == pair["de"].decode().rstrip(" ")
        assert ex["reference"] == pair["en"].decode().rstrip(" ")
        length = int((targets[i] != 0).sum())
        assert targets[i][length - 1] == EOS
        assert tok.decode(targets[i][: length - 1]) == ex["reference"]


# --- classification -------------------------------------------------------------------------


def test_sst2_mock_data_labels_and_batches(tmp_path, tok) -> None:
    tfds = pytest.importorskip("tensorflow_datasets")
    c = _config(tmp_path, "tfds:glue/sst2", "classify", input_key="sentence", label_key="label")
    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
        source, described = examples.build(data_spec(c), tok, _quiet)
        rows = list(tfds.builder("glue/sst2").as_dataset(split="validation").as_numpy_iterator())
    labels = [int(r["label"]) for r in rows]
    refs = source.eval_examples(0)
    assert [r["label"] for r in refs] == labels
    assert [r["input"] for r in refs] == [r["sentence"].decode().rstrip(" ") for r in rows]
    batches = source.eval_batches(0)
    assert [sorted(b) for b in batches[:1]] == [["example_mask", "inputs", "labels", "segment_ids"]]
    assert batches[0]["labels"].dtype == np.int32 and batches[0]["labels"].shape == (8,)
    assert batches[0]["example_mask"].dtype == np.float32
    mask = np.concatenate([b["example_mask"] for b in batches])
    assert mask.tolist() == [1.0] * 20 + [0.0] * 4
    assert np.concatenate([b["labels"] for b in batches])[:20].tolist() == labels
    for i, ref in enumerate(refs[:8]):
        np.testing.assert_array_equal(batches[0]["inputs"][i], _expected_row(tok, ref["input"], 12))
    hist = described["validation"]["labels"]
    assert hist == {str(k): labels.count(k) for k in sorted(set(labels))}
    train = source.train_batch(3)
    assert set(train["labels"].tolist()) <= {0, 1} and train["example_mask"].sum() == 8


def test_jsonl_classify_hash_split_and_empty_inputs(tmp_path, tok) -> None:
    rng = np.random.default_rng(3)
    rows = [{"text": _sentence(rng, 1, 8), "y": int(rng.integers(0, 3))} for _ in range(200)]
    rows[:3] = [{"text": "  ", "y": 0}, {"text": "", "y": 1}, {"text": "x\x00", "y": 2}]
    _write_jsonl(tmp_path / "all.jsonl", rows)
    c = _config(tmp_path, f"jsonl:{tmp_path}/all.jsonl", "classify", input_key="text")
    c.data.label_key, c.data.eval_fraction, c.model.num_classes = "y", 0.2, 3
    data = examples.ExampleData(data_spec(c), tok, _quiet)
    # The hash split on the raw input, in file order; empty-after-cleaning inputs ("  ", "")
    # leave training but stay in validation; "x\x00" is cleaned to "x".
    valid = [r for r in rows if readers.in_split(r["text"], "validation", 0.2)]
    train = [r for r in rows if r not in valid and r["text"].strip()]
    assert 20 < len(valid) < 60  # about 20%
    assert data.valid.labels.tolist() == [r["y"] for r in valid]
    assert data.train.labels.tolist() == [r["y"] for r in train]
    cleaned = {"  ": "", "x\x00": "x"}
    got = [e["input"] for e in data.eval_examples(0)]
    assert got == [cleaned.get(r["text"], r["text"]) for r in valid]
    dropped = sum(1 for r in rows[:2] if r not in valid)
    assert data.manifest["splits"]["train"]["dropped_empty"] == dropped
    described = data.describe()
    assert described["train"]["examples"] == len(train)
    assert described["validation"]["labels"] == {
        str(k): n for k in range(3) if (n := sum(r["y"] == k for r in valid))
    }


# --- step addressing, processes, evaluation -------------------------------------------------


def test_batches_are_pure_functions_of_the_step(tmp_path, tok) -> None:
    c = _seq2seq_jsonl(tmp_path)
    a = examples.ExampleData(data_spec(c), tok, _quiet)
    b = examples.ExampleData(data_spec(c), tok, _quiet)  # a fresh instance: no iterator state
    for step in (0, 1, 7):
        for key, value in a.train_batch(step).items():
            np.testing.assert_array_equal(value, b.train_batch(step)[key])
    assert not np.array_equal(a.train_batch(0)["inputs"], a.train_batch(1)["inputs"])
    # One epoch (5 steps of 8 over 40 examples) sees every training example exactly once.
    seen = np.concatenate([a.sampler.rows_for_step(s)[1] for s in range(5)])
    assert sorted(seen.tolist()) == list(range(40))
    c.train.seed = 1
    other = examples.ExampleData(data_spec(c), tok, _quiet)
    assert not np.array_equal(a.train_batch(0)["inputs"], other.train_batch(0)["inputs"])


@pytest.mark.parametrize("count", [2, 4])
def test_process_shares_concatenate_to_the_global_batch(tmp_path, tok, count) -> None:
    c = _seq2seq_jsonl(tmp_path)
    data = examples.ExampleData(data_spec(c), tok, _quiet)
    whole = data.train_batch(5, 0, 1)
    parts = [data.train_batch(5, i, count) for i in range(count)]
    for key, value in whole.items():
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value)
    whole_eval = data.eval_batches(0, 0, 1)
    parts_eval = [data.eval_batches(0, i, count) for i in range(count)]
    for b, batch in enumerate(whole_eval):
        for key, value in batch.items():
            np.testing.assert_array_equal(np.concatenate([p[b][key] for p in parts_eval]), value)


def test_eval_covers_every_example_once_with_masked_fill(tmp_path, tok) -> None:
    c = _seq2seq_jsonl(tmp_path)
    data = examples.ExampleData(data_spec(c), tok, _quiet)
    batches = data.eval_batches(0)
    assert len(batches) == 2  # 13 examples
    real = np.concatenate([b["loss_mask"].any(axis=1) for b in batches])
    assert real.tolist() == [True] * 13 + [False] * 3
    expected = data.batch(data.valid, np.arange(13))
    for key in ("inputs", "targets", "input_segment_ids"):
        got = np.concatenate([b[key] for b in batches])
        np.testing.assert_array_equal(got[:13], expected[key])
    # Fill rows repeat real examples: never an all-padding row for attention.
    fill = batches[1]
    assert (fill["input_segment_ids"].sum(axis=1) > 0).all()
    assert (fill["target_segment_ids"].sum(axis=1) > 0).all()
    assert (fill["loss_mask"][5:] == 0).all()
    assert len(data.eval_batches(1)) == 1
    assert len(data.eval_examples(5)) == 5


# --- the cache ------------------------------------------------------------------------------


def test_cache_is_reused_and_keyed(tmp_path, tok, monkeypatch) -> None:
    c = _seq2seq_jsonl(tmp_path)
    first = examples.ExampleData(data_spec(c), tok, _quiet)
    manifest = first.directory / cache_format.MANIFEST
    mtime = os.stat(manifest).st_mtime_ns
    calls = []
    monkeypatch.setattr(tok, "encode_batch", lambda texts: calls.append(len(texts)) or [])
    c.data.seq_len, c.data.target_len = 20, 9  # truncation is at batch time: same cache
    again = examples.ExampleData(data_spec(c), tok, _quiet)
    assert again.directory == first.directory and calls == []
    assert os.stat(manifest).st_mtime_ns == mtime
    assert again.train_batch(0)["inputs"].shape == (8, 20)
    monkeypatch.undo()
    # A cache without a manifest (an interrupted build) is rebuilt.
    manifest.unlink()
    examples.ExampleData(data_spec(c), tok, _quiet)
    assert manifest.is_file()
    # Keys and cleaning are part of the key.
    c.data.normalize = "NFKC"
    assert examples.ExampleData(data_spec(c), tok, _quiet).directory != first.directory
    files = sorted(p.name for p in first.directory.iterdir())
    assert files == [
        "manifest.json",
        "train.inputs.offsets.npy",
        "train.inputs.tokens.npy",
        "train.targets.offsets.npy",
        "train.targets.tokens.npy",
        "validation.inputs.offsets.npy",
        "validation.inputs.tokens.npy",
        "validation.targets.offsets.npy",
        "validation.targets.tokens.npy",
        "validation.texts.jsonl",
    ]


def test_multi_process_jobs_do_not_build_a_cache(tmp_path, tok, monkeypatch) -> None:
    c = _seq2seq_jsonl(tmp_path)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(DataError) as err:
        examples.build(data_spec(c), tok, _quiet)
    _one_line(err, "multi-process", "single process")
    monkeypatch.undo()
    examples.build(data_spec(c), tok, _quiet)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    examples.build(data_spec(c), tok, _quiet)  # built: every process reads it


def test_example_texts_are_cleaned_train_inputs_and_targets(tmp_path, tok) -> None:
    c = _seq2seq_jsonl(tmp_path, n_train=5)
    raw = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    texts = list(example_cache.example_texts(data_spec(c)))
    assert texts == [t for r in raw for t in (r["src"], r["tgt"].rstrip())]


# --- errors ---------------------------------------------------------------------------------


def test_errors_name_the_fix(tmp_path, tok) -> None:
    c = _seq2seq_jsonl(tmp_path, target_key="label")
    with pytest.raises(DataError) as err:
        examples.build(data_spec(c), tok, _quiet)
    _one_line(err, "no field 'label'", "['src', 'tgt']", "data.target_key")
    c = _seq2seq_jsonl(tmp_path)
    c.data.source = f"{c.data.source},{c.data.source}@2"
    with pytest.raises(DataError) as err:
        examples.build(data_spec(c), tok, _quiet)
    _one_line(err, "not a mixture of 2", "single tfds:NAME or jsonl:GLOB")
    c.data.source = "python_stdlib"
    with pytest.raises(DataError) as err:
        examples.build(data_spec(c), tok, _quiet)
    _one_line(err, "not python_stdlib")
    # Labels out of range, and labels that are not integers.
    _write_jsonl(tmp_path / "train.jsonl", [{"t": "a b", "y": 1}, {"t": "c", "y": 5}])
    _write_jsonl(tmp_path / "validation.jsonl", [{"t": "a", "y": 0}])
    c = _config(
        tmp_path, f"jsonl:{tmp_path}/{{split}}.jsonl", "classify", input_key="t", label_key="y"
    )
    with pytest.raises(DataError) as err:
        examples.build(data_spec(c), tok, _quiet)
    _one_line(err, "train example 1 has label 5", "model.num_classes")
    # (Caches are keyed by the source's name, like document caches: use new files.)
    _write_jsonl(tmp_path / "bad.jsonl", [{"t": "a b", "y": "pos"}])
    c.data.source = f"jsonl:{tmp_path}/bad.jsonl"
    with pytest.raises(DataError) as err:
        examples.build(data_spec(c), tok, _quiet)
    _one_line(err, "'pos', not an integer class id")
    # An empty split.
    _write_jsonl(tmp_path / "all.jsonl", [{"t": "a b", "y": 1}])
    c.data.source, c.data.eval_fraction = f"jsonl:{tmp_path}/all.jsonl", 0.0
    with pytest.raises(DataError) as err:
        examples.build(data_spec(c), tok, _quiet)
    _one_line(err, "no validation examples", "eval_fraction")


def test_tfds_errors_name_the_fix(tmp_path, tok) -> None:
    tfds = pytest.importorskip("tensorflow_datasets")
    c = _config(tmp_path, "tfds:glue/sst2", "classify", input_key="text", label_key="label")
    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        with pytest.raises(DataError) as err:
            examples.build(data_spec(c), tok, _quiet)
        _one_line(err, "no feature 'text'", "['idx', 'label', 'sentence']", "data.input_key")
        c.data.source, c.data.input_key = "tfds:glue/mnli", "premise"
        with pytest.raises(DataError) as err:
            examples.build(data_spec(c), tok, _quiet)
        _one_line(err, "has 3 classes but model.num_classes=2", "num_classes=3")


def test_make_source_serves_example_tasks(tmp_path, tok) -> None:
    from jaxlm.data import source as source_lib

    c = _seq2seq_jsonl(tmp_path, tokenizer=str(tok.path))
    data = source_lib.build_source(data_spec(c), tmp_path / "run", log=_quiet)
    assert data.eval_examples is not None and data.train_batch(0)["targets"].shape == (8, 6)
    described = data.description
    assert described["validation"]["examples"] == 13 and described["task"] == "seq2seq"
