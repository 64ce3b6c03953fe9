"""Training objectives: the loss and the metrics of a batch for each `task.objective`.

The training step differentiates `loss_sums`, the eval step adds up `eval_sums` over the
validation batches and `finish` turns the totals into metrics, so the loop and the eval program
(jaxlm/inference.py) share one definition. Sums add over microbatches and batches; each
objective's sums hold "nll" (the summed loss, the one differentiated) and "tokens" (what it is
divided by, over the whole batch).

lm:  next-token prediction on the batches as the data layer builds them (decoder family).
mlm: BERT masking of the batch's inputs, on device: in training the key comes from
     (seed, step), in evaluation from the eval batch index, so a resumed run and the eval
     program mask exactly what the uninterrupted loop masked (encoder family).
seq2seq, span_corruption: teacher-forced targets given the encoder inputs (encoder_decoder
     family); the batches differ (labelled pairs, or T5-corrupted text from
     jaxlm/data/documents/span_corruption.py), the objective is one. The decoder starts from
     DECODER_START_ID, as in T5.
seq2seq on a decoder: a prefix LM (supervised fine-tuning of a GPT-style model): input, EOS and
     target in one causal row (objectives.prefix_lm_rows), the loss on the target tokens only;
     the same batches as the encoder-decoder, so data, metrics and decoding are shared.
classify: cross-entropy of the pooled class logits (encoder: first token or mean; decoder: last
     real token), optionally class-weighted; "tokens" holds the summed example weights.

The token objectives (all but classify) take the model's final hidden states and project them
to the vocabulary through `evaluate.projected_sums`: whole, or task.logits_chunk positions at a
time so that [B, T, V] logits never exist at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from jaxlm import evaluate, objectives
from jaxlm.config import MLM_NEEDS_MASK, ConfigError, is_prefix_lm
from jaxlm.data.types import DataSource


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    # (model, batch, key) -> sums; the key drives dropout and any masking.
    loss_sums: Callable[..., dict]
    # (model, batch, key) -> sums, no dropout; the key is fixed per eval batch index.
    eval_sums: Callable[..., dict]
    # accumulated sums -> metrics (floats)
    finish: Callable[[dict], dict]
    # Token objectives: (model, batch, key, dropout: bool) -> (h_BTD, targets_BT, mask_BT), the
    # hidden states of the positions loss_sums counts, drawn with loss_sums' masking for `key`
    # (so a distillation teacher sees what the student sees); None for classify.
    token_hidden: Callable[..., tuple] | None = None


# The decoder's first input (T5 uses the padding id); generate.py starts from the same id.
DECODER_START_ID = 0


def make_objective(config, data: DataSource) -> Objective:
    """The objective `task.objective` names, bound to the data's ids and packing."""
    objective, chunk = config.task.objective, config.task.logits_chunk
    if objective == "mlm":
        return _masked_lm(config.task, data)
    if is_prefix_lm(config):
        return _prefix_lm(chunk)
    if objective in ("seq2seq", "span_corruption"):
        return _seq2seq(objective, chunk)
    if objective == "classify":
        return _classify(config.task.class_weights or None)
    return _causal_lm(data.packed, chunk)


def _token_sums(model, h_BTD, targets_BT, mask_BT, chunk: int) -> dict:
    """objectives.token_sums of the model's logits, projected `chunk` positions at a time."""
    return evaluate.projected_sums(
        objectives.token_sums, model.logits, h_BTD, targets_BT, mask_BT, chunk
    )


def _without_randomness(sums: Callable[..., dict]) -> Callable[..., dict]:
    """eval_sums of an objective whose only randomness is dropout: the key is not used."""

    def eval_sums(model, batch, key):
        del key
        return sums(model, batch, None)

    return eval_sums


def _causal_lm(packed: bool, chunk: int) -> Objective:
    def loss_sums(model, batch, key):
        return evaluate.lm_sums(model, batch, packed=packed, dropout_key=key, logits_chunk=chunk)

    def token_hidden(model, batch, key, dropout: bool):
        h_BTD = evaluate.hidden(model, batch, packed=packed, dropout_key=key if dropout else None)
        return h_BTD, batch["targets"], batch["loss_mask"]

    return Objective(
        "lm", loss_sums, _without_randomness(loss_sums), evaluate.finish_lm, token_hidden
    )


def _masked_lm(task, data: DataSource) -> Objective:
    if data.mask_id is None:
        raise ConfigError(MLM_NEEDS_MASK)

    def masked_hidden(model, batch, mask_key, dropout_key):
        m = objectives.bert_mask(
            mask_key,
            batch["inputs"],
            mask_id=data.mask_id,
            vocab_size=data.vocab_size,
            segment_ids_BT=batch["segment_ids"],
            special_ids=data.special_ids,
            rate=task.mask_rate,
            mask_frac=task.mask_frac,
            random_frac=task.random_frac,
        )
        # Segment ids always: bidirectional attention must not see padding or other documents.
        h_BTD = model.hidden(
            m["inputs"],
            positions_BT=batch["positions"],
            segment_ids_BT=batch["segment_ids"],
            dropout_key=dropout_key,
        )
        return h_BTD, m["targets"], m["loss_mask"]

    def masked_sums(model, batch, mask_key, dropout_key):
        h_BTD, targets_BT, mask_BT = masked_hidden(model, batch, mask_key, dropout_key)
        return _token_sums(model, h_BTD, targets_BT, mask_BT, task.logits_chunk)

    def token_hidden(model, batch, key, dropout: bool):
        mask_key, dropout_key = jax.random.split(key)
        return masked_hidden(model, batch, mask_key, dropout_key if dropout else None)

    def loss_sums(model, batch, key):
        mask_key, dropout_key = jax.random.split(key)
        return masked_sums(model, batch, mask_key, dropout_key)

    def eval_sums(model, batch, key):
        return masked_sums(model, batch, key, None)

    return Objective("mlm", loss_sums, eval_sums, objectives.finish_tokens, token_hidden)


def _seq2seq(name: str, chunk: int) -> Objective:
    def hidden(model, batch, dropout_key):
        # Rows hold one example each, right-padded: the causal decoder never sees its padding,
        # and only the encoder's padding needs masking (cross- and encoder self-attention).
        decoder_inputs = objectives.shift_right(batch["targets"], DECODER_START_ID)
        h_BTD = model.hidden(
            batch["inputs"],
            decoder_inputs,
            encoder_segment_ids_BS=batch["input_segment_ids"],
            dropout_key=dropout_key,
        )
        return h_BTD, batch["targets"], batch["loss_mask"]

    return _token_objective(name, hidden, chunk)


def _token_objective(name: str, hidden: Callable, chunk: int) -> Objective:
    """A token objective whose only randomness is dropout: `hidden(model, batch, dropout_key)`
    gives the counted positions' hidden states, targets and mask."""

    def sums(model, batch, dropout_key):
        return _token_sums(model, *hidden(model, batch, dropout_key), chunk)

    def token_hidden(model, batch, key, dropout: bool):
        return hidden(model, batch, key if dropout else None)

    return Objective(name, sums, _without_randomness(sums), objectives.finish_tokens, token_hidden)


def _prefix_lm(chunk: int) -> Objective:
    def hidden(model, batch, dropout_key):
        b = batch
        tokens, segment_ids, positions = objectives.prefix_lm_rows(
            b["inputs"], b["input_segment_ids"], b["targets"], b["target_segment_ids"]
        )
        h_BTD = model.hidden(
            tokens[:, :-1],
            positions_BT=positions[:, :-1],
            segment_ids_BT=segment_ids[:, :-1],
            dropout_key=dropout_key,
        )
        # Column S - 1 (the input's EOS) predicts the first target: project only the targets'.
        s = batch["inputs"].shape[1]
        return h_BTD[:, s - 1 :], batch["targets"], batch["loss_mask"]

    return _token_objective("seq2seq", hidden, chunk)


def _classify(class_weights) -> Objective:
    def sums(model, batch, dropout_key):
        logits = model.classify(
            batch["inputs"], segment_ids_BT=batch["segment_ids"], dropout_key=dropout_key
        )
        out = objectives.classification_sums(
            logits,
            batch["labels"],
            class_weights_C=class_weights,
            example_mask_B=batch["example_mask"],
        )
        return {**out, "tokens": out["weight"]}  # the training step divides by "tokens"

    return Objective("classify", sums, _without_randomness(sums), objectives.finish_classification)
