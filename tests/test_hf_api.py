"""LanguageModel in transformers' terms: max_length and num_return_sequences, class
probabilities (encoder and decoder heads) and masked-token fill-in, on tiny real runs."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from jaxlm import config as config_lib
from jaxlm import config_checks, train
from jaxlm.config import ConfigError
from jaxlm.inference import LanguageModel, evaluate_run

ROOT = Path(__file__).resolve().parents[1]
WORDS = "import os sys path def return class self value list dict print open read".split()
NAMES = ("neg", "pos", "other")


@pytest.fixture(scope="module")
def lm(stdlib_lm_run):
    return LanguageModel.load(stdlib_lm_run)


@pytest.fixture(scope="module")
def mlm(stdlib_mlm_run):
    return LanguageModel.load(stdlib_mlm_run)


def _labelled(directory: Path) -> str:
    """JSONL train/validation splits of short word sequences labelled 0-2 (clean already)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("validation", 20)):
        rows = [
            {"text": " ".join(rng.choice(WORDS, int(rng.integers(1, 20)))), "label": i % 3}
            for i in range(n)
        ]
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"jsonl:{directory}/{{split}}.jsonl"


def _fine_tuned_classifier(tmp: Path, pretrained: Path, family: str, pooling: str) -> Path:
    """2 classify steps from a pretrained run, on its tokenizer: the workflow of a user. The
    encoder's rows start with the tokenizer's CLS (BOS for SentencePiece), as BERT's do."""
    c = tiny_config(source=_labelled(tmp), objective="classify")
    c.data.prepend_cls = family == "encoder"
    c.model.family, c.model.pooling, c.model.max_len = family, pooling, 32
    c.model.vocab_size, c.model.num_classes, c.task.class_names = 0, 3, NAMES
    c.data.tokenizer, c.data.cache_dir = str(pretrained / "tokenizer.model"), str(tmp / "cache")
    c.data.input_key, c.data.seq_len = "text", 16
    c.train.init_from, c.train.steps, c.train.checkpoint_every = str(pretrained), 2, 2
    train.train(c, tmp / "run")
    return tmp / "run"


@pytest.fixture(scope="module")
def encoder_clf(stdlib_mlm_run, tmp_path_factory):
    return _fine_tuned_classifier(tmp_path_factory.mktemp("enc"), stdlib_mlm_run, "encoder", "mean")


@pytest.fixture(scope="module")
def decoder_clf(stdlib_lm_run, tmp_path_factory):
    return _fine_tuned_classifier(tmp_path_factory.mktemp("dec"), stdlib_lm_run, "decoder", "auto")


# --- generation: max_length and num_return_sequences ----------------------------------------


def test_max_length_caps_each_row_at_prompt_plus_new_tokens(lm):
    prompts = [lm.prompt_ids(p) for p in ("import ", "def main():\n")]
    lengths = [len(p) for p in prompts]
    total = max(lengths) + 3
    limits = [total - n for n in lengths]
    assert limits[0] > limits[1]  # the rows get different budgets
    for temperature in (0.0, 1.0):
        settings = lm.sampling_settings(max_new_tokens=max(limits), temperature=temperature)
        capped = lm.generate_ids(prompts, settings, seed=3, limits=limits)
        free = lm.generate_ids(prompts, settings, seed=3)
        # The same stream of tokens, each row cut at its own limit.
        for row, full, limit, n in zip(capped, free, limits, lengths, strict=True):
            assert row == full[:limit] and n + len(row) <= total
        texts = lm.generate(
            ["import ", "def main():\n"],
            max_length=total,
            temperature=temperature,
            seed=3,
        )
        eos = settings.eos_id
        kept = [[t for t in x if t != eos] for x in capped]
        assert texts == [lm.continuation(p, x) for p, x in zip(prompts, kept, strict=True)]


def test_max_length_equals_max_new_tokens_and_num_return_sequences_num_samples(lm):
    n = len(lm.prompt_ids("import "))
    hf = lm.generate(["import "], max_length=n + 5, num_return_sequences=3, temperature=1.0)
    ours = lm.generate(["import "], max_new_tokens=5, num_samples=3, temperature=1.0)
    assert hf == ours and len(hf) == 3 and len(set(hf)) > 1
    two = lm.generate(["import ", "def "], max_new_tokens=2, num_samples=2, temperature=0.0)
    assert len(two) == 4 and two[0] == two[1] and two[2] == two[3]  # prompt by prompt


def test_generation_length_errors(lm):
    n = len(lm.prompt_ids("import "))
    cases = [
        (dict(max_new_tokens=4, max_length=20), "pass max_new_tokens or max_length, not both"),
        (dict(max_length=n), f"max_length {n} leaves no new token after a prompt of {n} tokens"),
        (dict(max_length=33), "max_length 33 exceeds the model's context of 32 tokens"),
        (dict(num_samples=2, num_return_sequences=3), "are one setting; pass one"),
        (dict(num_return_sequences=0), r"num_samples \(num_return_sequences\) must be >= 1"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            lm.generate(["import "], **kwargs)


def test_cli_refuses_both_lengths(stdlib_lm_run):
    r = subprocess.run(
        [sys.executable, "-m", "jaxlm.cli.generate", "--workdir", str(stdlib_lm_run),
         "--prompt", "import ", "--max_new_tokens", "4", "--max_length", "20"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "jaxlm-generate: error: pass --max_new_tokens or --max_length, not both (--max_length "
        "counts the prompt's tokens too, as transformers' max_length)"
    ]


# --- classification -------------------------------------------------------------------------


TEXTS = ["import os", "def value(self):\n    return self.value", "print"]


def _jit(lm: LanguageModel, fn):
    """fn(model, tokens) compiled: eager calls on the 8 sharded fake devices take seconds."""
    return jax.jit(lambda params, x: fn(nnx.merge(lm.state.graphdef, params), x))


def _unpadded_probs(clf: LanguageModel, text: str) -> np.ndarray:
    """The head's softmax on the exact row (no padding, no segment ids)."""
    head = [clf.tokenizer.cls_id] if clf.config.data.prepend_cls else []
    ids = head + clf.encode(text)[: clf.config.data.seq_len - 1 - len(head)]
    ids += [clf.tokenizer.eos_id]
    probs = _jit(clf, lambda m, x: jax.nn.softmax(m.classify(x), axis=-1))
    return np.asarray(probs(clf.params, np.asarray([ids], np.int32)))[0]


@pytest.mark.parametrize("run", ["encoder_clf", "decoder_clf"])
def test_classify_is_padding_free_probabilities(request, run):
    clf = LanguageModel.load(request.getfixturevalue(run))
    probs = clf.classify(TEXTS)
    assert probs.shape == (3, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    for text, row in zip(TEXTS, probs, strict=True):
        np.testing.assert_allclose(clf.classify([text])[0], row, atol=1e-6)
    for text, row in zip(TEXTS[:2], probs, strict=False):  # each length compiles once
        np.testing.assert_allclose(_unpadded_probs(clf, text), row, atol=1e-6)
    # Chunks of 2 (the last one filled up) give the same rows.
    np.testing.assert_allclose(clf.classify(TEXTS, batch_size=2), probs, atol=1e-6)
    assert clf.class_names == NAMES
    assert clf.classify([]).shape == (0, 3)


def test_classify_reproduces_the_eval_program(encoder_clf):
    """Rows are built as the classify data builds them: same loss and accuracy as jaxlm-eval."""
    clf = LanguageModel.load(encoder_clf)
    rows = [
        json.loads(x)
        for x in (encoder_clf.parent / "validation.jsonl").read_text().split("\n")
        if x
    ]
    probs = clf.classify([r["text"] for r in rows])
    labels = np.array([r["label"] for r in rows])
    metrics = evaluate_run(encoder_clf, max_batches=0)
    np.testing.assert_allclose(
        -np.log(probs[np.arange(len(rows)), labels]).mean(), metrics["loss"], rtol=1e-5
    )
    assert (probs.argmax(1) == labels).mean() == pytest.approx(metrics["accuracy"])


def test_classify_errors(lm, mlm, encoder_clf):
    for model in (lm, mlm):
        with pytest.raises(ValueError, match="no classification head .*num_classes=N"):
            model.classify(["import os"])
    c = config_lib.load_run_config(encoder_clf)
    c.task.class_names = ("neg", "pos")
    with pytest.raises(ConfigError, match="task.class_names has 2 names for model.num_classes=3"):
        config_checks.validate(c)


# --- fill-mask ------------------------------------------------------------------------------


def test_fill_mask_returns_the_top_tokens_of_each_mask(mlm):
    tok = mlm.tokenizer
    assert tok.id_to_piece(tok.mask_id) == "<mask>"
    text = "import <mask>\nfrom os <mask> path\n"
    got = mlm.fill_mask(text, top_k=4)
    ids = tok.encode("import ") + [tok.mask_id] + tok.encode("\nfrom os ")
    ids += [tok.mask_id] + tok.encode(" path\n") + [tok.eos_id]
    # The exact row, no padding: softmax over the vocabulary at the two mask positions.
    logits = np.asarray(_jit(mlm, lambda m, x: m(x))(mlm.params, np.asarray([ids])), np.float64)[0]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    positions = [i for i, t in enumerate(ids) if t == tok.mask_id]
    assert len(got) == len(positions) == 2
    for candidates, pos in zip(got, positions, strict=True):
        best = np.argsort(-probs[pos])[:4]
        assert [c["token"] for c in candidates] == best.tolist()
        np.testing.assert_allclose([c["score"] for c in candidates], probs[pos][best], atol=1e-6)
        assert [c["token_str"] for c in candidates] == [tok.decode([int(t)]) for t in best]


def test_fill_mask_errors(lm, mlm):
    with pytest.raises(ValueError, match="no <mask> in the text: write <mask> where"):
        mlm.fill_mask("import os")
    with pytest.raises(ValueError, match="top_k must be in 1..512"):
        mlm.fill_mask("import <mask>", top_k=0)
    with pytest.raises(ValueError, match="exceeds the model's rows of 32 tokens"):
        mlm.fill_mask("x = 1\n" * 20 + "<mask>")
    with pytest.raises(ValueError, match="fill_mask needs a masked LM .*decoder model"):
        lm.fill_mask("import <mask>")
