"""Encoder-decoder decoding: cached == teacher forced, greedy, sampling loop, beam search."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_families import build, segments, tokens

from jaxlm.decode_settings import BeamSettings, SamplingSettings
from jaxlm.generate import (
    length_penalty,
    make_beam_search,
    make_seq2seq_generate,
)
from jaxlm.objectives import shift_right

SRC, SRC_LENGTHS = tokens(0, (2, 10)), np.array([10, 6], np.int32)
START = 0


@pytest.mark.parametrize(
    "overrides",
    [
        {"positions": "rope"},
        {"positions": "learned", "share_embeddings": False, "tie_embeddings": False},
        {"positions": "relative", "num_decoder_layers": 1},
        {"positions": "relative", "attention_scale": 1.0, "scale_tied_output": True},
    ],
)
def test_cached_decoding_equals_teacher_forcing(overrides):
    """Prefill 3 decoder tokens, then feed one at a time: logits match at every position."""
    model, cfg = build("encoder_decoder", **overrides)
    assert cfg.num_kv_heads < cfg.num_heads  # grouped-query attention is exercised
    if cfg.positions == "relative":
        # Init-scale biases barely move the logits; large ones make a wrong bucket visible.
        for stack in (model.encoder, model.decoder):
            table = stack.relative_bias.table
            table[...] = jax.random.normal(jax.random.key(1), table[...].shape)
    graphdef, params = nnx.split(model, nnx.Param)
    dec = jnp.asarray(tokens(1, (2, 8)))

    @jax.jit
    def both(params, src, seg, dec):
        m = nnx.merge(graphdef, params)
        full = m(src, dec, encoder_segment_ids_BS=seg)
        cache = m.init_cache(m.encode(src, segment_ids_BS=seg), seg, 8)
        first, cache = m.decode(dec[:, :3], cache, jnp.zeros((2,), jnp.int32))

        def step(cache, t):
            token = jax.lax.dynamic_slice_in_dim(dec, t, 1, axis=1)
            logits, cache = m.decode(token, cache, jnp.full((2,), t, jnp.int32))
            return cache, logits[:, 0]

        _, rest = jax.lax.scan(step, cache, jnp.arange(3, 8))
        return full, jnp.concatenate([first, jnp.swapaxes(rest, 0, 1)], axis=1)

    seg = jnp.asarray(segments(SRC_LENGTHS, 10))
    full, cached = both(params, jnp.asarray(SRC), seg, dec)
    np.testing.assert_allclose(cached, full, atol=1e-5, rtol=1e-5)


@functools.cache
def model_and_scorer():
    """An untied relative-position model (its greedy outputs vary) and a sequence scorer."""
    model, _ = build("encoder_decoder", positions="relative", tie_embeddings=False, num_layers=1)
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def padded_logp(params, src, src_lengths, out):
        seg = (jnp.arange(src.shape[1]) < src_lengths[:, None]).astype(jnp.int32)
        logits = nnx.merge(graphdef, params)(
            src, shift_right(out, START), encoder_segment_ids_BS=seg
        )
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(lp, out[..., None], axis=-1)[..., 0], lp

    def logp(rows, out):
        """Teacher-forced log-probabilities (of each token, of all) for outputs of source rows.

        Padded to 64 rows of 6 tokens, so every call shares one compiled function; padding
        rows and later columns do not change earlier ones (the decoder is causal).
        """
        r, n = out.shape
        padded = np.zeros((64, 6), np.int32)
        padded[:r, :n] = out
        src = np.zeros((64, SRC.shape[1]), np.int32)
        src[:r], lengths = SRC[rows], np.ones(64, np.int32)
        lengths[:r] = SRC_LENGTHS[rows]
        tok, all_ = padded_logp(params, jnp.asarray(src), jnp.asarray(lengths), jnp.asarray(padded))
        return np.asarray(tok)[:r, :n], np.asarray(all_)[:r, :n]

    return graphdef, params, logp


@functools.cache
def greedy(n: int, eos_id: int = -1):
    graphdef, params, _ = model_and_scorer()
    fn = make_seq2seq_generate(
        graphdef, SamplingSettings(max_new_tokens=n, temperature=0.0, eos_id=eos_id, pad_id=63)
    )
    out, count = fn(params, jnp.asarray(SRC), jnp.asarray(SRC_LENGTHS), jax.random.key(0))
    return np.asarray(out), np.asarray(count)


def beam(settings: BeamSettings, rows=slice(None)):
    graphdef, params, _ = model_and_scorer()
    fn = make_beam_search(graphdef, settings, start_id=START)
    out = fn(params, jnp.asarray(SRC[rows]), jnp.asarray(SRC_LENGTHS[rows]))
    return [np.asarray(x) for x in out]


def eos_token() -> int:
    """A token greedy decoding emits, so that some hypotheses end early."""
    return int(greedy(6)[0][0, 2])


def test_greedy_is_teacher_forced_argmax_and_equals_beam_of_one():
    _, _, logp = model_and_scorer()
    out, count = greedy(6)
    assert list(count) == [6, 6] and len(set(out.ravel())) > 3
    lp, all_lp = logp([0, 1], out)
    np.testing.assert_array_equal(np.argmax(all_lp, -1), out)
    assert not np.array_equal(out[0], out[1])  # the source matters

    seqs, scores, lengths = beam(BeamSettings(beam_size=1, max_new_tokens=6, length_penalty=0.0))
    np.testing.assert_array_equal(seqs[:, 0], out)
    assert (lengths == 6).all()
    np.testing.assert_allclose(scores[:, 0], lp.sum(-1), rtol=1e-5)


def test_sampling_stops_rows_at_eos():
    out, _ = greedy(6)
    eos = eos_token()
    first = list(out[0]).index(eos)
    stopped, count = greedy(6, eos_id=eos)
    assert count[0] == first + 1
    np.testing.assert_array_equal(stopped[0, : first + 1], out[0, : first + 1])
    assert set(stopped[0, first + 1 :]) <= {63}


def test_beam_search_scores_are_sorted_exact_and_beat_greedy():
    _, _, logp = model_and_scorer()
    n, w, alpha, eos = 6, 4, 0.6, eos_token()
    s = BeamSettings(beam_size=w, max_new_tokens=n, length_penalty=alpha, eos_id=eos, pad_id=63)
    seqs, scores, lengths = beam(s)
    assert (np.diff(scores, axis=1) <= 0).all()  # best first
    assert (lengths < n).any()
    # Each score is the teacher-forced log-probability of its tokens over the length penalty.
    lp = logp(np.repeat([0, 1], w), seqs.reshape(2 * w, n))[0].reshape(2, w, n)
    for b in range(2):
        for k in range(w):
            length, seq = lengths[b, k], list(seqs[b, k])
            assert eos not in seq[: length - 1] and set(seq[length:]) <= {63}
            assert length == n or seq[length - 1] == eos
            expect = lp[b, k, :length].sum() / float(length_penalty(length, alpha))
            np.testing.assert_allclose(scores[b, k], expect, rtol=1e-4)
    # The greedy output, cut at its EOS and scored the same way, is never better.
    g_out, g_count = greedy(n, eos_id=eos)
    g_lp = logp([0, 1], g_out)[0]
    for b in range(2):
        g_score = g_lp[b, : g_count[b]].sum() / float(length_penalty(g_count[b], alpha))
        assert scores[b, 0] >= g_score - 1e-5


def test_exhaustive_beam_finds_the_best_sequences():
    """With as many beams as tokens, two steps of beam search rank all V * V sequences."""
    _, _, logp = model_and_scorer()
    v = 64
    seqs, scores, _ = beam(BeamSettings(beam_size=v, max_new_tokens=2, length_penalty=0.0), [0])
    firsts = np.arange(v, dtype=np.int32)[:, None]
    # Row a scores first token a; the distribution at step 2 is the second token's given a.
    lp = logp(np.zeros(v, int), np.concatenate([firsts, firsts], 1))[1]
    total = lp[0, 0][:, None] + lp[:, 1]  # [first token, second token]
    best = np.argsort(-total.ravel())[:v]
    np.testing.assert_allclose(scores[0], total.ravel()[best], rtol=1e-5)
    np.testing.assert_array_equal(seqs[0, :, 0] * v + seqs[0, :, 1], best)
