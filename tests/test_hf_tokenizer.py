"""Hugging Face tokenizers behind jaxlm's interface: parity with `tokenizers` itself, byte
accounting, special ids, the loader, and a run trained with one. Tokenizers are trained here,
offline, with the `tokenizers` library."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from conftest import tiny_config
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from jaxlm.data import tokenizer
from jaxlm.data.hf_tokenizer import HFTokenizer

_PIECES = [
    "def f(x):\n    return x ** 2\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    "Café crème brûlée à la façon de Noël, São Paulo, Ærø",
    "naïve résumé coöperate Ångström Ünïcödé",
    "東京は日本の首都です。北京欢迎你！",
    "한국어 텍스트와 日本語のテキスト",
    "emoji 😀🎉👩‍💻 and flags 🇫🇷🇯🇵",
    "tabs\tand   spaces    runs\t\t",
    "line one\nline two\n\n\nline five\r\n",
    "numbers 3.14159 1e-9 0xFF 1_000_000",
    "Ελληνικά και русский текст",
    "العربية מימין לשמאל",
    "quotes 'single' \"double\" `back` «guillemets»",
    "   leading and trailing   ",
    "URL https://example.com/path?q=1&r=2#frag",
]


def varied_strings(n: int = 200, seed: int = 0) -> list[str]:
    """n strings mixing code, accents, CJK, emoji, whitespace runs and newlines."""
    rng = random.Random(seed)
    out = list(_PIECES)
    while len(out) < n:
        parts = rng.sample(_PIECES, rng.randint(1, 3))
        sep = rng.choice([" ", "\n", "  ", "\t", "", "\n\n"])
        out.append(sep.join(parts))
    return out


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return varied_strings(300, seed=1)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, corpus) -> Path:
    """A tiny GPT-2 style byte-level BPE: tokenizer.json and vocab.json + merges.txt."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    out = tmp_path_factory.mktemp("gpt2")
    tok.save(str(out / "tokenizer.json"))
    files = out / "files"
    files.mkdir()
    tok.model.save(str(files))
    return out


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, corpus) -> Path:
    """A tiny uncased BERT WordPiece: tokenizer.json and vocab.txt."""
    tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=800,
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    out = tmp_path_factory.mktemp("bert")
    tok.save(str(out / "tokenizer.json"))
    files = out / "files"
    files.mkdir()
    tok.model.save(str(files))
    return out


def _reference(directory: Path) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))


@pytest.mark.parametrize("name", ["gpt2_dir", "bert_dir"])
def test_encode_decode_equal_tokenizers(request, name):
    directory = request.getfixturevalue(name)
    ref = _reference(directory)
    vocab = "vocab.json" if name == "gpt2_dir" else "vocab.txt"
    forms = [directory / "tokenizer.json", directory, directory / "files" / vocab]
    texts = varied_strings(200)
    for form in forms:
        tok = tokenizer.load(form)
        assert isinstance(tok, HFTokenizer), form
        assert tok.vocab_size == ref.get_vocab_size()
        batch = tok.encode_batch(texts)
        for text, ids in zip(texts, batch, strict=True):
            want = ref.encode(text, add_special_tokens=False).ids
            assert tok.encode(text) == want == ids, (form, text)
            assert tok.decode(ids) == ref.decode(want), (form, text)


def test_byte_level_bpe_counts_every_byte_once(gpt2_dir):
    tok = tokenizer.load(gpt2_dir)
    texts = varied_strings(200)
    total = 0
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text  # byte-level BPE is lossless
        assert int(tok.byte_lengths[ids].sum()) == len(text.encode("utf-8")), text
        total += len(text.encode("utf-8"))
    assert total > 10_000
    assert tok.byte_lengths[tok.eos_id] == 0
    # Text cannot inject a special token: the string is encoded as text, its bytes counted.
    text = "end<|endoftext|>next"
    ids = tok.encode(text)
    assert tok.eos_id not in ids and tok.decode(ids) == text
    assert int(tok.byte_lengths[ids].sum()) == len(text)
    assert _reference(gpt2_dir).encode(text).ids.count(tok.eos_id) == 1  # tokenizers' default
    # A character the corpus never had is two one-byte pieces of the alphabet.
    assert list(tok.byte_lengths[tok.encode("\u0101")]) == [1, 1]


def test_wordpiece_counts_normalized_bytes_without_whitespace(bert_dir):
    """BERT lowercases, strips accents and drops whitespace: a piece counts its bytes without
    `##`, so the sum is the normalized text's bytes less its whitespace."""
    tok = tokenizer.load(bert_dir / "files" / "vocab.txt")
    ref = _reference(bert_dir)
    exact = 0
    for text in varied_strings(200):
        ids = tok.encode(text)
        if tok.unk_id in ids:
            continue
        normalized = "".join(ref.normalizer.normalize_str(text).split())
        assert int(tok.byte_lengths[ids].sum()) == len(normalized.encode("utf-8")), text
        exact += 1
    assert exact >= 150
    # A cased vocabulary (tokenizer_config.json says so) keeps case and accents.
    cased = bert_dir / "cased"
    cased.mkdir()
    (cased / "vocab.txt").write_bytes((bert_dir / "files" / "vocab.txt").read_bytes())
    (cased / "tokenizer_config.json").write_text('{"do_lower_case": false}')
    uncased = tokenizer.load(bert_dir / "files")
    assert (
        tok.unk_id not in uncased.encode("Café")
        and uncased.decode(uncased.encode("Café")) == "cafe"
    )
    assert tokenizer.load(cased).encode("Café") == [tok.unk_id]  # é and C were never seen
    pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    tails = [i for i, p in enumerate(pieces) if p.startswith("##")]
    assert len(tails) > 50
    assert [tok.byte_lengths[i] for i in tails] == [len(pieces[i][2:].encode()) for i in tails]
    assert all(tok.byte_lengths[i] == 0 for i in tok.special_ids)


def test_cache_rows_count_every_document_byte_once(gpt2_dir, tmp_path):
    """Through the cache and packed rows: target bytes plus each document's first token (never
    a target) are the documents' UTF-8 bytes, as the manifest counts them."""
    from jaxlm.data.documents import prepare
    from jaxlm.data.documents import rows as doc_rows
    from jaxlm.data.specs import CleanConfig, ReadOptions, SourceSpec

    tok = tokenizer.load(gpt2_dir / "tokenizer.json")
    docs = varied_strings(200)
    for split, texts in (("train", docs), ("validation", docs[:3])):
        lines = [json.dumps({"text": t}) for t in texts]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    source = SourceSpec("jsonl", f"{tmp_path}/{{split}}.jsonl")
    raw = CleanConfig("none", False, False, 1, 0, False)  # documents exactly as written
    out = tmp_path / "cache"
    manifest = prepare.prepare_source(source, str(out), tok, ReadOptions(), raw, log=lambda _: 0)
    assert manifest["splits"]["train"]["num_bytes"] == sum(len(t.encode()) for t in docs)
    rows = doc_rows.Rows(doc_rows.TokenSplit(out, manifest, "train"), 64, True)
    batch = doc_rows.make_batch(rows.read(np.arange(rows.num_rows)), tok.byte_lengths)
    first = int(tok.byte_lengths[[tok.encode(t)[0] for t in docs]].sum())
    assert int(batch["target_bytes"].sum()) + first == manifest["splits"]["train"]["num_bytes"]
    # Rebuilt in place with a SentencePiece model: only its tokenizer.model is left.
    sp = tokenizer.train_tokenizer(docs, tmp_path / "a.model", 500)
    manifest = prepare.prepare_source(source, str(out), sp, ReadOptions(), raw, log=lambda _: 0)
    assert "tokenizer_file" not in manifest and not (out / "tokenizer.json").exists()
    assert (out / "tokenizer.model").read_bytes() == sp.to_bytes()


def test_special_ids(gpt2_dir, bert_dir):
    gpt2 = tokenizer.load(gpt2_dir / "files" / "vocab.json")
    eot = _reference(gpt2_dir).token_to_id("<|endoftext|>")
    assert (gpt2.eos_id, gpt2.bos_id, gpt2.unk_id) == (eot, eot, eot)
    assert (gpt2.pad_id, gpt2.mask_id, gpt2.cls_id, gpt2.sep_id) == (None, None, None, None)
    assert gpt2.special_ids == (eot,) and gpt2.sentinel_id(0) is None
    bert = tokenizer.load(bert_dir)
    assert (bert.pad_id, bert.unk_id, bert.cls_id, bert.sep_id, bert.mask_id) == (0, 1, 2, 3, 4)
    assert bert.eos_id == bert.sep_id and bert.bos_id is None
    assert bert.special_ids == (0, 1, 2, 3)  # the mask is excluded, as SentencePiece's is


def test_both_implement_the_interface(gpt2_dir, bert_dir, tmp_path):
    sp = tokenizer.train_tokenizer(varied_strings(100), tmp_path / "a.model", 500)
    for tok in (sp, tokenizer.load(gpt2_dir), tokenizer.load(bert_dir)):
        assert isinstance(tok, tokenizer.TokenizerAPI), type(tok)
        assert tok.byte_lengths.shape == (tok.vocab_size,) and tok.filename in tokenizer.RUN_FILES
    assert not isinstance(object(), tokenizer.TokenizerAPI)


def test_sha256_and_run_file(gpt2_dir, bert_dir, tmp_path):
    """tokenizer.json hashes as its bytes; one built from vocab files hashes as the
    tokenizer.json it is saved as, so a run directory's copy has the same hash."""
    path = gpt2_dir / "tokenizer.json"
    tok = tokenizer.load(path)
    assert tok.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert tok.to_bytes() == path.read_bytes() and tok.filename == "tokenizer.json"
    for vocab in (gpt2_dir / "files" / "vocab.json", bert_dir / "files" / "vocab.txt"):
        built = tokenizer.load(vocab)
        saved = tmp_path / vocab.suffix[1:] / built.filename
        saved.parent.mkdir()
        saved.write_bytes(built.to_bytes())
        again = tokenizer.load(saved)
        assert again.sha256 == built.sha256
        assert again.encode("Hello wörld 東京") == built.encode("Hello wörld 東京")
        assert tokenizer.run_file(saved.parent) == saved
    assert tokenizer.run_file(tmp_path) is None


def test_loader_picks_the_implementation(gpt2_dir, tmp_path):
    sp = tokenizer.train_tokenizer(varied_strings(100), tmp_path / "sp" / "a.model", 500)
    data = (tmp_path / "sp" / "a.model").read_bytes()
    assert sp.to_bytes() == data and sp.sha256 == hashlib.sha256(data).hexdigest()
    assert type(tokenizer.load(tmp_path / "sp" / "a.model")) is tokenizer.Tokenizer
    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer.model").write_bytes(data)
    assert type(tokenizer.load(run)) is tokenizer.Tokenizer  # a jaxlm run directory
    assert tokenizer.run_file(run) == run / "tokenizer.model"
    assert type(tokenizer.load(gpt2_dir)) is HFTokenizer
    assert (sp.pad_id, sp.eos_id, sp.bos_id, sp.unk_id) == (0, 1, 2, 3)
    assert (sp.cls_id, sp.sep_id, sp.mask_id) == (2, 1, None)
    with pytest.raises(FileNotFoundError, match="needs .*merges.txt beside it"):
        (tmp_path / "lone").mkdir()
        (tmp_path / "lone" / "vocab.json").write_text(json.dumps({"a": 0}))
        tokenizer.load(tmp_path / "lone")
    (tmp_path / "bad.json").write_text('{"model": 1}')
    with pytest.raises(ValueError, match="is not a Hugging Face tokenizer.json"):
        tokenizer.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json, vocab.json"):
        tokenizer.load(tmp_path / "sp")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tokenizer.load(tmp_path / "missing.json")


def test_lm_trains_evaluates_and_generates_with_a_gpt2_tokenizer(gpt2_dir, tmp_path):
    from jaxlm import inference, train
    from jaxlm.data.types import DataError
    from jaxlm.inference import LanguageModel

    (tmp_path / "text.txt").write_text("\n".join(varied_strings(300, seed=2)))
    c = tiny_config(source=f"file:{tmp_path}/text.txt")
    c.data.tokenizer = str(gpt2_dir / "files" / "vocab.json")
    c.data.cache_dir = str(tmp_path / "cache")
    c.model.vocab_size = 0  # taken from the tokenizer
    c.train.steps = 2
    c.train.eval_steps = 2
    run = tmp_path / "run"
    out = train.train(c, run)
    tok = tokenizer.load(c.data.tokenizer)
    assert (run / "tokenizer.json").read_bytes() == tok.to_bytes()
    assert not (run / "tokenizer.model").exists()
    assert np.isfinite(out["eval/bits_per_byte"]) and out["eval/bits_per_byte"] > 0
    ratio = out["eval/bits_per_byte"] / out["eval/loss"]
    np.testing.assert_allclose(ratio, out["eval/tokens"] / out["eval/bytes"] / np.log(2), rtol=1e-6)
    # jaxlm-eval reproduces the loop's numbers with the run's tokenizer.json.
    again = inference.evaluate_run(run, max_batches=2)
    np.testing.assert_allclose(again["bits_per_byte"], out["eval/bits_per_byte"], rtol=1e-5)
    lm = LanguageModel.load(run)
    assert isinstance(lm.tokenizer, HFTokenizer) and lm.tokenizer.sha256 == tok.sha256
    prompt = lm.prompt_ids("def f(x):")
    [ids] = lm.generate_ids([prompt], lm.sampling_settings(max_new_tokens=3, temperature=0.0))
    assert lm.sampling_settings().pad_id == tok.eos_id  # GPT-2 has no pad piece
    [text] = lm.generate(["def f(x):"], max_new_tokens=3, temperature=0.0)
    assert text == lm.continuation(prompt, [t for t in ids if t != tok.eos_id])
    # Fine-tuning from the run keeps its tokenizer.json (no data.tokenizer given).
    tuned = tiny_config(source=f"file:{tmp_path}/text.txt")
    tuned.data.cache_dir, tuned.model.vocab_size = c.data.cache_dir, 0
    tuned.train.steps, tuned.train.eval_steps, tuned.train.init_from = 1, 1, str(run)
    train.train(tuned, tmp_path / "tuned")
    assert (tmp_path / "tuned" / "tokenizer.json").read_bytes() == tok.to_bytes()
    # The run keeps its tokenizer: another one for the same workdir is refused.
    c.data.tokenizer = str(gpt2_dir.parent / "other.json")
    other = tokenizers.Tokenizer.from_file(str(gpt2_dir / "tokenizer.json"))
    other.add_tokens(["<extra>"])
    other.save(c.data.tokenizer)
    c.train.steps = 3
    with pytest.raises(DataError, match="is not data.tokenizer"):
        train.train(c, run)


def test_jaxlm_data_prepares_with_a_bert_tokenizer_and_mlm_trains_on_it(bert_dir, tmp_path):
    """`jaxlm-data prepare` keeps the Hugging Face tokenizer as tokenizer.json beside the
    shards; a run on the prepared cache finds it there and masks with its [MASK]."""
    import os
    import subprocess
    import sys

    from jaxlm import train
    from jaxlm.data import cache_format

    (tmp_path / "text.txt").write_text("\n".join(varied_strings(300, seed=3)))
    experiment = tmp_path / "exp.py"
    experiment.write_text(
        "from jaxlm.config import base_config\n"
        "def get_config():\n"
        "    c = base_config()\n"
        f"    c.data.source = 'file:{tmp_path}/text.txt'\n"
        f"    c.data.tokenizer = {str(bert_dir / 'files' / 'vocab.txt')!r}\n"
        "    return c\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS="cpu")
    prepared = tmp_path / "prepared"
    cmd = [sys.executable, "-m", "jaxlm.cli.data", "prepare", "--config", str(experiment)]
    out = subprocess.run(
        [*cmd, "--out", str(prepared)], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    tok = tokenizer.load(bert_dir / "files" / "vocab.txt")
    manifest = cache_format.read_manifest(str(prepared))
    assert manifest["tokenizer_file"] == "tokenizer.json"
    assert manifest["tokenizer_sha256"] == tok.sha256 and manifest["eos_id"] == tok.sep_id
    assert (prepared / "tokenizer.json").read_bytes() == tok.to_bytes()
    assert not (prepared / "tokenizer.model").exists()

    c = tiny_config(source=f"prepared:{prepared}", objective="mlm")
    c.model.vocab_size = 0
    c.train.steps = 2
    c.train.eval_steps = 2
    result = train.train(c, tmp_path / "run")
    assert (tmp_path / "run" / "tokenizer.json").read_bytes() == tok.to_bytes()
    assert np.isfinite(result["eval/loss"]) and result["eval/loss"] > 0
