"""Encoder-only, encoder-decoder and classification models: masks, heads, axes, sharding.

Each model is compiled once per call signature and reused (`compiled`): on CPU, op-by-op
dispatch or a fresh compile per call would cost seconds each.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import sharding
from jaxlm.config import DEFAULT_RULES
from jaxlm.models import heads, layers, quant, spec, transformer
from jaxlm.models.attention import relative_bucket
from jaxlm.models.families import build_model
from jaxlm.models.heads import pool
from jaxlm.models.spec import TransformerConfig


def tiny(family: str = "decoder", **overrides) -> TransformerConfig:
    """Dims as tests/conftest.py's tiny_config: every one divides a 2x2x2 mesh."""
    kw = dict(
        vocab_size=64,
        d_model=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        d_ff=64,
        max_len=16,
        family=family,
    )
    return TransformerConfig(**{**kw, **overrides})


def build(family: str = "decoder", **overrides):
    cfg = tiny(family, **overrides)
    return build_model(cfg, rngs=nnx.Rngs(0)), cfg


def compiled(model, method: str = "__call__"):
    """model.method under one jit (cached per shape)."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, *a, **kw: getattr(nnx.merge(graphdef, s), method)(*a, **kw))
    return lambda *a, **kw: fn(state, *a, **kw)


def tokens(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 64, shape).astype(np.int32)


def segments(lengths, t: int) -> np.ndarray:
    """Unpacked rows: segment 1 on the first lengths[b] tokens, 0 (padding) after."""
    return (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int32)


@functools.cache
def encoder():
    """A relative-position encoder called as f(tokens [1, 16], positions, segment ids)."""
    f = compiled(build("encoder", positions="relative", num_layers=1)[0])
    return lambda x, pos, seg: f(
        jnp.asarray(x), positions_BT=jnp.asarray(pos), segment_ids_BT=jnp.asarray(seg)
    )


@functools.cache
def seq2seq():
    """An encoder-decoder called as f(source [2, 10], source segment ids, decoder inputs [2, 8])."""
    f = compiled(build("encoder_decoder", num_layers=1)[0])
    return lambda src, seg, dec: f(
        jnp.asarray(src), jnp.asarray(dec), encoder_segment_ids_BS=jnp.asarray(seg)
    )


def test_encoder_sees_the_future_and_the_decoder_does_not():
    a = tokens(0, (1, 16))
    b = a.copy()
    b[:, 12] = (b[:, 12] + 1) % 64
    pos, seg = np.arange(16)[None], np.ones((1, 16), np.int32)
    la, lb = encoder()(a, pos, seg), encoder()(b, pos, seg)
    assert not np.allclose(la[:, :12], lb[:, :12], atol=1e-4)  # earlier outputs see token 12

    src, seg = tokens(1, (2, 10)), segments([10, 10], 10)
    c = tokens(2, (2, 8))
    d = c.copy()
    d[:, 5] = (d[:, 5] + 1) % 64
    da, db = seq2seq()(src, seg, c), seq2seq()(src, seg, d)
    np.testing.assert_allclose(da[:, :5], db[:, :5], atol=1e-6)
    assert not np.allclose(da[:, 5:], db[:, 5:], atol=1e-4)


def test_encoder_padding_and_packed_segments_stay_apart():
    seg = np.array([[1] * 6 + [2] * 7 + [0] * 3])
    pos = np.array([list(range(6)) + list(range(7)) + [0] * 3])
    a = tokens(3, (1, 16))
    b = a.copy()
    b[:, :6] = tokens(4, (1, 6))  # the other document
    b[:, 13:] = tokens(5, (1, 3))  # the padding
    la, lb = encoder()(a, pos, seg), encoder()(b, pos, seg)
    np.testing.assert_allclose(la[:, 6:13], lb[:, 6:13], atol=1e-6)
    # The second document alone, at the start of a row, gives the same outputs.
    alone = np.zeros_like(a)
    alone[:, :7] = a[:, 6:13]
    pos_alone = np.array([list(range(7)) + [0] * 9])
    lc = encoder()(alone, pos_alone, segments([7], 16))
    np.testing.assert_allclose(la[:, 6:13], lc[:, :7], atol=1e-5)


def test_cross_attention_ignores_encoder_padding():
    src, seg, dec = tokens(6, (2, 10)), segments([10, 6], 10), tokens(7, (2, 8))
    changed = src.copy()
    changed[1, 6:] = tokens(8, (4,))  # only row 1's padding
    la, lb = seq2seq()(src, seg, dec), seq2seq()(changed, seg, dec)
    np.testing.assert_allclose(la, lb, atol=1e-6)
    changed[1, 0] = (changed[1, 0] + 1) % 64  # a real source token does matter
    assert not np.allclose(la[1], seq2seq()(changed, seg, dec)[1], atol=1e-4)


def test_packed_pairs_see_only_their_own_source():
    model = compiled(build("encoder_decoder", positions="learned")[0])

    def run(src, src_lengths, dec, dec_lengths):
        src_seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(src_lengths)])
        dec_seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(dec_lengths)])
        src_pos = np.concatenate([np.arange(n) for n in src_lengths])
        dec_pos = np.concatenate([np.arange(n) for n in dec_lengths])
        return model(
            jnp.asarray(src[None]),
            jnp.asarray(dec[None]),
            encoder_positions_BS=jnp.asarray(src_pos[None]),
            encoder_segment_ids_BS=jnp.asarray(src_seg[None]),
            decoder_positions_BT=jnp.asarray(dec_pos[None]),
            decoder_segment_ids_BT=jnp.asarray(dec_seg[None]),
        )[0]

    src, dec = tokens(9, (10,)), tokens(10, (8,))
    packed = run(src, [4, 6], dec, [3, 5])
    # Pair 2 moved to the start of the row (pair 1 after it) gives the same logits.
    alone = run(
        np.concatenate([src[4:], src[:4]]), [6, 4], np.concatenate([dec[3:], dec[:3]]), [5, 3]
    )
    np.testing.assert_allclose(packed[3:], alone[:5], atol=1e-5)


def test_relative_buckets_follow_t5():
    """Key-minus-query offsets -> buckets, worked out by hand from T5's formula (32, 128)."""
    rel = jnp.asarray([[[0, -1, 1, -7, -8, -16, -128, 1000, -1000]]])
    both = relative_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    np.testing.assert_array_equal(both[0, 0], [0, 1, 17, 7, 8, 10, 15, 31, 15])
    rel = jnp.asarray([[[5, 0, -15, -16, -32, -1000]]])
    causal = relative_bucket(rel, bidirectional=False, num_buckets=32, max_distance=128)
    np.testing.assert_array_equal(causal[0, 0], [0, 0, 15, 16, 21, 31])


def test_pooling_uses_real_tokens_only():
    h = np.random.default_rng(11).normal(size=(2, 5, 3)).astype(np.float32)
    seg = segments([5, 3], 5)
    np.testing.assert_allclose(pool(h, seg, "first"), h[:, 0])
    np.testing.assert_allclose(pool(h, seg, "last"), np.stack([h[0, 4], h[1, 2]]))
    mean = np.stack([h[0].mean(0), h[1, :3].mean(0)])
    np.testing.assert_allclose(pool(h, seg, "mean"), mean, rtol=1e-6)


@pytest.mark.parametrize("family,pooling", [("encoder", "mean"), ("decoder", "auto")])
def test_classification_heads(family, pooling):
    classify = compiled(build(family, num_classes=3, pooling=pooling)[0], "classify")
    x, seg = tokens(12, (2, 12)), jnp.asarray(segments([12, 7], 12))
    logits = classify(jnp.asarray(x), segment_ids_BT=seg)
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    y = x.copy()
    y[1, 7:] = tokens(13, (5,))  # row 1's padding changes nothing
    np.testing.assert_allclose(logits, classify(jnp.asarray(y), segment_ids_BT=seg), atol=1e-6)
    y[1, 6] = (y[1, 6] + 1) % 64  # its last real token does
    assert not np.allclose(logits[1], classify(jnp.asarray(y), segment_ids_BT=seg)[1], atol=1e-5)


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("encoder", {}),
        ("encoder", {"num_classes": 5, "tie_embeddings": False, "positions": "learned"}),
        ("decoder", {"num_classes": 2, "positions": "relative"}),
        ("encoder_decoder", {}),
        ("encoder_decoder", {"positions": "relative", "num_decoder_layers": 3}),
        (
            "encoder_decoder",
            {"positions": "learned", "share_embeddings": False, "tie_embeddings": False},
        ),
    ],
)
def test_parameters_have_logical_axes_and_are_counted(family, overrides):
    model, cfg = build(family, **overrides)
    leaves = jax.tree.leaves(
        nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    known = {name for name, _ in DEFAULT_RULES} | {None}
    for var in leaves:
        axes = var.get_metadata()["axes"]
        assert len(axes) == var[...].ndim and set(axes) <= known
    assert cfg.num_params() == sum(var[...].size for var in leaves)


def test_bad_family_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="model.family='bert': use one of decoder"):
        tiny("bert")
    with pytest.raises(ValueError, match="model.positions='alibi'"):
        tiny(positions="alibi")
    with pytest.raises(ValueError, match="num_classes is for the encoder and decoder"):
        tiny("encoder_decoder", num_classes=2)


def sharded_equals_one_device(model, forward, *args):
    """forward(model, *args) on one device vs params and batch split over a 2x2x2 mesh."""
    graphdef, params = nnx.split(model, nnx.Param)
    axes = jax.tree.map(
        lambda v: v.get_metadata()["axes"], params, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    params, axes = params.to_pure_dict(), axes.to_pure_dict()
    run = jax.jit(lambda p, *a: forward(nnx.merge(graphdef, p), *a))
    expected = run(params, *args)
    mesh = sharding.make_mesh(2, 2, 2)
    sharded = jax.device_put(params, sharding.param_shardings(params, axes, mesh, DEFAULT_RULES))
    assert sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded)) > 10
    batch = [jax.device_put(a, sharding.batch_sharding(mesh)) for a in args]
    with sharding.use_rules(mesh, DEFAULT_RULES):
        got = jax.jit(lambda p, *a: forward(nnx.merge(graphdef, p), *a))(sharded, *batch)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-5)


def test_sharded_forward_equals_one_device():
    x, y = jnp.asarray(tokens(14, (4, 16))), jnp.asarray(tokens(15, (4, 8)))
    seg = jnp.asarray(segments([16, 9, 12, 3], 16))
    model, _ = build("encoder", num_classes=4, num_layers=1)
    sharded_equals_one_device(
        model, lambda m, x, s: (m(x, segment_ids_BT=s), m.classify(x, segment_ids_BT=s)), x, seg
    )
    model, _ = build("encoder_decoder", positions="relative", num_layers=1)
    sharded_equals_one_device(
        model, lambda m, x, s, y: m(x, y, encoder_segment_ids_BS=s), x, seg, y
    )


def test_every_named_choice_has_its_implementation():
    """The jax-free spec names each choice (the config layer checks against it); the modules map
    the same names to functions, so a name added on one side only fails here, not in a run."""
    assert set(layers.MLP_ACTIVATIONS) == set(spec.MLP_GATED)
    assert set(heads.CLASSIFIER_ACTIVATION_FNS) == set(spec.CLASSIFIER_ACTIVATIONS)
    assert {"none", *transformer.REMAT_POLICIES} == set(spec.REMATS)
    assert set(quant.QMAX) == set(spec.QUANT_KINDS) - {"none"}
