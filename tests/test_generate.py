"""KV-cache decoding and sampling: exact against the full forward pass, sets respected."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_model import build

from jaxlm.decode_settings import SamplingSettings
from jaxlm.generate import filter_logits, make_generate, sample


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_cached_decoding_equals_the_full_forward_pass(style):
    """Prefill a prefix, feed the rest one token at a time: logits match at every position."""
    model, cfg = build(style)
    assert cfg.num_kv_heads < cfg.num_heads  # grouped-query attention is exercised
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (3, 16)), jnp.int32)
    full = model(tokens)
    graphdef, params = nnx.split(model, nnx.Param)
    decode = jax.jit(lambda p, x, c, i: nnx.merge(graphdef, p).decode(x, c, i))
    prefix = 5
    cache = model.init_cache(3, 16)
    logits, cache = decode(params, tokens[:, :prefix], cache, jnp.zeros((3,), jnp.int32))
    steps = [logits]
    for t in range(prefix, 16):
        logits, cache = decode(params, tokens[:, t : t + 1], cache, jnp.full((3,), t, jnp.int32))
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)


def test_rows_of_different_lengths_decode_independently():
    """A right-padded row decodes from its own length: the padding is never attended to."""
    model, _ = build()
    rng = np.random.default_rng(1)
    short, long = rng.integers(1, 64, 4), rng.integers(1, 64, 9)
    padded = np.zeros((2, 9), np.int32)
    padded[0, :4], padded[1] = short, long
    cache = model.init_cache(2, 12)
    _, cache = model.decode(jnp.asarray(padded), cache, jnp.zeros((2,), jnp.int32))
    nxt = jnp.asarray([[7], [7]], jnp.int32)
    logits, _ = model.decode(nxt, cache, jnp.asarray([4, 9], jnp.int32))
    alone = model(jnp.asarray(np.append(short, 7)[None], jnp.int32))[:, -1]
    np.testing.assert_allclose(logits[0, 0], alone[0], atol=1e-5, rtol=1e-5)


def _generate(model, prompts, lengths, settings, seed=0):
    graphdef, params = nnx.split(model, nnx.Param)
    fn = make_generate(graphdef, settings)
    return fn(params, jnp.asarray(prompts), jnp.asarray(lengths), jax.random.key(seed))


def test_greedy_is_deterministic_and_matches_stepwise_argmax():
    model, _ = build()
    prompts = np.array([[5, 6, 7, 8], [9, 10, 0, 0]], np.int32)
    settings = SamplingSettings(max_new_tokens=6, temperature=0.0)
    out1, n1 = _generate(model, prompts, [4, 2], settings)
    out2, _ = _generate(model, prompts, [4, 2], settings, seed=123)
    np.testing.assert_array_equal(out1, out2)
    assert list(np.asarray(n1)) == [6, 6]
    # Each generated token is the argmax of the full forward pass over everything before it.
    for row, length in ((0, 4), (1, 2)):
        seq = np.concatenate([prompts[row, :length], np.asarray(out1[row])])
        logits = model(jnp.asarray(seq[None], jnp.int32))[0]
        np.testing.assert_array_equal(np.argmax(logits[length - 1 : -1], -1), seq[length:])


def test_rows_stop_at_eos():
    model, _ = build()
    prompts = np.array([[5, 6, 7, 8]], np.int32)
    greedy = SamplingSettings(max_new_tokens=6, temperature=0.0)
    out, _ = _generate(model, prompts, [4], greedy)
    eos = int(out[0, 2])  # pretend the third greedy token is EOS
    first = list(np.asarray(out[0])).index(eos)
    settings = SamplingSettings(max_new_tokens=6, temperature=0.0, eos_id=eos, pad_id=63)
    stopped, count = _generate(model, prompts, [4], settings)
    assert int(count[0]) == first + 1
    assert list(np.asarray(stopped[0, : first + 1])) == list(np.asarray(out[0, : first + 1]))
    assert set(np.asarray(stopped[0, first + 1 :])) <= {63}


def test_top_k_and_top_p_never_sample_outside_their_set():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(4, 50)) * 2, jnp.float32)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    top5 = np.argsort(-np.asarray(logits), axis=-1)[:, :5]
    # The nucleus: most likely tokens until their mass reaches 0.6.
    order = np.argsort(-probs, axis=-1)
    mass_before = np.cumsum(np.take_along_axis(probs, order, -1), -1) - np.take_along_axis(
        probs, order, -1
    )
    nucleus = [set(order[b][mass_before[b] < 0.6]) for b in range(4)]
    k_settings = SamplingSettings(temperature=1.0, top_k=5)
    p_settings = SamplingSettings(temperature=1.0, top_p=0.6)
    keys = jax.random.split(jax.random.key(0), 300)
    by_k = np.asarray(jax.vmap(lambda k: sample(logits, k, k_settings))(keys))
    by_p = np.asarray(jax.vmap(lambda k: sample(logits, k, p_settings))(keys))
    for b in range(4):
        assert set(by_k[:, b]) <= set(top5[b])
        assert set(by_p[:, b]) <= nucleus[b]
        assert len(set(by_k[:, b])) > 1  # it does sample, not just argmax
    kept = np.isfinite(np.asarray(filter_logits(logits, top_p=0.6)))
    assert [set(np.flatnonzero(kept[b])) for b in range(4)] == nucleus


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("temperature", -1.0, "temperature must be >= 0"),
        ("top_p", 0.0, "top_p must be in (0, 1]"),
        ("top_k", -2, "top_k must be >= 0"),
        ("max_new_tokens", 0, "max_new_tokens must be >= 1"),
    ],
)
def test_bad_sampling_settings_are_one_line_errors(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("]", r"\]")):
        SamplingSettings(**{field: value}).check()
