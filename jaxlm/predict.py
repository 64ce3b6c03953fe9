"""What `LanguageModel` runs beside the decode loop, in the terms Hugging Face users know:
generation lengths (max_new_tokens or the total max_length, num_return_sequences), class
probabilities and masked-token candidates (the fill-mask pipeline's fields).

Shape legend: B batch, T length, V vocabulary, C classes, K candidates per position.
Rows are built as the classify data builds them (the ids, then EOS, right-padded with segment
id 1 on real tokens and 0 on padding), so padding never reaches a real position's result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.data import batches

# New tokens per row when neither max_new_tokens nor max_length is given.
DEFAULT_MAX_NEW_TOKENS = 64


def samples_per_prompt(num_samples: int, num_return_sequences: int | None) -> int:
    """Samples per prompt; num_return_sequences is transformers' name for num_samples."""
    if num_return_sequences is not None and num_samples not in (1, num_return_sequences):
        raise ValueError(
            "num_samples and num_return_sequences (transformers' name) are one setting; pass one"
        )
    n = num_samples if num_return_sequences is None else num_return_sequences
    if n < 1:
        raise ValueError(f"num_samples (num_return_sequences) must be >= 1, got {n}")
    return n


def new_token_limits(
    lengths: Sequence[int], max_new_tokens: int | None, max_length: int | None, context: int
) -> list[int]:
    """New tokens allowed per prompt: max_new_tokens each, or max_length minus the prompt's
    length (transformers' max_length counts the prompt; here each prompt's own length)."""
    if max_new_tokens is not None and max_length is not None:
        raise ValueError(
            "pass max_new_tokens or max_length, not both (max_length counts the prompt's tokens "
            "too, as in transformers)"
        )
    if max_length is None:
        n = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
        return [n] * len(lengths)
    if max_length > context:
        raise ValueError(
            f"max_length {max_length} exceeds the model's context of {context} tokens; "
            f"pass max_length <= {context}"
        )
    if lengths and max(lengths) >= max_length:
        raise ValueError(
            f"max_length {max_length} leaves no new token after a prompt of {max(lengths)} "
            "tokens; raise max_length or pass max_new_tokens"
        )
    return [max_length - n for n in lengths]


def example_rows(
    inputs: Sequence[Sequence[int]], width: int, eos_id: int, cls_id: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, segment ids): each input's first ids, then EOS, right-padded, within `width`
    tokens (with cls_id, that id first: data.prepend_cls): the rows the classify data trains on
    (examples/source.py), but only as wide as the longest needs, rounded up to a power of two
    (>= 16) so that few widths compile."""
    head = [] if cls_id is None else [cls_id]
    rows = [head + list(x)[: width - 1 - len(head)] + [eos_id] for x in inputs]
    longest = max(map(len, rows), default=1)
    return batches.padded(rows, min(width, max(16, 1 << (longest - 1).bit_length())))


def in_chunks(run: Callable[[list], np.ndarray], inputs: list, size: int) -> np.ndarray:
    """run(chunk) over chunks of at most `size` inputs, concatenated. The last chunk is filled
    with copies of its first input (dropped from the result): one compilation per size."""
    size = min(size, len(inputs))
    out = []
    for i in range(0, len(inputs), size):
        chunk = inputs[i : i + size]
        out.append(run(chunk + chunk[:1] * (size - len(chunk)))[: len(chunk)])
    return np.concatenate(out)


def masked_ids(tok, text: str) -> list[int]:
    """Ids of text with each of the tokenizer's mask pieces as the mask id. Tokenizers never
    produce that id from text, so the text between masks is encoded piece by piece."""
    mask_id = tok.mask_id
    if mask_id is None:
        raise ValueError(
            "this run's tokenizer has no mask token; masked-LM runs train one with "
            "--config.data.tokenizer_mask=true"
        )
    marker = tok.id_to_piece(mask_id)
    parts = text.split(marker)
    if len(parts) == 1:
        raise ValueError(f"no {marker} in the text: write {marker} where a token is missing")
    ids: list[int] = []
    for i, part in enumerate(parts):
        ids += ([mask_id] if i else []) + (tok.encode(part) if part else [])
    return ids


def candidates(tok, tokens_T: np.ndarray, probs_TK: np.ndarray, ids_TK: np.ndarray) -> list:
    """Per mask position of tokens_T, in order: [{"token", "token_str", "score"}] best first."""
    return [
        [
            {"token": int(t), "token_str": tok.decode([int(t)]), "score": float(p)}
            for t, p in zip(ids_TK[i], probs_TK[i], strict=True)
        ]
        for i in np.flatnonzero(tokens_T == tok.mask_id)
    ]


def make_classify(graphdef: nnx.GraphDef):
    """jit(fn(params, tokens_BT, segment_ids_BT) -> class probabilities [B, C], fp32)."""

    def classify(params, tokens_BT, segment_ids_BT):
        model = nnx.merge(graphdef, params)
        logits_BC = model.classify(tokens_BT, segment_ids_BT=segment_ids_BT)
        return jax.nn.softmax(logits_BC.astype(jnp.float32), axis=-1)

    return jax.jit(classify)


def make_fill_mask(graphdef: nnx.GraphDef, top_k: int):
    """jit(fn(params, tokens_BT, segment_ids_BT) -> (probabilities [B, T, K], ids [B, T, K])):
    the top_k tokens of the masked-LM distribution at every position, most likely first."""

    def fill_mask(params, tokens_BT, segment_ids_BT):
        model = nnx.merge(graphdef, params)
        h_BTD = model.hidden(tokens_BT, segment_ids_BT=segment_ids_BT)
        probs_BTV = jax.nn.softmax(model.logits(h_BTD).astype(jnp.float32), axis=-1)
        return jax.lax.top_k(probs_BTV, top_k)

    return jax.jit(fill_mask)
