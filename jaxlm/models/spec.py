"""What a model is, without JAX: `TransformerConfig` and the names each of its choices takes.

The config layer (jaxlm.config) validates against these and builds the TransformerConfig, so a
bad command line is refused before JAX is imported; the modules (transformer.py, layers.py,
heads.py, quant.py) map the same names to their implementations.
"""

from __future__ import annotations

import dataclasses

FAMILIES = ("decoder", "encoder", "encoder_decoder")
POSITIONS = ("rope", "learned", "relative")
BLOCK_NORMS = ("pre", "post")
POOLINGS = ("auto", "first", "mean", "last")
# The classification head's activation after its first dense layer: BERT's pooler (tanh) or
# DistilBERT's pre_classifier (ReLU).
CLASSIFIER_ACTIVATIONS = ("tanh", "relu")
# MLP kind -> gated. Gated kinds (LLaMA's SwiGLU, T5 v1.1's gated GELU) compute
# act(gate(x)) * up(x); the others act(up(x)). "gelu" is the tanh approximation (GPT-2's
# gelu_new), "gelu_exact" the erf form (BERT).
MLP_GATED = {"gelu": False, "gelu_exact": False, "relu": False, "swiglu": True, "geglu": True}
QUANT_KINDS = ("none", "int8", "int4")
REMATS = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int
    d_model: int
    num_layers: int  # decoder-only and encoder-only blocks; the encoder's in encoder_decoder
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_ff: int
    max_len: int = 1024
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    mlp: str = "swiglu"
    positions: str = "rope"  # rope, learned, or relative (T5 bucketed bias)
    rope_theta: float = 10000.0
    use_bias: bool = False
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    attention_impl: str = "xla"
    attention_scale: float = 0.0  # attention score scale; 0 = 1/sqrt(head_dim), T5: 1.0
    scale_tied_output: bool = False  # hidden * d_model**-0.5 before the output projection (T5)
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    family: str = "decoder"  # decoder, encoder (BERT-style), encoder_decoder (T5-style)
    num_decoder_layers: int = 0  # encoder_decoder: decoder blocks; 0 = num_layers
    share_embeddings: bool = True  # encoder_decoder: one token table for encoder and decoder
    relative_buckets: int = 32  # positions=relative: buckets per stack
    relative_max_distance: int = 128  # positions=relative: offsets past this share a bucket
    num_classes: int = 0  # > 0 adds a classification head (`classify`)
    pooling: str = "auto"  # classification: first, mean, last; auto = first (encoder), last
    block_norm: str = "pre"  # pre: x + f(norm(x)); post (BERT): norm(x + f(x)), no final norm
    embed_norm: bool = False  # a norm after the token + position (+ type) embeddings (BERT)
    type_vocab_size: int = 0  # encoder: > 0 adds token-type embeddings (BERT: 2)
    mlm_transform: bool = False  # encoder: dense + activation + norm before the vocab (BERT)
    classifier_activation: str = "tanh"  # tanh (BERT's pooler) or relu (DistilBERT)
    quant: str = "none"  # none, int8, int4: block matmul kernels stored as integers + scales
    quant_group_size: int = 0  # input rows per quantization scale; 0: one scale per output
    qat: bool = False  # int8 fake-quant of block matmul inputs and kernels (train.qat)

    def __post_init__(self):
        for name, choices in (
            ("family", FAMILIES),
            ("positions", POSITIONS),
            ("pooling", POOLINGS),
            ("mlp", tuple(MLP_GATED)),
            ("block_norm", BLOCK_NORMS),
            ("classifier_activation", CLASSIFIER_ACTIVATIONS),
            ("quant", QUANT_KINDS),
            ("remat", REMATS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"model.{name}={getattr(self, name)!r}: use one of {', '.join(choices)}"
                )
        if self.num_classes and self.family == "encoder_decoder":
            raise ValueError(
                "model.num_classes is for the encoder and decoder families; train an "
                "encoder_decoder model to emit the label as text instead"
            )
        if (self.type_vocab_size or self.mlm_transform) and self.family != "encoder":
            raise ValueError(
                "model.type_vocab_size and model.mlm_transform are for the encoder family; "
                "set them to 0 / False"
            )
        if self.positions == "relative" and not (
            4 <= self.relative_buckets < 2 * self.relative_max_distance
        ):
            raise ValueError(
                f"model.relative_buckets={self.relative_buckets} with relative_max_distance="
                f"{self.relative_max_distance}: use at least 4 buckets and fewer than twice the "
                "distance (T5: 32 and 128)"
            )
        if self.scale_tied_output and self.family == "encoder":
            raise ValueError(
                "model.scale_tied_output scales the decoder's output (decoder, encoder_decoder "
                "families); leave it False for family=encoder"
            )
        if self.attention_scale < 0:
            raise ValueError(
                f"model.attention_scale={self.attention_scale}: use 0 (1/sqrt(head_dim)) or > 0"
            )

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers or self.num_layers

    @property
    def pooling_used(self) -> str:
        if self.pooling != "auto":
            return self.pooling
        return "first" if self.family == "encoder" else "last"

    def num_params(self, *, embeddings: bool = True) -> int:
        """Parameter count; without embeddings it excludes position tables (nanoGPT's N)."""
        d, f, h, v = self.d_model, self.d_ff, self.head_dim, self.vocab_size
        b = self.use_bias
        norm = d * (2 if b and self.norm == "layernorm" else 1)
        attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        attn += (h * (self.num_heads + 2 * self.num_kv_heads) + d) if b else 0
        n_up = 2 if MLP_GATED[self.mlp] else 1
        mlp = d * f * (n_up + 1) + (n_up * f + d if b else 0)
        block = attn + mlp + 2 * norm
        positions = {"rope": 0, "learned": self.max_len * d}.get(
            self.positions, self.relative_buckets * self.num_heads
        )
        stacks = 1 + (self.family == "encoder_decoder")
        total = self.num_layers * block + v * d * (1 if self.tie_embeddings else 2)
        # Per stack: the final norm (pre-norm blocks only) and the embedding norm.
        total += stacks * norm * ((self.block_norm == "pre") + self.embed_norm)
        if self.family == "encoder":
            total += v  # the MLM output bias
        if self.mlm_transform:
            total += d * d + (d if b else 0) + norm
        if self.family == "encoder_decoder":
            total += self.decoder_layers * (block + attn + norm)
            total += 0 if self.share_embeddings else v * d
        if self.num_classes:
            total += d * d + d + d * self.num_classes + self.num_classes
        tables = stacks * positions + self.type_vocab_size * d  # lookups, no matmul
        return total + (tables if embeddings else 0)
