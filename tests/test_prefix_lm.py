"""seq2seq on a decoder-only model (a prefix LM): the loss, greedy and beam decoding, training.

The reference for every check is the plain causal model run on one unpadded row per example
(input, EOS, target), with no segment ids and no cache.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from jaxlm import config as config_lib
from jaxlm import objectives, seq2seq_eval, train
from jaxlm.config import ConfigError
from jaxlm.data import tokenizer
from jaxlm.decode_settings import BeamSettings
from jaxlm.evaluate import token_nll
from jaxlm.generate import make_prefix_beam_search
from jaxlm.inference import LanguageModel, evaluate_run

N = 6  # data.target_len


def prefix_config():
    c = tiny_config(objective="seq2seq")
    c.model.family, c.model.positions = "decoder", "rope"
    c.model.max_len = 32
    c.data.target_len = N
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(setup, params, sources) on a 2x2x2 mesh; a random-init model."""
    c = prefix_config()
    # Tied embeddings make a random model repeat its last token: EOS, ending every output.
    c.model.tie_embeddings = False
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    s = train.setup(c, tmp_path_factory.mktemp("prefix"))
    params = train.create_state(s)["params"]
    rng = np.random.default_rng(0)
    sources = [np.append(rng.integers(3, 64, n - 1), 1).astype(np.int32) for n in [3, 16, 9, 1, 5]]
    return s, params, sources


@functools.cache
def _causal_forward(graphdef):
    return jax.jit(lambda params, tokens_BT: nnx.merge(graphdef, params)(tokens_BT))


def row_logits(s, params, row: np.ndarray) -> np.ndarray:
    """Logits [len, V] of one unpadded row under the plain causal forward pass (one compiled
    width: right padding cannot change a causal model's logits at the real positions)."""
    tokens = np.zeros((1, s.config.model.max_len), np.int32)
    tokens[0, : len(row)] = row
    host = jax.tree.map(np.asarray, params)
    return np.asarray(_causal_forward(s.graphdef)(host, tokens))[0, : len(row)]


def settings(**kw) -> BeamSettings:
    return BeamSettings(**{"beam_size": 1, "max_new_tokens": N, "eos_id": 1, "pad_id": 0, **kw})


def test_rows_put_the_input_right_before_the_target():
    inputs = np.array([[5, 6, 1, 0], [7, 1, 0, 0]])
    targets = np.array([[8, 1, 0], [9, 9, 1]])
    tokens, seg, pos = objectives.prefix_lm_rows(inputs, inputs > 0, targets, targets > 0)
    np.testing.assert_array_equal(tokens, [[0, 5, 6, 1, 8, 1, 0], [0, 0, 7, 1, 9, 9, 1]])
    np.testing.assert_array_equal(seg, [[0, 1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(pos, [[0, 0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3, 4]])


@pytest.mark.parametrize("positions", ["rope", "learned", "relative"])
def test_loss_is_the_causal_loss_of_each_unpadded_row(positions, tmp_path):
    c = prefix_config()
    c.model.positions = positions
    s = train.setup(c, tmp_path)
    params = train.create_state(s)["params"]
    batch = s.data.train_batch(0)
    sums = s.objective.eval_sums(nnx.merge(s.graphdef, params), batch, None)
    want = 0.0
    for b in range(batch["inputs"].shape[0]):
        src = batch["inputs"][b][batch["input_segment_ids"][b] > 0]
        tgt = batch["targets"][b][batch["target_segment_ids"][b] > 0]
        row = np.concatenate([src, tgt])
        logits = row_logits(s, params, row[:-1])[len(src) - 1 :]
        want += float(np.sum(token_nll(jnp.asarray(logits), jnp.asarray(tgt))))
    np.testing.assert_allclose(float(sums["nll"]), want, rtol=1e-5)
    assert float(sums["tokens"]) == batch["loss_mask"].sum()


def test_greedy_decoding_is_the_stepwise_argmax_of_the_full_row(run):
    s, params, sources = run
    got = seq2seq_eval.decode_ids(s, params, sources, settings())
    for src, out in zip(sources, got, strict=True):
        row = list(src)
        for _ in range(N):
            nxt = int(np.argmax(row_logits(s, params, np.asarray(row))[-1]))
            if nxt == 1:
                break
            row.append(nxt)
        assert out == row[len(src) :]
    assert len({tuple(x) for x in got}) > 1  # the source matters


def sequence_logprob(s, params, src, out) -> float:
    """Log-prob of `out` after `src`, with the EOS that ended it (if it ended before N)."""
    tail = list(out) + ([1] if len(out) < N else [])
    row = np.asarray(list(src) + tail, np.int32)
    logp = np.asarray(jax.nn.log_softmax(row_logits(s, params, row[:-1])[len(src) - 1 :]))
    return float(np.sum(logp[np.arange(len(tail)), tail]))


def test_beam_search_of_one_beam_is_greedy_and_scores_are_log_probs(run):
    s, params, sources = run
    greedy = seq2seq_eval.decode_ids(s, params, sources, settings())
    one = make_prefix_beam_search(s.graphdef, settings())
    src, lengths = seq2seq_eval.padded_sources(sources, s.config.data.seq_len)
    host = jax.tree.map(np.asarray, params)
    seqs = np.asarray(one(host, jnp.asarray(src), jnp.asarray(lengths))[0])[:, 0]
    assert [seq2seq_eval.strip_output(x, 1, 0) for x in seqs] == greedy
    # No length penalty: a hypothesis' score is its log-probability.
    wide = settings(beam_size=3, length_penalty=0.0)
    best = seq2seq_eval.decode_ids(s, params, sources, wide)
    scores = np.asarray(make_prefix_beam_search(s.graphdef, wide)(host, src, lengths)[1])
    for i, src_i in enumerate(sources):
        got = sequence_logprob(s, params, src_i, best[i])
        np.testing.assert_allclose(got, scores[i, 0], rtol=1e-4, atol=1e-4)
    assert best != greedy  # the beams found other outputs


def test_trains_and_evaluates_through_the_one_trainer(tmp_path):
    c = prefix_config()
    c.train.steps, c.train.eval_steps = 6, 1
    train.train(c, tmp_path)
    out = evaluate_run(tmp_path, max_batches=1)
    assert out["decoded_examples"] == c.data.batch_size and 0.0 <= out["bleu"] <= 100.0
    assert np.isfinite(out["loss"]) and out["step"] == 6


def test_language_model_prompts_a_text_run_as_the_eval_decodes_it(tmp_path):
    """A prefix LM trained on JSONL pairs: LanguageModel.generate appends the EOS separator
    itself and cuts long inputs as training did, so its greedy text equals what jaxlm-eval
    decoded for the same inputs."""
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat while dogs ran far away and birds sang".split()
    rows = [" ".join(rng.choice(words, int(rng.integers(1, 4)))) for _ in range(80)]
    valid = rows[64:] + [" ".join(words * 3)]  # longer than data.seq_len: cut to it
    for name, part in (("train", rows[:64]), ("validation", valid)):
        lines = "".join(json.dumps({"src": r, "tgt": r.upper()}) + "\n" for r in part)
        (tmp_path / f"{name}.jsonl").write_text(lines)
    tok = tokenizer.train_tokenizer(rows + [r.upper() for r in rows], tmp_path / "t.model", 300)
    c = prefix_config()
    c.data.source = f"jsonl:{tmp_path}/{{split}}.jsonl"
    c.data.input_key, c.data.target_key, c.data.tokenizer = "src", "tgt", str(tok.path)
    c.data.cache_dir, c.model.vocab_size = str(tmp_path / "cache"), 0
    c.model.tie_embeddings = False  # tied, a random model repeats the EOS: empty outputs
    c.optim.lr = 1e-5  # stay near the random init, whose outputs depend on the input
    c.data.seq_len, c.model.max_len, c.train.steps = 32, 64, 4
    workdir = tmp_path / "run"
    train.train(c, workdir)
    evaluate_run(workdir, max_batches=0)
    samples = [json.loads(x) for x in (workdir / "eval_samples.jsonl").read_text().splitlines()]
    assert [x["input"] for x in samples] == valid
    assert len(tok.encode(valid[-1])) > c.data.seq_len
    lm = LanguageModel.load(workdir)
    assert lm.context_len == 32 + N
    texts = lm.generate([x["input"] for x in samples], max_new_tokens=N, temperature=0.0)
    assert [t.strip() for t in texts] == [x["hypothesis"] for x in samples]
    assert len({x["hypothesis"] for x in samples}) > 1  # outputs are not all empty or equal


def test_rows_hold_input_and_target_in_throughput_figures():
    c = prefix_config()
    assert config_lib.row_len(c) == 16 + N  # what tokens/s and MFU count per row
    assert config_lib.row_len(tiny_config(objective="seq2seq")) == 16  # encoder rows
    assert config_lib.row_len(tiny_config()) == 16


def test_learned_positions_must_cover_input_and_target():
    c = prefix_config()
    c.model.positions, c.model.max_len = "learned", 20
    with pytest.raises(ConfigError, match=r"data.seq_len=16 \+ data.target_len=6 exceeds"):
        config_lib.validate(c)
    c.model.max_len = 16 + N  # exactly one row: fine
    config_lib.validate(c)
