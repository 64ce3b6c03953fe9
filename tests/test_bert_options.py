"""BERT / DistilBERT model options: post-norm blocks, embedding norm, token types, MLM transform,
the ReLU pre-classifier. Checked against a NumPy forward pass written from the BERT paper's
formulas, with every parameter perturbed so that no norm scale is 1 and no bias 0.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import losses_after, tiny_config
from flax import nnx
from scipy.special import erf
from test_families import build, compiled, segments, tokens
from test_model import build as build_decoder

from jaxlm import config as config_lib
from jaxlm.config import ConfigError
from jaxlm.models.spec import TransformerConfig

BERT = dict(
    num_kv_heads=4,
    norm="layernorm",
    norm_eps=1e-12,
    mlp="gelu_exact",
    positions="learned",
    use_bias=True,
    block_norm="post",
    embed_norm=True,
    type_vocab_size=2,
    mlm_transform=True,
    num_classes=3,
)
EPS = 1e-12


def perturbed(model, seed: int = 0):
    """The model with 0.1 * normal noise added to every parameter; its params as a pure dict."""
    state = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(state.to_pure_dict())
    rng = np.random.default_rng(seed)
    noisy = [np.asarray(x) + 0.1 * rng.standard_normal(x.shape).astype(np.float32) for x in leaves]
    params = jax.tree.unflatten(tree, noisy)
    state.replace_by_pure_dict(params)
    nnx.update(model, state)
    return params


def layer_norm(x, p):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS) * p["scale"] + p["bias"]


def dense(x, p, spec: str):
    return np.einsum(spec, x, p["kernel"]) + p["bias"]


def attention(x_TD, p, real_T):
    q, k, v = (dense(x_TD, p[n], "td,dnh->tnh") for n in ("query", "key", "value"))
    s_NTS = np.einsum("tnh,snh->nts", q, k) / np.sqrt(q.shape[-1])
    s_NTS = np.where(real_T[None, None, :], s_NTS, -np.inf)
    w_NTS = np.exp(s_NTS - s_NTS.max(-1, keepdims=True))
    w_NTS /= w_NTS.sum(-1, keepdims=True)
    return dense(np.einsum("nts,snh->tnh", w_NTS, v), p["out"], "tnh,nhd->td")


def gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def bert_reference(params, tokens_T, types_T, real_T):
    """Hidden states [T, D] and MLM logits [T, V] of one row, post-norm BERT."""
    t = len(tokens_T)
    x = params["embed"]["embedding"][tokens_T] + params["type_embed"][types_T]
    x = layer_norm(x + params["pos_embed"][:t], params["embed_norm"])
    for i in range(len(params["blocks"])):
        b = params["blocks"][i]
        x = layer_norm(x + attention(x, b["attn"], real_T), b["attn_norm"])
        h = dense(gelu(dense(x, b["mlp"]["up"], "td,df->tf")), b["mlp"]["down"], "tf,fd->td")
        x = layer_norm(x + h, b["mlp_norm"])  # no final norm after the last block
    m = params["mlm_transform"]
    y = layer_norm(gelu(dense(x, m["dense"], "td,de->te")), m["norm"])
    return x, y @ params["embed"]["embedding"].T + params["mlm_bias"]


@pytest.fixture(scope="module")
def bert():
    model, cfg = build("encoder", **BERT)
    return model, cfg, perturbed(model)


def test_bert_options_equal_the_formulas(bert):
    model, cfg, params = bert
    x = tokens(20, (2, 16))
    types = np.random.default_rng(21).integers(0, 2, (2, 16)).astype(np.int32)
    seg = segments([16, 11], 16)
    kw = dict(token_types_BT=jnp.asarray(types), segment_ids_BT=jnp.asarray(seg))
    logits = np.asarray(compiled(model)(jnp.asarray(x), **kw))
    pooled = []
    for b, n in enumerate([16, 11]):
        h, want = bert_reference(params, x[b], types[b], seg[b] != 0)
        np.testing.assert_allclose(logits[b, :n], want[:n], atol=2e-5, rtol=1e-5)
        pooled.append(h[0])
    # DistilBERT's head: pre_classifier + ReLU + classifier on the first token.
    c = params["classifier"]
    h_BD = np.maximum(dense(np.stack(pooled), c["pooler"], "bd,de->be"), 0)
    relu_model, _ = build("encoder", **BERT, classifier_activation="relu")
    perturbed(relu_model)  # the same seed, shapes and tree: the same parameters
    got = compiled(relu_model, "classify")(jnp.asarray(x), **kw)
    np.testing.assert_allclose(got, dense(h_BD, c["out"], "bd,dc->bc"), atol=2e-5, rtol=1e-5)
    # BERT's pooler: tanh.
    got = compiled(model, "classify")(jnp.asarray(x), **kw)
    want = dense(np.tanh(dense(np.stack(pooled), c["pooler"], "bd,de->be")), c["out"], "bd,dc->bc")
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_rows_without_token_types_use_type_0(bert):
    model = bert[0]
    x = jnp.asarray(tokens(22, (2, 16)))
    forward = compiled(model)
    ones = jnp.ones((2, 16), jnp.int32)
    np.testing.assert_array_equal(forward(x), forward(x, token_types_BT=jnp.zeros_like(ones)))
    assert not np.allclose(forward(x), forward(x, token_types_BT=ones), atol=1e-3)


def test_post_norm_decoder_decodes_like_its_forward_pass():
    """Cached decoding through post-norm blocks and an embedding norm equals the forward pass."""
    model, cfg = build_decoder("gpt2", block_norm="post", embed_norm=True)
    assert cfg.num_params() == sum(x.size for x in jax.tree.leaves(nnx_params(model)))
    perturbed(model)
    x = jnp.asarray(np.random.default_rng(23).integers(0, 64, (2, 16)), jnp.int32)
    full = compiled(model)(x)
    decode = compiled(model, "decode")
    logits, cache = decode(x[:, :9], model.init_cache(2, 16), jnp.zeros((2,), jnp.int32))
    steps = [logits]
    for t in range(9, 16):
        logits, cache = decode(x[:, t : t + 1], cache, jnp.full((2,), t, jnp.int32))
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)


def nnx_params(model):
    return nnx.state(model, nnx.Param)


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("encoder", BERT),
        ("encoder", {**BERT, "use_bias": False, "norm": "rmsnorm", "tie_embeddings": False}),
        (
            "encoder_decoder",
            {"block_norm": "post", "embed_norm": True, "use_bias": True, "positions": "learned"},
        ),
    ],
)
def test_num_params_counts_the_options(family, overrides):
    model, cfg = build(family, **overrides)
    leaves = jax.tree.leaves(nnx_params(model))
    assert cfg.num_params() == sum(x.size for x in leaves)
    tables = cfg.max_len * cfg.d_model * (1 + (family == "encoder_decoder"))
    tables += cfg.type_vocab_size * cfg.d_model
    assert cfg.num_params(embeddings=False) == cfg.num_params() - tables


def test_bad_option_values_are_one_line_errors():
    kw = dict(vocab_size=64, d_model=32, num_layers=1, num_heads=4, num_kv_heads=4, head_dim=8)
    with pytest.raises(ValueError, match="model.type_vocab_size and model.mlm_transform are for"):
        TransformerConfig(**kw, d_ff=64, type_vocab_size=2)
    with pytest.raises(ValueError, match="model.block_norm='sandwich': use one of pre, post"):
        TransformerConfig(**kw, d_ff=64, block_norm="sandwich")
    c = config_lib.base_config()
    c.model.classifier_activation = "gelu"
    with pytest.raises(ConfigError, match="'model.classifier_activation' is 'gelu'; choose one"):
        config_lib.validate(c)


def test_bert_style_mlm_trains_from_scratch_sharded_and_chunked(tmp_path):
    """Three MLM steps with every option, vocabulary logits 3 positions at a time on a 2x2x2
    mesh, equal whole logits on one device: the new parameters shard by their logical axes."""
    c = tiny_config(objective="mlm")
    config_lib.gpt2_style(c.model)
    for key, value in BERT.items():
        if key not in ("num_kv_heads", "num_classes"):
            setattr(c.model, key, value)
    want = losses_after(c, jax.devices()[:1], tmp_path / "whole")
    c.task.logits_chunk = 3
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    got = losses_after(c, None, tmp_path / "chunked")
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got[-1] < got[0]
