"""Model behaviour: shapes, dtypes, causality, segment masks, attention kernel, param counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from jaxlm import config as config_lib
from jaxlm.models.attention import attention_reference, softmax_attention
from jaxlm.models.transformer import TransformerLM


def build(style: str = "llama", **overrides):
    c = tiny_config()
    if style == "gpt2":
        config_lib.gpt2_style(c.model)
    for key, value in overrides.items():
        setattr(c.model, key, value)
    cfg = config_lib.model_config(c, 64)
    return TransformerLM(cfg, rngs=nnx.Rngs(0)), cfg


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_shapes_and_dtypes(style):
    model, cfg = build(style, dtype="bfloat16")
    tokens = jnp.zeros((2, 16), jnp.int32)
    logits = model(tokens)
    assert logits.shape == (2, 16, 64)
    assert logits.dtype == jnp.bfloat16
    params = nnx.state(model, nnx.Param)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_causality(style):
    model, _ = build(style)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 64, (2, 16))
    b = a.copy()
    b[:, 10:] = rng.integers(0, 64, (2, 6))
    la, lb = model(jnp.asarray(a)), model(jnp.asarray(b))
    np.testing.assert_allclose(la[:, :10], lb[:, :10], atol=1e-6)
    assert not np.allclose(la[:, 10:], lb[:, 10:], atol=1e-3)


def test_segments_do_not_see_each_other():
    model, _ = build()
    rng = np.random.default_rng(1)
    seg = np.array([[1] * 6 + [2] * 10])
    pos = np.array([list(range(6)) + list(range(10))])
    a = rng.integers(0, 64, (1, 16))
    b = a.copy()
    b[:, :6] = rng.integers(0, 64, (1, 6))  # change only the first document
    kw = dict(positions_BT=jnp.asarray(pos), segment_ids_BT=jnp.asarray(seg))
    la, lb = model(jnp.asarray(a), **kw), model(jnp.asarray(b), **kw)
    np.testing.assert_allclose(la[:, 6:], lb[:, 6:], atol=1e-6)
    # The second document alone gives the same logits as inside the packed row.
    alone = model(jnp.asarray(a[:, 6:]))
    np.testing.assert_allclose(la[:, 6:], alone, atol=1e-5)


def test_attention_kernel_matches_reference_with_gqa():
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(2, 8, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 8, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 8, 2, 16)), jnp.float32)
    mask = jnp.asarray(rng.random((2, 1, 8, 8)) > 0.3) | jnp.eye(8, dtype=bool)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="xla")
    ref = attention_reference(q, k, v, mask, causal=True)
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize(
    "heads,kv_heads,causal,masked,scale",
    [
        (4, 4, True, False, None),
        (4, 2, True, True, None),
        (6, 3, False, True, 0.3),
        (4, 1, False, False, None),
    ],
)
def test_softmax_attention_values_and_grads_match_reference(heads, kv_heads, causal, masked, scale):
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.normal(size=(2, 8, heads, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 8, kv_heads, 16)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 8, kv_heads, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    mask = None
    if masked:  # two documents and padding in row 0: padding queries see no key at all
        seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 0, 0], [1] * 8])
        mask = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0))[:, None]

    def loss(attend):
        return lambda q, k, v: jnp.sum(attend(q, k, v) * w)

    ours = loss(lambda q, k, v: softmax_attention(q, k, v, mask, causal=causal, scale=scale))
    ref = loss(lambda q, k, v: attention_reference(q, k, v, mask, causal=causal, scale=scale))
    xla = loss(
        lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=causal, scale=scale, implementation="xla"
        )
    )
    got = jax.value_and_grad(ours, argnums=(0, 1, 2))(q, k, v)
    for other in (ref, xla):
        want = jax.value_and_grad(other, argnums=(0, 1, 2))(q, k, v)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
        for g, gw in zip(got[1], want[1], strict=True):
            np.testing.assert_allclose(g, gw, atol=2e-5)


@pytest.mark.parametrize(
    "style,overrides",
    [
        ("llama", {}),
        ("gpt2", {}),
        ("llama", {"tie_embeddings": False}),
        ("gpt2", {"num_kv_heads": 1}),
        ("llama", {"mlp": "geglu"}),
        ("gpt2", {"mlp": "relu"}),
    ],
)
def test_num_params_matches_the_model(style, overrides):
    model, cfg = build(style, **overrides)
    counted = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert cfg.num_params() == counted


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_keeps_values_and_gradients(policy):
    base, _ = build()
    remat, _ = build(remat=policy)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, (2, 16)))

    def loss(model):
        return jnp.mean(model(tokens) ** 2)

    g0 = nnx.grad(loss)(base)
    g1 = nnx.grad(loss)(remat)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_dropout_is_active_only_with_a_key():
    model, _ = build(dropout=0.5)
    tokens = jnp.zeros((1, 16), jnp.int32)
    np.testing.assert_array_equal(model(tokens), model(tokens))
    k = jax.random.key(0)
    assert not np.allclose(model(tokens, dropout_key=k), model(tokens))
    np.testing.assert_array_equal(model(tokens, dropout_key=k), model(tokens, dropout_key=k))


def test_parameters_carry_logical_axes():
    model, _ = build()
    params = nnx.state(model, nnx.Param)
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for var in leaves:
        axes = var.get_metadata()["axes"]
        assert len(axes) == var[...].ndim


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("gelu", lambda g, u: jax.nn.gelu(u, approximate=True)),
        ("gelu_exact", lambda g, u: 0.5 * u * (1 + jax.scipy.special.erf(u / np.sqrt(2)))),
        ("relu", lambda g, u: np.maximum(u, 0)),
        ("swiglu", lambda g, u: g / (1 + np.exp(-g)) * u),
        ("geglu", lambda g, u: jax.nn.gelu(g, approximate=True) * u),
    ],
)
def test_mlp_kinds_match_their_formulas(kind, expected):
    model, _ = build("llama", mlp=kind)
    mlp = model.blocks[0].mlp
    x = jax.random.normal(jax.random.key(1), (2, 3, 32))
    up = x @ mlp.up.kernel[...]
    gate = x @ mlp.gate.kernel[...] if hasattr(mlp, "gate") else None
    want = expected(gate, up) @ mlp.down.kernel[...]
    np.testing.assert_allclose(mlp(x), want, rtol=1e-5, atol=1e-6)
