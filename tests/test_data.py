"""Tests for jaxlm.data: corpus, tokenizer, TFDS builder, packing and step-addressed batches."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jaxlm.data import corpus, pipeline, tokenizer

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
    texts = corpus.read_split("train")[:20]
    a = tokenizer.train_tokenizer(texts, tmp_path / "a.model", vocab_size=400)
    b = tokenizer.train_tokenizer(texts, tmp_path / "b.model", vocab_size=400)
    assert a.sha256 == b.sha256
    calls = []

    def texts_fn() -> list[str]:
        calls.append(1)
        return texts

    c = tokenizer.get_or_train_tokenizer(texts_fn, 400, "bpe", tmp_path, "src")
    d = tokenizer.get_or_train_tokenizer(texts_fn, 400, "bpe", tmp_path, "src")
    assert c.path == tmp_path / "tokenizers" / "src_bpe_400.model" == d.path
    assert len(calls) == 1 and c.sha256 == a.sha256
    assert not [p for p in c.path.parent.iterdir() if p.suffix == ".tmp"]
    with pytest.raises(ValueError, match="vocab_size 270 is too small"):
        tokenizer.train_tokenizer(texts, tmp_path / "tiny.model", vocab_size=270)


def test_bad_model_files_give_one_line_errors(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "corrupt.model"
    bad.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    with pytest.raises(ValueError, match="is not a SentencePiece model") as err:
        tokenizer.Tokenizer(bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    missing = tmp_path / "missing.model"
    with pytest.raises(FileNotFoundError) as err2:
        tokenizer.Tokenizer(missing)
    assert str(missing) in str(err2.value) and "\n" not in str(err2.value)


# --- packing ------------------------------------------------------------------------------


def _stream_from_rows(packed: pipeline.PackedSplit) -> np.ndarray:
    """Undo packing: first row whole, later rows minus their overlapping first token."""
    parts = [packed.tokens[0]] + [row[1:] for row in packed.tokens[1:]]
    seg = [packed.segment_ids[0]] + [row[1:] for row in packed.segment_ids[1:]]
    return np.concatenate(parts)[np.concatenate(seg) != 0]


@pytest.mark.parametrize("seq_len", [1, 7, 64])
def test_packing_loses_and_duplicates_no_token(
    tok: tokenizer.Tokenizer, validation_texts: list[str], seq_len: int
) -> None:
    texts = ["a = 1\n", "", NON_ASCII, *validation_texts[:3]]
    packed = pipeline.pack_split(texts, tok, seq_len)
    expected = np.concatenate([tok.encode(t) + [tok.eos_id] for t in texts])
    np.testing.assert_array_equal(_stream_from_rows(packed), expected)
    assert packed.num_tokens == expected.size
    assert packed.num_docs == len(texts)
    assert packed.num_bytes == sum(len(t.encode()) for t in texts)
    assert packed.tokens.shape == (-(-(expected.size - 1) // seq_len), seq_len + 1)
    for arr in (packed.tokens, packed.segment_ids, packed.positions):
        assert arr.dtype == np.int32 and arr.shape == packed.tokens.shape


def test_segment_ids_and_positions_reset_at_boundaries(tok: tokenizer.Tokenizer) -> None:
    texts = ["x = 1\n", "def f():\n    return 2\n", "y\n" * 20, "z"]
    packed = pipeline.pack_split(texts, tok, seq_len=16)
    assert packed.tokens[-1, -1] == 0 and packed.segment_ids[-1, -1] == 0  # padded tail
    for toks, seg, pos in zip(packed.tokens, packed.segment_ids, packed.positions, strict=True):
        valid = seg != 0
        assert seg[0] == 1 and pos[0] == 0
        assert np.all(toks[~valid] == 0) and np.all(pos[~valid] == 0)
        for j in range(1, int(valid.sum())):
            if toks[j - 1] == tok.eos_id:  # a new document starts after every eos
                assert (seg[j], pos[j]) == (seg[j - 1] + 1, 0)
            else:
                assert (seg[j], pos[j]) == (seg[j - 1], pos[j - 1] + 1)


def test_loss_mask_and_target_bytes(tok: tokenizer.Tokenizer, validation_texts: list[str]) -> None:
    texts = ["x = 1\n", NON_ASCII, *validation_texts[:2]]
    packed = pipeline.pack_split(texts, tok, seq_len=32)
    batch = pipeline.make_batch(packed, np.arange(packed.num_rows), tok.byte_lengths)
    shape = (packed.num_rows, 32)
    assert {k: v.shape for k, v in batch.items()} == {k: shape for k in pipeline.BATCH_KEYS}
    assert batch["loss_mask"].dtype == np.float32 and batch["target_bytes"].dtype == np.int32
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
    tgt_seg = packed.segment_ids[:, 1:]
    mask = batch["loss_mask"] > 0
    assert not mask[tgt_seg == 0].any()  # padding never counts
    assert not mask[tgt_seg != batch["segment_ids"]].any()  # nor cross-document predictions
    # Every token but each document's first is a target exactly once.
    assert int(mask.sum()) == packed.num_tokens - len(texts)
    firsts = [tok.encode(t)[0] if t else tok.eos_id for t in texts]
    first_bytes = int(tok.byte_lengths[firsts].sum())
    assert int(batch["target_bytes"].sum()) + first_bytes == packed.num_bytes


def test_load_packed_caches(tok: tokenizer.Tokenizer, tmp_path: pathlib.Path) -> None:
    calls = []

    def texts_fn() -> list[str]:
        calls.append(1)
        return ["a = 1\n", "b = 2\n"]

    a = pipeline.load_packed("train", tok, 4, tmp_path, "toy", texts_fn=texts_fn)
    b = pipeline.load_packed("train", tok, 4, tmp_path, "toy", texts_fn=texts_fn)
    assert len(calls) == 1
    assert (tmp_path / "packed" / f"toy_{tok.sha256[:12]}_4_train.npz").is_file()
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.num_docs, a.num_bytes) == (b.num_docs, b.num_bytes) == (2, 12)
    with pytest.raises(ValueError, match="unknown data source"):
        pipeline.load_packed("train", tok, 4, tmp_path, "nope")


# --- sampling -----------------------------------------------------------------------------


def test_step_sampler_is_a_function_of_seed_and_step() -> None:
    a, b = pipeline.StepSampler(100, 8, seed=3), pipeline.StepSampler(100, 8, seed=3)
    for step in (0, 5, 12, 13, 1000):
        np.testing.assert_array_equal(a.rows_for_step(step), b.rows_for_step(step))
    assert not np.array_equal(a.permutation(0), a.permutation(1))
    other = pipeline.StepSampler(100, 8, seed=4)
    assert not np.array_equal(a.rows_for_step(0), other.rows_for_step(0))


@pytest.mark.parametrize("num_rows,batch_size", [(40, 8), (10, 4), (3, 8)])
def test_step_sampler_epochs(num_rows: int, batch_size: int) -> None:
    s = pipeline.StepSampler(num_rows, batch_size, seed=0)
    steps = 3 * num_rows  # enough for 3 full epochs
    seen = np.concatenate([s.rows_for_step(i) for i in range(steps)])
    for e in range(3):
        epoch_rows = seen[e * num_rows : (e + 1) * num_rows]
        np.testing.assert_array_equal(epoch_rows, s.permutation(e))
        assert sorted(epoch_rows.tolist()) == list(range(num_rows))


def test_step_sampler_straddles_epoch_boundary() -> None:
    s = pipeline.StepSampler(10, 4, seed=7)
    p0, p1 = s.permutation(0), s.permutation(1)
    np.testing.assert_array_equal(s.rows_for_step(2), np.concatenate([p0[8:], p1[:2]]))
    np.testing.assert_array_equal(s.rows_for_step(3), p1[2:6])


def test_step_sampler_sequential_and_empty() -> None:
    s = pipeline.StepSampler(5, 3, seed=0, shuffle=False)
    assert s.rows_for_step(0).tolist() == [0, 1, 2]
    assert s.rows_for_step(1).tolist() == [3, 4, 0]
    with pytest.raises(ValueError, match="no data: the split has no rows"):
        pipeline.StepSampler(0, 4, seed=0)


# --- synthetic data, compression, imports --------------------------------------------------


def test_synthetic_batch_is_deterministic_and_learnable() -> None:
    a = pipeline.synthetic_batch(5, 4, 64, 100, seed=1)
    b = pipeline.synthetic_batch(5, 4, 64, 100, seed=1)
    c = pipeline.synthetic_batch(6, 4, 64, 100, seed=1)
    assert set(a) == set(pipeline.BATCH_KEYS)
    for k in a:
        assert a[k].shape == (4, 64)
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["inputs"], c["inputs"])
    assert a["inputs"].max() < 100 and a["inputs"].min() >= 0
    np.testing.assert_array_equal(a["targets"][:, :-1], a["inputs"][:, 1:])
    np.testing.assert_array_equal(a["positions"][0], np.arange(64))
    # Learnable: the most common successor of each token explains most transitions.
    pairs = np.stack([a["inputs"].ravel(), a["targets"].ravel()], 1)
    succ = {}
    for x, y in pairs.tolist():
        succ.setdefault(x, []).append(y)
    hits = sum(max(ys.count(y) for y in ys) for ys in succ.values())
    assert hits / len(pairs) > 0.8


def test_compression_bits_per_byte(validation_texts: list[str]) -> None:
    bpb = pipeline.compression_bits_per_byte(validation_texts[:5])
    assert set(bpb) == {"zlib-9", "xz-9"}
    assert 0.5 < bpb["xz-9"] < bpb["zlib-9"] < 4.0


def test_light_modules_do_not_import_tensorflow() -> None:
    code = (
        "import sys\n"
        "import jaxlm.data, jaxlm.data.corpus, jaxlm.data.tokenizer, jaxlm.data.pipeline as p\n"
        "p.synthetic_batch(0, 2, 8, 50, seed=0)\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr


# --- TFDS ---------------------------------------------------------------------------------


def test_tfds_builder_matches_read_split(
    tok: tokenizer.Tokenizer, tmp_path: pathlib.Path, validation_texts: list[str]
) -> None:
    from jaxlm.data import stdlib_builder

    ds = stdlib_builder.load_split("validation", data_dir=str(tmp_path / "tfds"))
    examples = list(ds.as_numpy_iterator())
    assert [ex["text"].decode() for ex in examples] == validation_texts
    expected_paths = [rel for rel, _ in corpus.iter_split("validation")]
    assert [ex["path"].decode() for ex in examples] == expected_paths
    prepared = tmp_path / "tfds" / "python_stdlib" / corpus.config_name() / "1.0.0"
    assert prepared.is_dir()
    # load_packed reads the same builder (data_dir = cache_dir/tfds, already prepared above).
    packed = pipeline.load_packed("validation", tok, 128, tmp_path, "python_stdlib")
    direct = pipeline.pack_split(validation_texts, tok, 128)
    np.testing.assert_array_equal(packed.tokens, direct.tokens)
    assert packed.num_bytes == direct.num_bytes
