"""Seq2seq generation metrics: batched greedy and beam decoding of validation inputs, jaxlm-eval.

The decoder runs on a real `train.Setup` over a 2x2x2 mesh (rows split over data and fsdp,
parameters over fsdp and tensor); the references are computed without any sharding.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from jaxlm import inference, seq2seq_eval, text_metrics, train
from jaxlm.data import tokenizer
from jaxlm.data.builtin import corpus
from jaxlm.decode_settings import BeamSettings
from jaxlm.generate import make_beam_search
from jaxlm.objectives import shift_right
from jaxlm.seq2seq_eval import decode_examples, decode_ids

ROOT = Path(__file__).resolve().parents[1]
N = 8  # data.target_len: decoded tokens per example, EOS included
# Seven sources (two batches of 4, the last padded with a filler row) of different lengths; the
# 20-token one is longer than data.seq_len (16) and is truncated to it.
LENGTHS = [3, 16, 9, 1, 12, 20, 5]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(setup, params, tokenizer, sources): a random-init model whose greedy outputs end early
    on some rows and run to N tokens on others."""
    tmp = tmp_path_factory.mktemp("s2s")
    tok = tokenizer.train_tokenizer(corpus.read_split("train")[:20], tmp / "t.model", 400)
    c = tiny_config(objective="seq2seq")
    c.model.vocab_size, c.model.num_layers, c.model.tie_embeddings = tok.vocab_size, 1, False
    c.data.batch_size, c.data.target_len = 4, N
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    s = train.setup(c, tmp)
    params = train.create_state(s)["params"]
    rng = np.random.default_rng(0)
    sources = [np.append(rng.integers(3, tok.vocab_size, n - 1), tok.eos_id) for n in LENGTHS]
    # A random model rarely picks EOS: give it the output column of a token greedy decoding
    # emits mid-sequence (scaled up, so EOS wins wherever that token would), and rows that
    # reach that token stop there.
    first = decode_ids(s, params, sources, settings())
    head = params["lm_head"]
    bumped = head.at[:, tok.eos_id].set(1.05 * head[:, first[0][3]])
    params = {**params, "lm_head": jax.device_put(bumped, head.sharding)}
    return s, params, tok, [x.astype(np.int32) for x in sources]


def settings(**kw) -> BeamSettings:
    return BeamSettings(**{"beam_size": 1, "max_new_tokens": N, "eos_id": 1, "pad_id": 0, **kw})


def stepwise_argmax(s, params, sources) -> list[list[int]]:
    """Greedy decoding by full teacher-forced passes: token t is the argmax at position t of
    model(source, shift_right(tokens so far)); each row cut before its EOS."""
    src, lengths = seq2seq_eval.padded_sources(sources, s.config.data.seq_len)
    seg = (np.arange(src.shape[1]) < lengths[:, None]).astype(np.int32)
    graphdef = s.graphdef
    # Unsharded: plain host copies of the parameters.
    params = jax.tree.map(np.asarray, params)

    @jax.jit
    def logits(params, src, seg, out):
        model = nnx.merge(graphdef, params)
        return model(src, shift_right(out, 0), encoder_segment_ids_BS=seg)

    out = np.zeros((len(sources), N), np.int32)
    for t in range(N):
        out[:, t] = np.argmax(np.asarray(logits(params, src, seg, out))[:, t], axis=-1)
    return [seq2seq_eval.strip_output(row, eos_id=1, pad_id=0) for row in out]


def test_padding_truncation_and_stripping():
    ids, lengths = seq2seq_eval.padded_sources([[5, 1], list(range(2, 9)) + [1]], 4)
    np.testing.assert_array_equal(ids, [[5, 1, 0, 0], [2, 3, 4, 1]])
    np.testing.assert_array_equal(lengths, [2, 4])
    assert seq2seq_eval.strip_output([7, 0, 8, 1, 9, 1], eos_id=1, pad_id=0) == [7, 8]
    assert seq2seq_eval.strip_output([7, 8], eos_id=1, pad_id=0) == [7, 8]
    with pytest.raises(ValueError, match="empty input"):
        seq2seq_eval.padded_sources([[]], 4)


def test_greedy_decoding_is_the_teacher_forced_argmax(run):
    s, params, tok, sources = run
    got = decode_ids(s, params, sources, settings())
    assert got == stepwise_argmax(s, params, sources)
    # Both kinds of row are exercised: some stop at EOS, some run to max_new_tokens.
    assert min(map(len, got)) < N - 1 and max(map(len, got)) == N
    assert len({tuple(x) for x in got}) > 1  # the source matters
    texts = decode_examples(s, params, [{"input_ids": x} for x in sources], tok, settings())
    assert texts == [tok.decode(x) for x in got]


def test_beam_search_keeps_the_best_hypothesis(run):
    """Batched, padded and sharded beams equal one unsharded make_beam_search call."""
    s, params, _, sources = run
    w, alpha = 3, 0.6
    got = decode_ids(s, params, sources, settings(beam_size=w, length_penalty=alpha))
    src, lengths = seq2seq_eval.padded_sources(sources, s.config.data.seq_len)
    search = make_beam_search(s.graphdef, BeamSettings(w, N, alpha, eos_id=1, pad_id=0), start_id=0)
    seqs, _, _ = search(jax.tree.map(np.asarray, params), jnp.asarray(src), jnp.asarray(lengths))
    expect = [seq2seq_eval.strip_output(x, 1, 0) for x in np.asarray(seqs)[:, 0]]
    assert got == expect
    assert got != decode_ids(s, params, sources, settings())  # beams found other outputs


def test_decoding_compiles_once_per_settings(run):
    s, params, _, sources = run
    decode_ids(s, params, sources[:2], settings())
    before = seq2seq_eval._compiled.cache_info()
    decode_ids(s, params, sources[2:], settings())
    after = seq2seq_eval._compiled.cache_info()
    assert (after.hits, after.misses) == (before.hits + 1, before.misses)


def test_bad_settings_are_one_line_value_errors(tmp_path):
    with pytest.raises(ValueError, match="--beam_size must be >= 1"):
        settings(beam_size=0).check()
    with pytest.raises(ValueError, match="--length_penalty must be >= 0"):
        settings(length_penalty=-1.0).check()
    # Checked before anything is loaded (there is no run in tmp_path).
    from jaxlm import inference

    with pytest.raises(ValueError, match="--max_decode_examples must be >= 0"):
        inference.evaluate_run(tmp_path, max_decode_examples=-1)
    proc = eval_cli("--workdir", str(tmp_path), "--beam_size", "0")
    assert proc.returncode == 2  # a usage error
    assert proc.stderr.strip().splitlines()[-1] == (
        "jaxlm-eval: error: --beam_size must be >= 1 (1 is greedy), got 0"
    )


def eval_cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "jaxlm.cli.eval", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=300)


def test_synthetic_data_is_decoded_from_its_validation_batches(run, tmp_path):
    """Without eval_examples (synthetic copy tasks) the batches' rows are decoded, ids as text."""
    s, params, _, _ = run
    samples_path = tmp_path / "samples.jsonl"
    out = seq2seq_eval.evaluate_generation(
        s, params, num_examples=6, num_batches=2, samples_path=str(samples_path)
    )
    assert out["decoded_examples"] == 6 and out["beam_size"] == 1
    samples = [json.loads(x) for x in samples_path.read_text().splitlines()]
    batches = s.data.eval_batches(2, 0, 1)  # all processes' rows: batch_size 4 each
    inputs, seg = (np.concatenate([b[k] for b in batches]) for k in ("inputs", "input_segment_ids"))
    for i, x in enumerate(samples):
        src = inputs[i][seg[i] > 0]
        assert x["input"].split() == [str(t) for t in src[:-1]]  # EOS dropped
        assert x["reference"].split() == x["input"].split()[: N - 1]  # targets copy the input
        ids = decode_ids(s, params, [src], settings())[0]
        assert x["hypothesis"] == " ".join(map(str, ids))
    hyps, refs = [x["hypothesis"] for x in samples], [x["reference"] for x in samples]
    assert out["bleu"] == pytest.approx(text_metrics.bleu(hyps, refs))
    assert out["exact_match"] == pytest.approx(text_metrics.exact_match(hyps, refs))


def test_jaxlm_eval_reports_generation_metrics_of_a_jsonl_task(tmp_path):
    """Train a few steps on JSONL pairs, then jaxlm-eval decodes every validation example with
    beam search and scores the detokenized hypotheses against the cleaned references."""
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat while dogs ran far away and birds sang in old trees".split()

    def pairs(n):
        out = []
        for _ in range(n):
            src = " ".join(rng.choice(words, int(rng.integers(2, 7))))
            out.append({"src": src, "tgt": src.upper() + " "})
        return out

    valid = pairs(10)
    for name, rows in (("train", pairs(64)), ("validation", valid)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [r[k] for r in pairs(200) for k in ("src", "tgt")]
    tok = tokenizer.train_tokenizer(texts, tmp_path / "t.model", vocab_size=300)
    c = tiny_config(f"jsonl:{tmp_path}/{{split}}.jsonl", "seq2seq")
    c.data.input_key, c.data.target_key, c.data.tokenizer = "src", "tgt", str(tok.path)
    c.data.cache_dir = str(tmp_path / "cache")
    c.data.target_len, c.model.num_layers, c.model.vocab_size = N, 1, 0
    c.train.steps, c.train.checkpoint_every, c.train.eval_decode = 2, 2, 10
    workdir = tmp_path / "run"
    train.train(c, workdir)
    # The loop's final eval decoded all 10 validation examples greedily, as jaxlm-eval does.
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    loop = next(r for r in records if "eval/bleu" in r)
    greedy = inference.evaluate_run(workdir, max_batches=0)
    assert (loop["step"], loop["eval/decoded_examples"], greedy["decoded_examples"]) == (2, 10, 10)
    for key in ("bleu", "chrf", "exact_match"):
        assert loop[f"eval/{key}"] == pytest.approx(greedy[key], rel=1e-9), key
    proc = eval_cli(
        "--workdir", str(workdir), "--max_batches", "0", "--beam_size", "2",
        "--length_penalty", "1.0",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["decoded_examples"] == 10
    assert (record["beam_size"], record["length_penalty"]) == (2, 1.0)
    assert {"loss", "perplexity", "accuracy", "bleu", "chrf", "exact_match"} <= set(record)
    lines = (workdir / "eval_samples.jsonl").read_text().splitlines()
    samples = [json.loads(x) for x in lines]
    assert [x["input"] for x in samples] == [r["src"] for r in valid]
    assert [x["reference"] for x in samples] == [r["tgt"].strip() for r in valid]
    hyps, refs = [x["hypothesis"] for x in samples], [x["reference"] for x in samples]
    assert record["bleu"] == pytest.approx(text_metrics.bleu(hyps, refs))
    assert record["exact_match"] == pytest.approx(text_metrics.exact_match(hyps, refs))
