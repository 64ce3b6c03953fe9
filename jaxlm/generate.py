"""Decoding with KV caches: prefill (or encode) once, then one compiled loop.

Shape legend: B batch, P prompt length, S source length, N new tokens, V vocabulary,
W beams per row, R = B * W beam rows, K candidates per row.

`make_generate(graphdef, settings)` returns a jitted function of (params, prompts, lengths, key)
for a decoder-only model. Prompts are right-padded to a common length; each row then decodes from
its own length, so rows of different lengths share a batch. The decode loop is a
`lax.while_loop` compiled once; it ends when every row has produced EOS or `max_new_tokens`
tokens. Temperature 0 is greedy argmax.

For an encoder-decoder model, `make_seq2seq_generate` samples the same way after encoding the
source once (the decoder cache holds self-attention K/V and the precomputed cross-attention
K/V), and `make_beam_search` runs beam search with a GNMT length penalty. A decoder trained as
a prefix LM (seq2seq on a decoder) decodes with `make_generate` or `make_prefix_beam_search`,
its prompts being the inputs, each ending with the EOS that separates input from output.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.decode_settings import BeamSettings, SamplingSettings


def filter_logits(logits_BV, *, top_k: int = 0, top_p: float = 1.0):
    """Logits outside the top-k set or the top-p nucleus set to -inf (fp32)."""
    logits_BV = logits_BV.astype(jnp.float32)
    if top_k > 0:
        kth_B1 = jax.lax.top_k(logits_BV, min(top_k, logits_BV.shape[-1]))[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.flip(jnp.sort(logits_BV, axis=-1), axis=-1)
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # Keep a token while the probability mass ranked above it is still below top_p; the
        # most likely token is therefore always kept.
        kept_B = jnp.sum((jnp.cumsum(probs_BV, axis=-1) - probs_BV) < top_p, axis=-1)
        cutoff_B1 = jnp.take_along_axis(sorted_BV, kept_B[:, None] - 1, axis=-1)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return logits_BV


def sample(logits_BV, key, s: SamplingSettings):
    """Next token ids [B] under the settings; temperature 0 is argmax."""
    if s.temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = filter_logits(logits_BV / s.temperature, top_k=s.top_k, top_p=s.top_p)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def make_generate(
    graphdef: nnx.GraphDef,
    settings: SamplingSettings,
    on_tokens: Callable[[int, jax.Array], None] | None = None,
):
    """jit(fn(params, prompts_BP, lengths_B, key, limits_B=None) -> (tokens_BN, num_generated_B)).

    `on_tokens(i, tokens_B)` is called from the device loop after each step (for streaming;
    see its caveats where it is called);
    new tokens after a row's EOS are `pad_id`, and num_generated counts tokens up to its EOS.
    `limits_B` caps each row's new tokens below max_new_tokens (a total length per row, as
    transformers' max_length, gives rows of different prompt lengths different caps).
    """
    settings.check()
    n = settings.max_new_tokens

    def generate(params, prompts_BP, lengths_B, key, limits_B=None):
        model = nnx.merge(graphdef, params)
        b, p = prompts_BP.shape
        h_BPD, cache = _prefill(model, prompts_BP, p + n)
        # Project only each row's last prompt state: [B, P, V] logits are never needed.
        last_B1D = jnp.take_along_axis(h_BPD, (lengths_B - 1)[:, None, None], axis=1)
        last_BV = model.logits(last_B1D)[:, 0]

        def step(token_B, i, cache):
            # The token emitted at step i-1 sits at position length + i - 1.
            logits_B1V, cache = model.decode(token_B[:, None], cache, lengths_B + i - 1)
            return logits_B1V[:, 0], cache

        return _sampling_loop(step, last_BV, cache, key, settings, on_tokens, limits_B)

    return jax.jit(generate)


def _prefill(model, prompts_BP, length: int):
    """(final hidden states [B, P, D], a KV cache for `length` positions holding the prompts)."""
    b = prompts_BP.shape[0]
    cache = model.init_cache(b, length)
    return model.run_cached(model.embed(prompts_BP), cache, jnp.zeros((b,), jnp.int32))


def make_seq2seq_generate(
    graphdef: nnx.GraphDef,
    settings: SamplingSettings,
    *,
    start_id: int = 0,
    on_tokens: Callable[[int, jax.Array], None] | None = None,
):
    """jit(fn(params, sources_BS, source_lengths_B, key) -> (tokens_BN, num_generated_B)).

    For an `EncoderDecoder`: sources are right-padded; the encoder runs once, the decoder starts
    from `start_id` (T5 uses the pad id) and samples like `make_generate`.
    """
    settings.check()
    n = settings.max_new_tokens

    def generate(params, sources_BS, source_lengths_B, key):
        model = nnx.merge(graphdef, params)
        b = sources_BS.shape[0]
        cache = _encode_to_cache(model, sources_BS, source_lengths_B, n)

        def step(token_B, i, cache):
            # The token emitted at step i-1 sits at position i, after the start token.
            logits_B1V, cache = model.decode(token_B[:, None], cache, jnp.full((b,), i, jnp.int32))
            return logits_B1V[:, 0], cache

        first_BV, cache = step(jnp.full((b,), start_id, jnp.int32), 0, cache)
        return _sampling_loop(step, first_BV, cache, key, settings, on_tokens)

    return jax.jit(generate)


def _encode_to_cache(model, sources_BS, source_lengths_B, length: int, repeat: int = 1):
    """Encode right-padded sources once; a decoding cache with each row repeated `repeat` times."""
    s = sources_BS.shape[1]
    segment_ids_BS = (jnp.arange(s)[None, :] < source_lengths_B[:, None]).astype(jnp.int32)
    memory_BSD = model.encode(sources_BS, segment_ids_BS=segment_ids_BS)
    if repeat > 1:
        memory_BSD = jnp.repeat(memory_BSD, repeat, axis=0)
        segment_ids_BS = jnp.repeat(segment_ids_BS, repeat, axis=0)
    return model.init_cache(memory_BSD, segment_ids_BS, length)


def _sampling_loop(step, first_BV, cache, key, s: SamplingSettings, on_tokens, limits_B=None):
    """Sample from first_BV, then `step(token_B, i, cache) -> (logits_BV, cache)` in a loop.

    Stops when every row has emitted EOS or its limit (limits_B, else max_new_tokens) of
    tokens; returns (tokens_BN, num_generated_B) with `pad_id` after each row's end.
    """
    b, n = first_BV.shape[0], s.max_new_tokens
    limits_B = jnp.full((b,), n, jnp.int32) if limits_B is None else jnp.minimum(limits_B, n)

    def emit(i, token_B, done_B, out_BN):
        token_B = jnp.where(done_B, s.pad_id, token_B)
        if on_tokens is not None:
            # Unordered: ordered effects are single-device only. Calls may come out of order
            # or once per device; the step index lets the receiver sort and deduplicate.
            jax.debug.callback(on_tokens, i, token_B)
        done_B = done_B | (token_B == s.eos_id) | (i + 1 >= limits_B)
        return token_B, done_B, out_BN.at[:, i].set(token_B)

    out_BN = jnp.full((b, n), s.pad_id, jnp.int32)
    first_B = sample(first_BV, jax.random.fold_in(key, 0), s)
    token_B, done_B, out_BN = emit(0, first_B, jnp.zeros((b,), bool), out_BN)

    def cond(state):
        i, _, done_B, _, _ = state
        return (i < n) & ~jnp.all(done_B)

    def body(state):
        i, token_B, done_B, out_BN, cache = state
        logits_BV, cache = step(token_B, i, cache)
        next_B = sample(logits_BV, jax.random.fold_in(key, i), s)
        token_B, done_B, out_BN = emit(i, next_B, done_B, out_BN)
        return i + 1, token_B, done_B, out_BN, cache

    state = (jnp.int32(1), token_B, done_B, out_BN, cache)
    _, _, _, out_BN, _ = jax.lax.while_loop(cond, body, state)
    # Tokens up to and including each row's first EOS, within its limit (the padding after a
    # row's limit may be the EOS id: GPT-2 pads with it).
    is_eos_BN = out_BN == s.eos_id
    first_eos_B = jnp.where(jnp.any(is_eos_BN, axis=1), jnp.argmax(is_eos_BN, axis=1) + 1, n)
    return out_BN, jnp.minimum(first_eos_B, limits_B)


def length_penalty(length, alpha: float):
    """GNMT's ((5 + length) / 6) ** alpha: scores are log-probability divided by it."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def make_beam_search(graphdef: nnx.GraphDef, settings: BeamSettings, *, start_id: int = 0):
    """jit(fn(params, sources_BS, source_lengths_B) -> (tokens_BWN, scores_BW, lengths_BW)).

    For an `EncoderDecoder`. W = beam_size hypotheses per row, best first; a score is the
    log-probability of the tokens (EOS included) divided by `length_penalty(length)`; lengths
    count tokens up to and including EOS. Hypotheses that reach max_new_tokens without EOS
    compete as they are. Beam rows are laid out as row b * W + w.
    """
    settings.check()
    w, n = settings.beam_size, settings.max_new_tokens

    def search(params, sources_BS, source_lengths_B):
        model = nnx.merge(graphdef, params)
        cache = _encode_to_cache(model, sources_BS, source_lengths_B, n, repeat=w)

        def step(tokens_R, i, cache):
            index_R = jnp.full(tokens_R.shape, i, jnp.int32)
            logits_R1V, cache = model.decode(tokens_R[:, None], cache, index_R)
            return logits_R1V[:, 0], cache

        def reorder(cache, rows_R):
            # Cross-attention K/V are the same for every beam of a row: only "self" moves.
            return {**cache, "self": jax.tree.map(lambda x: x[rows_R], cache["self"])}

        return beam_search(step, reorder, cache, sources_BS.shape[0], start_id, settings)

    return jax.jit(search)


def make_prefix_beam_search(graphdef: nnx.GraphDef, settings: BeamSettings):
    """jit(fn(params, prompts_BP, lengths_B) -> (tokens_BWN, scores_BW, lengths_BW)).

    For a decoder-only model continuing right-padded prompts (a prefix LM's inputs, which end
    with the EOS that separates input from output); the rest as `make_beam_search`.
    """
    settings.check()
    w, n = settings.beam_size, settings.max_new_tokens

    def search(params, prompts_BP, lengths_B):
        model = nnx.merge(graphdef, params)
        b, p = prompts_BP.shape
        _, cache = _prefill(model, prompts_BP, p + n)  # once per row, then one copy per beam
        cache = jax.tree.map(lambda x: jnp.repeat(x, w, axis=0), cache)
        lengths_R = jnp.repeat(lengths_B, w)

        def step(tokens_R, i, cache):
            # Step 0 feeds each prompt's last token again (rewriting its cached K/V), so its
            # logits start the search; step i's token sits at position length - 1 + i.
            logits_R1V, cache = model.decode(tokens_R[:, None], cache, lengths_R - 1 + i)
            return logits_R1V[:, 0], cache

        def reorder(cache, rows_R):
            return jax.tree.map(lambda x: x[rows_R], cache)

        last_B = jnp.take_along_axis(prompts_BP, (lengths_B - 1)[:, None], axis=1)[:, 0]
        return beam_search(step, reorder, cache, b, last_B, settings)

    return jax.jit(search)


def beam_search(step, reorder, cache, batch: int, start_id, s: BeamSettings):
    """The compiled beam loop over any decoder (R = B * W rows).

    step(tokens_R, i, cache) -> (logits_RV, cache) feeds the i-th token of the search (first
    `start_id`: one id, or one per row [B]);
    reorder(cache, rows_R) gathers cache rows after beams are re-chosen. Each step keeps the
    2W best extensions, so W of them survive even if W emit EOS; ended ones join the W best
    finished hypotheses. The loop stops early once no live beam can beat the worst finished one.
    """
    w, n, b = s.beam_size, s.max_new_tokens, batch
    neg = jnp.float32(-1e9)  # finite, so sums never make NaN
    best_bound = length_penalty(n, s.length_penalty)  # the largest divisor a live beam can get

    def cond(state):
        i, _, _, alive_logp_BW, _, fin_score_BW, _ = state
        # Log-probabilities only fall, so a live beam scores at most logp / lp(n).
        bound_B = alive_logp_BW[:, 0] / best_bound
        return (i < n) & ~jnp.all(fin_score_BW[:, -1] >= bound_B)

    def body(state):
        i, last_BW, alive_seq_BWN, alive_logp_BW, fin_seq_BWN, fin_score_BW, cache = state
        logits_RV, cache = step(last_BW.reshape(-1), i, cache)
        v = logits_RV.shape[-1]
        logp_BWV = jax.nn.log_softmax(logits_RV.astype(jnp.float32), axis=-1).reshape(b, w, v)
        cand_BWV = alive_logp_BW[:, :, None] + logp_BWV
        cand_logp_BK, flat_BK = jax.lax.top_k(cand_BWV.reshape(b, w * v), 2 * w)
        parent_BK, token_BK = flat_BK // v, (flat_BK % v).astype(jnp.int32)
        seq_BKN = jnp.take_along_axis(alive_seq_BWN, parent_BK[:, :, None], axis=1)
        seq_BKN = seq_BKN.at[:, :, i].set(token_BK)
        ended_BK = token_BK == s.eos_id
        # Ended candidates join the finished set, ranked by length-normalised score.
        ended_score_BK = jnp.where(
            ended_BK, cand_logp_BK / length_penalty(i + 1, s.length_penalty), neg
        )
        fin_score_BW, fin_seq_BWN = _top(
            jnp.concatenate([fin_score_BW, ended_score_BK], axis=1),
            jnp.concatenate([fin_seq_BWN, seq_BKN], axis=1),
            w,
        )
        alive_logp_BW, keep_BW = jax.lax.top_k(jnp.where(ended_BK, neg, cand_logp_BK), w)
        alive_seq_BWN = jnp.take_along_axis(seq_BKN, keep_BW[:, :, None], axis=1)
        last_BW = jnp.take_along_axis(token_BK, keep_BW, axis=1)
        parent_BW = jnp.take_along_axis(parent_BK, keep_BW, axis=1)
        cache = reorder(cache, (jnp.arange(b)[:, None] * w + parent_BW).reshape(-1))
        return i + 1, last_BW, alive_seq_BWN, alive_logp_BW, fin_seq_BWN, fin_score_BW, cache

    alive_logp_BW = jnp.where(jnp.arange(w) == 0, 0.0, neg) * jnp.ones((b, 1))
    seq_BWN = jnp.full((b, w, n), s.pad_id, jnp.int32)
    last_BW = jnp.broadcast_to(jnp.asarray(start_id, jnp.int32).reshape(-1, 1), (b, w))
    state = (jnp.int32(0), last_BW, seq_BWN, alive_logp_BW, seq_BWN, jnp.full((b, w), neg), cache)
    steps, _, alive_seq_BWN, alive_logp_BW, fin_seq_BWN, fin_score_BW, _ = jax.lax.while_loop(
        cond, body, state
    )
    alive_score_BW = alive_logp_BW / length_penalty(steps, s.length_penalty)
    score_BW, seq_BWN = _top(
        jnp.concatenate([fin_score_BW, alive_score_BW], axis=1),
        jnp.concatenate([fin_seq_BWN, alive_seq_BWN], axis=1),
        w,
    )
    is_eos_BWN = seq_BWN == s.eos_id
    length_BW = jnp.where(jnp.any(is_eos_BWN, -1), jnp.argmax(is_eos_BWN, -1) + 1, steps)
    return seq_BWN, score_BW, length_BW


def _top(score_BK, seq_BKN, k: int):
    """The k best (score, sequence) pairs per row, best first."""
    score_Bk, keep_Bk = jax.lax.top_k(score_BK, k)
    return score_Bk, jnp.take_along_axis(seq_BKN, keep_Bk[:, :, None], axis=1)
