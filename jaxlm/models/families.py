"""One constructor for every model family, chosen by `TransformerConfig.family`.

decoder: `TransformerLM` (GPT / LLaMA); encoder: `EncoderLM` (BERT-style masked LM);
encoder_decoder: `EncoderDecoder` (T5 / translation). Each family also has `hidden` and
`logits`; decoder and encoder add `classify` when `num_classes` > 0.
"""

from __future__ import annotations

from flax import nnx

from jaxlm.models.encoder import EncoderLM
from jaxlm.models.encoder_decoder import EncoderDecoder
from jaxlm.models.spec import TransformerConfig
from jaxlm.models.transformer import TransformerLM

MODELS = {"decoder": TransformerLM, "encoder": EncoderLM, "encoder_decoder": EncoderDecoder}


def build_model(cfg: TransformerConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    return MODELS[cfg.family](cfg, rngs=rngs)
