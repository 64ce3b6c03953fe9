"""jaxlm.data pipeline: the token cache, packed and padded rows, step-addressed batches for any
number of processes, mixtures, TFDS sources (mocked) and the jaxlm-data command."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import tiny_config

from jaxlm import config as config_lib
from jaxlm.data import cache_format, sampling, source, sources, tokenizer
from jaxlm.data.builtin import corpus
from jaxlm.data.documents import prepare
from jaxlm.data.documents import rows as doc_rows
from jaxlm.data.documents.text import TextData
from jaxlm.data.specs import CleanConfig, ReadOptions, SourceSpec
from jaxlm.data.types import DataError

ROOT = pathlib.Path(__file__).resolve().parents[1]
NON_ASCII = "déjà vu — naïve café, 日本語, Ελληνικά, emoji 🐍🚀 and a tab\there\r\n\x00end"
RAW = CleanConfig("none", False, False, 1, 0, False)  # documents exactly as written


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return corpus.read_split("validation")[:12]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> tokenizer.Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "small.model"
    return tokenizer.train_tokenizer(corpus.read_split("train")[:60], path, vocab_size=512)


def _jsonl_source(directory: pathlib.Path, train: list[str], valid: list[str]) -> SourceSpec:
    directory.mkdir(parents=True, exist_ok=True)
    for split, docs in (("train", train), ("validation", valid)):
        lines = [json.dumps({"text": t}) for t in docs]
        (directory / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return SourceSpec("jsonl", f"{directory}/{{split}}.jsonl")


def _cache(tmp: pathlib.Path, tok, train: list[str], valid=("x = 1\n",), **kw):
    spec = _jsonl_source(tmp / "src", train, list(valid))
    out = tmp / "cache"
    kw.setdefault("shard_tokens", 1 << 20)
    manifest = prepare.prepare_source(spec, str(out), tok, ReadOptions(), RAW, log=_quiet, **kw)
    return out, manifest


def _rows(out: pathlib.Path, manifest: dict, seq_len: int, pack: bool = True) -> doc_rows.Rows:
    return doc_rows.Rows(doc_rows.TokenSplit(out, manifest, "train"), seq_len, pack)


# --- cache and rows -------------------------------------------------------------------------


def _stream_from_rows(data: dict) -> np.ndarray:
    """Undo packing: first row whole, later rows minus their overlapping first token."""
    toks = [data["tokens"][0]] + [row[1:] for row in data["tokens"][1:]]
    seg = [data["segment_ids"][0]] + [row[1:] for row in data["segment_ids"][1:]]
    return np.concatenate(toks)[np.concatenate(seg) != 0]


@pytest.mark.parametrize("seq_len", [1, 7, 64])
def test_packing_loses_and_duplicates_no_token(tmp_path, tok, texts, seq_len) -> None:
    docs = ["a = 1\n", NON_ASCII, *texts[:4]]
    # Tiny shards: rows cross shard boundaries too.
    out, manifest = _cache(tmp_path, tok, docs, shard_tokens=300)
    assert len(manifest["splits"]["train"]["shards"]) > 2
    rows = _rows(out, manifest, seq_len)
    data = rows.read(np.arange(rows.num_rows))
    expected = np.concatenate([tok.encode(t) + [tok.eos_id] for t in docs])
    np.testing.assert_array_equal(_stream_from_rows(data), expected)
    info = manifest["splits"]["train"]
    assert info["num_tokens"] == expected.size and info["num_docs"] == len(docs)
    assert info["num_bytes"] == sum(len(t.encode()) for t in docs)
    assert rows.num_rows == -(-(expected.size - 1) // seq_len)
    for arr in data.values():
        assert arr.dtype == np.int32 and arr.shape == (rows.num_rows, seq_len + 1)


def test_segment_ids_and_positions_reset_at_boundaries(tmp_path, tok) -> None:
    out, manifest = _cache(tmp_path, tok, ["x = 1\n", "def f():\n    return 2\n", "y\n" * 20, "z"])
    rows = _rows(out, manifest, 16)
    data = rows.read(np.arange(rows.num_rows))
    assert data["tokens"][-1, -1] == 0 and data["segment_ids"][-1, -1] == 0  # padded tail
    for toks, seg, pos in zip(*(data[k] for k in doc_rows.ROW_KEYS), strict=True):
        valid = seg != 0
        assert seg[0] == 1 and pos[0] == 0
        assert np.all(toks[~valid] == 0) and np.all(pos[~valid] == 0)
        for j in range(1, int(valid.sum())):
            if toks[j - 1] == tok.eos_id:  # a new document starts after every eos
                assert (seg[j], pos[j]) == (seg[j - 1] + 1, 0)
            else:
                assert (seg[j], pos[j]) == (seg[j - 1], pos[j - 1] + 1)


def test_padded_rows_hold_one_document_each(tmp_path, tok, texts) -> None:
    docs = ["x = 1\n", texts[0], "y = 2\n"]
    out, manifest = _cache(tmp_path, tok, docs)
    rows = _rows(out, manifest, 32, pack=False)
    batch = doc_rows.make_batch(rows.read(np.arange(rows.num_rows)), tok.byte_lengths)
    assert batch["segment_ids"].max() == 1  # never two documents in a row
    targets = [batch["targets"][i][batch["loss_mask"][i] > 0] for i in range(rows.num_rows)]
    # Every token but each document's first is a target exactly once, in order.
    expected = np.concatenate([(tok.encode(t) + [tok.eos_id])[1:] for t in docs])
    np.testing.assert_array_equal(np.concatenate(targets), expected)
    lengths = [len(tok.encode(t)) + 1 for t in docs]
    assert rows.num_rows == sum(-(-(n - 1) // 32) for n in lengths)


def test_loss_mask_and_target_bytes(tmp_path, tok, texts) -> None:
    docs = ["x = 1\n", NON_ASCII, *texts[:2]]
    out, manifest = _cache(tmp_path, tok, docs)
    rows = _rows(out, manifest, 32)
    data = rows.read(np.arange(rows.num_rows))
    batch = doc_rows.make_batch(data, tok.byte_lengths)
    shape = (rows.num_rows, 32)
    assert {k: v.shape for k, v in batch.items()} == {k: shape for k in doc_rows.BATCH_KEYS}
    assert batch["loss_mask"].dtype == np.float32 and batch["target_bytes"].dtype == np.int32
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
    tgt_seg = data["segment_ids"][:, 1:]
    mask = batch["loss_mask"] > 0
    assert not mask[tgt_seg == 0].any()  # padding never counts
    assert not mask[tgt_seg != batch["segment_ids"]].any()  # nor cross-document predictions
    num_tokens = manifest["splits"]["train"]["num_tokens"]
    assert int(mask.sum()) == num_tokens - len(docs)
    first_bytes = int(tok.byte_lengths[[tok.encode(t)[0] for t in docs]].sum())
    assert (
        int(batch["target_bytes"].sum()) + first_bytes == manifest["splits"]["train"]["num_bytes"]
    )


def test_manifest_records_source_tokenizer_and_counts(tmp_path, tok) -> None:
    out, manifest = _cache(tmp_path, tok, ["a\n", "b\n", "a\n"], valid=["held out\n"])
    assert cache_format.read_manifest(str(out)) == manifest
    assert manifest["source"].startswith("jsonl:") and manifest["tokenizer_sha256"] == tok.sha256
    assert manifest["splits"]["train"]["num_docs"] == 3  # RAW cleaning keeps duplicates
    assert set(manifest["baselines"]) == {"zlib-9", "xz-9"}
    assert (out / cache_format.TOKENIZER).read_bytes() == tok.path.read_bytes()
    assert np.load(out / "train-00000.tokens.npy").dtype == np.uint16  # vocab < 65536
    empty = _jsonl_source(tmp_path / "e", ["\n\n", "   \n"], ["x\n"])
    with pytest.raises(DataError, match="no train documents after cleaning") as err:
        prepare.prepare_source(empty, str(tmp_path / "e_out"), tok, ReadOptions(), CleanConfig())
    assert "\n" not in str(err.value)


# --- step-addressed sampling ----------------------------------------------------------------


def test_row_order_is_a_permutation_per_epoch() -> None:
    order = sampling.RowOrder(1000, seed=3)
    p0, p1 = order.permutation(0), order.permutation(1)
    assert sorted(p0.tolist()) == list(range(1000)) and not np.array_equal(p0, p1)
    np.testing.assert_array_equal(order.rows(np.arange(990, 1010)), np.r_[p0[990:], p1[:10]])
    keys = np.random.SeedSequence([3, 0, 0]).generate_state(4, np.uint64)
    np.testing.assert_array_equal(sampling.keyed_permutation(np.arange(1000), 1000, keys), p0)
    other = sampling.RowOrder(1000, seed=4)
    assert not np.array_equal(other.permutation(0), p0)
    assert sampling.RowOrder(5, 0, shuffle=False).rows(np.arange(7)).tolist() == [
        0,
        1,
        2,
        3,
        4,
        0,
        1,
    ]
    with pytest.raises(ValueError, match="no data: the split has no rows"):
        sampling.RowOrder(0, seed=0)


def test_single_source_steps_walk_epochs() -> None:
    sampler = sampling.StepSampler([10], [1.0], batch_size=4, seed=7)
    seen = np.concatenate([sampler.rows_for_step(s)[1] for s in range(5)])
    order = sampler.orders[0]
    np.testing.assert_array_equal(seen, np.r_[order.permutation(0), order.permutation(1)])


def test_mixture_weights_within_tolerance() -> None:
    weights = [0.6, 0.3, 0.1]
    sampler = sampling.StepSampler([50, 2000, 7], weights, batch_size=16, seed=1)
    steps = [sampler.rows_for_step(s) for s in range(400)]
    sources = np.concatenate([s for s, _ in steps])
    np.testing.assert_allclose(np.bincount(sources) / sources.size, weights, atol=0.002)
    for s, _ in steps[:50]:  # every batch is close to the weights, not only on average
        assert np.all(np.abs(np.bincount(s, minlength=3) - 16 * np.array(weights)) < 2)
    # Each source walks its own epochs (no row repeats within one), so rows are used evenly.
    for m, size in ((0, 50), (2, 7)):
        uses = np.bincount(np.concatenate([r[s == m] for s, r in steps]), minlength=size)
        assert uses.size == size and uses.max() - uses.min() <= 1
    with pytest.raises(ValueError, match="too small for a mixture"):
        sampling.StepSampler([5] * 5, [1.0] * 5, batch_size=8, seed=0)


# --- batches for any number of processes -----------------------------------------------------


@pytest.fixture(scope="module")
def mixture(tmp_path_factory, tok, texts) -> TextData:
    tmp = tmp_path_factory.mktemp("mix")
    a = _jsonl_source(tmp / "a", texts[:6], texts[6:8])
    b = _jsonl_source(tmp / "b", ["short doc\n", "another one\n"] * 10, ["val b\n", "v\n"])
    c = tiny_config(source=f"{a.name}@0.75,{b.name}@0.25")
    c.data.cache_dir = str(tmp / "cache")
    c.data.tokenizer = str(tok.path)
    c.data.dedup = False
    return TextData(config_lib.data_spec(c), tok, _quiet)


def test_global_batch_is_the_same_for_1_2_4_processes(mixture, monkeypatch) -> None:
    reads = []
    for rows in mixture.train + mixture.valid:  # count what each process reads
        counted = lambda ids, read=rows.read: reads.append(len(ids)) or read(ids)  # noqa: E731
        monkeypatch.setattr(rows, "read", counted)
    for step in (0, 3, 250):
        whole = mixture.train_batch(step, 0, 1)
        for n in (2, 4):
            reads.clear()
            parts = [mixture.train_batch(step, i, n) for i in range(n)]
            assert sum(reads) == 8 and max(reads) <= 8 // n  # each reads only its share
            for k in doc_rows.BATCH_KEYS:
                np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])
    whole = mixture.eval_batches(0, 0, 1)
    parts = [mixture.eval_batches(0, i, 4) for i in range(4)]
    for b, batch in enumerate(whole):
        for k in doc_rows.BATCH_KEYS:
            np.testing.assert_array_equal(np.concatenate([p[b][k] for p in parts]), batch[k])
    with pytest.raises(ValueError, match="does not divide over 3 processes"):
        mixture.train_batch(0, 0, 3)


def test_resume_needs_no_iterator_state(mixture, tok) -> None:
    # A fresh object (a restarted process) gives the same batch at any step, in any order.
    again = TextData(mixture.spec, tok, _quiet)
    for step in (17, 0, 5, 17):
        a, b = mixture.train_batch(step, 0, 1), again.train_batch(step, 0, 1)
        for k in doc_rows.BATCH_KEYS:
            np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(mixture.train_batch(1, 0, 1)["inputs"], a["inputs"])


def test_eval_batches_cover_every_validation_row_once(mixture) -> None:
    batches = mixture.eval_batches(0, 0, 1)
    counted = sum(float(b["loss_mask"].sum()) for b in batches)
    docs = sum(r.split.num_docs for r in mixture.valid)
    assert counted == sum(r.split.num_tokens for r in mixture.valid) - docs
    assert len(mixture.eval_batches(1, 0, 1)) == 1


def test_make_source_records_tokenizer_and_refuses_another(tmp_path, tok) -> None:
    spec = _jsonl_source(tmp_path / "src", ["a = 1\n" * 30, "b = 2\n" * 30], ["c = 3\n" * 30])
    c = tiny_config(source=spec.name)
    c.data.cache_dir = str(tmp_path / "cache")
    c.data.tokenizer = str(tok.path)
    data = source.build_source(config_lib.data_spec(c), tmp_path / "run", log=_quiet)
    assert data.tokenizer_sha256 == tok.sha256 and data.vocab_size == 512 and data.packed
    assert set(data.baselines) == {"zlib-9", "xz-9"}
    described = data.description
    assert not (tmp_path / "run" / "data.json").exists()  # training writes it, not the source
    assert described["tokenizer_sha256"] == tok.sha256
    assert described["sources"][0]["train"]["documents"] == 2
    other = tokenizer.train_tokenizer(corpus.read_split("train")[:5], tmp_path / "o.model", 400)
    c.data.tokenizer = str(other.path)
    with pytest.raises(DataError, match="trained with another tokenizer"):
        source.build_source(config_lib.data_spec(c), tmp_path / "run", log=_quiet)
    # A prepared cache made with one tokenizer is refused by a run using another.
    cache_dir = described["sources"][0]["cache"]
    c.data.source = f"prepared:{cache_dir}"
    with pytest.raises(DataError, match="was tokenized with tokenizer") as err:
        source.build_source(config_lib.data_spec(c), tmp_path / "run2", log=_quiet)
    assert "\n" not in str(err.value)


# --- TFDS (mocked: nothing is downloaded) ---------------------------------------------------


@pytest.mark.parametrize("name", ["lm1b", "c4/en"])
def test_tfds_sources_with_mock_data(tmp_path, tok, name) -> None:
    tfds = pytest.importorskip("tensorflow_datasets")
    spec = sources.parse_sources(f"tfds:{name}")[0]
    opts = ReadOptions(eval_split="test" if name == "lm1b" else "validation")
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        docs = list(sources.documents(spec, "validation", opts))
        manifest = prepare.prepare_source(spec, str(tmp_path), tok, opts, RAW, log=_quiet)
    assert len(docs) == 12 and all(isinstance(d, str) and d for d in docs)
    assert manifest["splits"]["train"]["num_docs"] == 12
    rows = _rows(tmp_path, manifest, 8)
    assert rows.read(np.arange(rows.num_rows))["segment_ids"].max() >= 1
    with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
        with pytest.raises(DataError, match="has no feature 'body'"):
            list(sources.documents(spec, "train", ReadOptions(text_key="body")))


def test_tfds_builder_of_the_embedded_corpus(tmp_path) -> None:
    pytest.importorskip("tensorflow_datasets")
    opts = ReadOptions(tfds_data_dir=str(tmp_path))
    docs = list(sources.documents(SourceSpec("tfds", "python_stdlib"), "validation", opts))
    assert docs == corpus.read_split("validation")
    assert (tmp_path / "python_stdlib" / corpus.config_name() / "1.0.0").is_dir()


# --- the jaxlm-data command -----------------------------------------------------------------


def test_cli_prepare_inspect_bench(tmp_path, tok) -> None:
    spec = _jsonl_source(tmp_path / "src", [f"value_{i} = {i}\n" * 20 for i in range(30)], ["x\n"])
    experiment = tmp_path / "exp.py"
    experiment.write_text(
        "from jaxlm.config import base_config\n"
        "def get_config():\n"
        "    c = base_config()\n"
        f"    c.data.source = {spec.name!r}\n"
        f"    c.data.tokenizer = {str(tok.path)!r}\n"
        f"    c.data.cache_dir = {str(tmp_path / 'cache')!r}\n"
        "    c.data.seq_len, c.data.batch_size = 16, 4\n"
        "    return c\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    base = [sys.executable, "-m", "jaxlm.cli.data"]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*base, *args, "--config", str(experiment)],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    out = run("prepare", "--out", str(tmp_path / "prepared"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "30 documents: 30 kept" in out.stdout
    assert f"--config.data.source=prepared:{tmp_path / 'prepared'}" in out.stdout
    shown = run("inspect", "--rows", "1", f"--config.data.source=prepared:{tmp_path}/prepared")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "segment 1: positions 0-" in shown.stdout and "loss_mask" in shown.stdout
    bench = run("bench", "--steps", "20")
    assert bench.returncode == 0, bench.stderr[-2000:]
    result = json.loads(bench.stdout.strip().splitlines()[-1])
    assert result["raw_tokens_per_sec"] > 0 and result["cache_tokens_per_sec"] > 0
    bad = run("inspect", "--config.data.source=text:/nonexistent/*.txt")
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("jaxlm-data: error: text:/nonexistent")
    examples = run(
        "inspect", "--config.task.objective=seq2seq", "--config.model.family=encoder_decoder",
        "--config.data.input_key=text", "--config.data.target_key=text",
    )  # fmt: skip
    assert examples.returncode == 2  # a usage error
    last = examples.stderr.strip().splitlines()[-1]
    assert last.startswith("jaxlm-data: error: jaxlm-data inspect reads documents"), last
    assert "`jaxlm-data prepare` builds their cache" in last
