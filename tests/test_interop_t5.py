"""T5ForConditionalGeneration <-> jaxlm encoder_decoder: v1.0 (ReLU, tied and scaled output) and
v1.1/Flan (gated GELU, untied lm_head), against transformers on PyTorch CPU.

One random-init model per variant, every parameter perturbed, saved, imported and exported once
(module-scoped fixtures); d_kv * num_heads != d_model, and v1.1 has fewer decoder blocks.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference_libs import torch, transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from jaxlm import objectives, tasks
from jaxlm.decode_settings import SamplingSettings
from jaxlm.generate import make_seq2seq_generate
from jaxlm.interop import ConversionError, convert, export_hf, hf_files, import_hf, load_hf, t5
from jaxlm.models.attention import relative_bucket
from jaxlm.models.families import build_model

COMMON = dict(vocab_size=96, d_model=64, d_kv=8, d_ff=96, num_layers=2, num_heads=4)
COMMON.update(decoder_start_token_id=0, dropout_rate=0.0)
VARIANTS = {
    "v1.0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_decoder_layers=1),
}
ARCH = "T5ForConditionalGeneration"
B, S, T, SRC_LEN_2 = 4, 128, 128, 77  # row 2 of the source is right-padded to 77 tokens


def _hf_model(variant: str):
    torch.manual_seed(0)
    config = transformers.T5Config(**COMMON, **VARIANTS[variant])
    model = transformers.T5ForConditionalGeneration(config).eval()
    if variant == "v1.1":  # transformers 5 ties lm_head whatever the config says: untie it
        model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
        model.config.tie_word_embeddings = False
    with torch.no_grad():  # biases and norm scales start at 0 and 1, which hides swaps
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _tokenizer_json(path):
    """A tiny T5-style Unigram tokenizer.json: <pad> 0, </s> 1, <unk> 2, then pieces."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in letters] + [("\u2581" + c, -2.5) for c in letters]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tok.save(str(path))


def _inputs():
    rng = np.random.default_rng(0)
    src = rng.integers(2, COMMON["vocab_size"], (B, S)).astype(np.int32)
    mask = np.ones((B, S), np.int32)
    mask[2, SRC_LEN_2:], src[2, SRC_LEN_2:] = 0, 0
    dec = rng.integers(2, COMMON["vocab_size"], (B, T)).astype(np.int32)
    dec[:, 0] = t5.DECODER_START_ID
    return src, mask, dec


def _hf_logits(model, src, mask, dec) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(src).long(),
            attention_mask=torch.from_numpy(mask).long(),
            decoder_input_ids=torch.from_numpy(dec).long(),
        )
    return out.logits.numpy()


def _split(cfg, params):
    """(graphdef, nnx state) of cfg's model holding `params`, with no initialisation."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return graphdef, state


def _forward_and_cached(cfg, params):
    """jit(src, mask, dec) -> (teacher-forced logits, logits of cached decoding, 1 at a time)."""
    graphdef, state = _split(cfg, params)

    @jax.jit
    def run(state, src, mask, dec):
        m = nnx.merge(graphdef, state)
        full = m(src, dec, encoder_segment_ids_BS=mask)
        cache = m.init_cache(m.encode(src, segment_ids_BS=mask), mask, T)
        first, cache = m.decode(dec[:, :1], cache, jnp.zeros((B,), jnp.int32))

        def step(cache, t):
            token = jax.lax.dynamic_slice_in_dim(dec, t, 1, axis=1)
            logits, cache = m.decode(token, cache, jnp.full((B,), t, jnp.int32))
            return cache, logits[:, 0]

        _, rest = jax.lax.scan(step, cache, jnp.arange(1, T))
        return full, jnp.concatenate([first, jnp.swapaxes(rest, 0, 1)], axis=1)

    return lambda *a: tuple(np.asarray(x) for x in run(state, *map(jnp.asarray, a))), graphdef


def _convert(variant: str, tmp_path_factory) -> dict:
    """The HF model, its folder, the imported run, and its fp32 export (sharded for v1.0)."""
    tmp = tmp_path_factory.mktemp(variant)
    hf = _hf_model(variant)
    hf.save_pretrained(tmp / "hf")
    if variant == "v1.0":
        _tokenizer_json(tmp / "hf" / "tokenizer.json")
    run = import_hf(tmp / "hf", tmp / "run")
    config, cfg, params, tok = convert.run_params(run)
    shard = "20KB" if variant == "v1.0" else None
    out = export_hf(run, tmp / "out", max_shard_size=shard)
    return dict(
        variant=variant,
        hf=hf,
        tmp=tmp,
        run=run,
        config=config,
        cfg=cfg,
        params=params,
        tok=tok,
        out=out,
    )


@pytest.fixture(scope="module")
def v10(tmp_path_factory) -> dict:
    return _convert("v1.0", tmp_path_factory)


@pytest.fixture(scope="module")
def v11(tmp_path_factory) -> dict:
    return _convert("v1.1", tmp_path_factory)


@pytest.fixture(scope="module", params=["v10", "v11"])
def converted(request) -> dict:
    return request.getfixturevalue(request.param)


def test_import_matches_transformers_teacher_forced_and_cached(converted):
    """fp32 logits within 1e-4 (real positions; padded source row), same argmax; cached
    decoding from the pad id equals HF's forward at every decoder position."""
    src, mask, dec = _inputs()
    want = _hf_logits(converted["hf"], src, mask, dec)
    run, _ = _forward_and_cached(converted["cfg"], converted["params"])
    full, cached = run(src, mask, dec)
    for got in (full, cached):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    cfg, config = converted["cfg"], converted["config"]
    assert config.task.objective == "seq2seq"
    assert (cfg.attention_scale, cfg.head_dim, cfg.positions) == (1.0, 8, "relative")
    if converted["variant"] == "v1.0":
        assert (cfg.mlp, cfg.tie_embeddings, cfg.scale_tied_output) == ("relu", True, True)
    else:
        assert (cfg.mlp, cfg.tie_embeddings, cfg.scale_tied_output) == ("geglu", False, False)
        assert (cfg.num_layers, cfg.decoder_layers) == (2, 1)


def test_export_loads_in_transformers_and_round_trips_bit_identical(converted):
    out = converted["out"]
    assert (out / "model.safetensors.index.json").is_file() == (converted["variant"] == "v1.0")
    model, info = transformers.T5ForConditionalGeneration.from_pretrained(
        out, output_loading_info=True
    )
    assert {k: info[k] for k in ("missing_keys", "unexpected_keys")} == {
        "missing_keys": set(),
        "unexpected_keys": set(),
    }
    src, mask, dec = _inputs()
    np.testing.assert_allclose(
        _hf_logits(model.eval(), src, mask, dec),
        _hf_logits(converted["hf"], src, mask, dec),
        atol=1e-4,
        rtol=0,
    )
    _, params = load_hf(out)
    jax.tree.map(np.testing.assert_array_equal, params, converted["params"])
    hf = json.loads((out / "config.json").read_text())
    assert (hf["decoder_start_token_id"], hf["pad_token_id"]) == (0, 0)


def test_bf16_export_loads(v11):
    converted = v11
    out = export_hf(converted["run"], converted["tmp"] / "bf16", dtype="bfloat16")
    model, info = transformers.T5ForConditionalGeneration.from_pretrained(
        out, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()  # still untied
    _, params = load_hf(out)
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(np.float32), converted["params"])
    jax.tree.map(np.testing.assert_array_equal, params, bf16)


def test_tokenizer_and_greedy_generation_start_like_transformers(v10):
    """The imported T5 tokenizer keeps <pad> 0 / </s> 1; jaxlm's seq2seq decoding starts from
    the same id as transformers' (tasks.DECODER_START_ID), so greedy outputs agree."""
    converted = v10
    tok = converted["tok"]
    assert (tok.pad_id, tok.eos_id, tasks.DECODER_START_ID) == (0, 1, t5.DECODER_START_ID)
    exported = json.loads((converted["out"] / "tokenizer_config.json").read_text())
    assert (exported["pad_token"], exported["eos_token"]) == ("<pad>", "</s>")
    src, mask, dec = _inputs()
    teacher = objectives.shift_right(jnp.asarray(dec), tasks.DECODER_START_ID)  # seq2seq task
    np.testing.assert_array_equal(teacher, v10["hf"]._shift_right(torch.from_numpy(dec)).numpy())
    n = 12
    with torch.no_grad():
        want = (
            converted["hf"]
            .generate(
                input_ids=torch.from_numpy(src).long(),
                attention_mask=torch.from_numpy(mask).long(),
                max_new_tokens=n,
                do_sample=False,
                num_beams=1,
            )
            .numpy()
        )
    assert (want[:, 0] == 0).all()
    want = np.pad(want[:, 1:], ((0, 0), (0, n + 1 - want.shape[1])))  # HF pads with 0 too
    _, graphdef = _forward_and_cached(converted["cfg"], converted["params"])
    settings = SamplingSettings(max_new_tokens=n, temperature=0.0, eos_id=1, pad_id=0)
    gen = make_seq2seq_generate(graphdef, settings, start_id=tasks.DECODER_START_ID)
    got, _ = gen(converted["params"], jnp.asarray(src), jnp.asarray(mask.sum(1)), jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("buckets,distance", [(32, 128), (8, 20)])
def test_relative_bucket_equals_transformers(bidirectional, buckets, distance):
    rel = np.arange(-400, 401)
    want = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        torch.from_numpy(rel), bidirectional, buckets, distance
    ).numpy()
    bucket = jax.jit(
        relative_bucket, static_argnames=("bidirectional", "num_buckets", "max_distance")
    )
    got = bucket(
        jnp.asarray(rel), bidirectional=bidirectional, num_buckets=buckets, max_distance=distance
    )
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"feed_forward_proj": "gated-tanh"}, "feed_forward_proj='gated-tanh'"),
        ({"feed_forward_proj": "relu-gelu"}, "feed_forward_proj='relu-gelu'"),
        ({"is_gated_act": True}, "is_gated_act=True disagrees with feed_forward_proj='relu'"),
        ({"dense_act_fn": "gelu"}, "dense_act_fn='gelu' disagrees"),
        ({"decoder_start_token_id": 2}, "decoder_start_token_id=2"),
    ],
)
def test_unsupported_configs_are_refused_naming_the_key(change, match):
    hf = {**COMMON, "feed_forward_proj": "relu", **change}
    with pytest.raises(ConversionError, match=match):
        t5.config_from_hf(hf, ARCH)


def test_mlp_kinds_both_ways():
    for proj, kind in [
        ("relu", "relu"),
        ("gated-gelu", "geglu"),
        ("gelu_new", "gelu"),
        ("gelu", "gelu_exact"),
        ("gated-silu", "swiglu"),
    ]:
        assert t5.config_from_hf({**COMMON, "feed_forward_proj": proj}, "")["mlp"] == kind
        assert t5._FEED_FORWARD[kind] == proj


def test_tied_head_that_differs_and_unrepresentable_exports_are_refused(v10):
    cfg = v10["cfg"]
    tensors = t5.params_to_hf(v10["params"], cfg, ARCH)
    # Older checkpoints carry tied copies and an unused cross-attention bias: accepted, dropped.
    old = dict(tensors)
    old["encoder.embed_tokens.weight"] = old["lm_head.weight"] = tensors["shared.weight"]
    old["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = np.ones(4)
    params = t5.params_from_hf(old, cfg, ARCH)
    assert not old
    jax.tree.map(np.testing.assert_array_equal, params, v10["params"])
    tensors["lm_head.weight"] = tensors["shared.weight"] + 1
    with pytest.raises(ConversionError, match="lm_head.weight differs from shared.weight"):
        t5.params_from_hf(tensors, cfg, ARCH)
    with pytest.raises(
        ConversionError, match="model.num_kv_heads=2: T5 needs model.num_kv_heads=4"
    ):
        t5.config_to_hf(dataclasses.replace(cfg, num_kv_heads=2), ARCH, {})


def test_scaled_attention_exports_folded_into_the_query_kernels(v11, tmp_path):
    """A jaxlm-native model (attention_scale 0: 1/sqrt(head_dim)) exports as an unscaled T5
    whose logits are jaxlm's."""
    cfg = dataclasses.replace(v11["cfg"], attention_scale=0.0)
    hf_files.write_tensors(tmp_path, t5.params_to_hf(v11["params"], cfg, ARCH))
    hf_files.write_json(tmp_path / "config.json", t5.config_to_hf(cfg, ARCH, {}))
    src, mask, dec = (x[:2, :16] for x in _inputs())
    graphdef, state = _split(cfg, v11["params"])
    forward = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a[:2], encoder_segment_ids_BS=a[2]))
    got = np.asarray(forward(state, src, dec, mask))
    want = _hf_logits(
        transformers.T5ForConditionalGeneration.from_pretrained(tmp_path), src, mask, dec
    )
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.max(np.abs(want - _hf_logits(v11["hf"], src, mask, dec))) > 1e-3  # not v11 itself
