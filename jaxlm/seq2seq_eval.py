"""Generation metrics of a seq2seq run: decode the validation inputs, score the text.

`decode_ids(s, params, sources, settings)` decodes token-id sources in batches of
data.batch_size (the last one filled with one-token rows), each source right-padded to
data.seq_len, so every batch shares one compiled loop per `BeamSettings` (cached across
calls). beam_size 1 is greedy argmax decoding (`generate.make_seq2seq_generate`); more beams
run `generate.make_beam_search` with its GNMT length penalty and keep the best hypothesis.
A decoder trained on seq2seq (a prefix LM) continues each source as its prompt instead
(`generate.make_generate`, `generate.make_prefix_beam_search`).
Outputs are cut before the first EOS, with padding dropped. Rows are split over the mesh's
batch axes like training batches; the outputs come back replicated, so every process of a
multi-process run gets all of them.

`evaluate_generation(s, params, ...)` is what `inference.evaluate_run` (and the training
loop's evals, with train.eval_decode) add for task.objective=seq2seq: corpus BLEU and chrF
(sacrebleu, 0-100) and exact match (a fraction) of the detokenized hypotheses against the
references, over `DataSource.eval_examples`. Sources without examples (synthetic data) are
decoded from the validation batches instead, with token ids written as space-separated
numbers in place of text.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence

import jax
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm import distributed, sharding, text_metrics
from jaxlm.data.batches import padded
from jaxlm.data.types import EOS_ID, PAD_ID
from jaxlm.decode_settings import BeamSettings, SamplingSettings
from jaxlm.generate import (
    make_beam_search,
    make_generate,
    make_prefix_beam_search,
    make_seq2seq_generate,
)
from jaxlm.tasks import DECODER_START_ID

SAMPLES_FILE = "eval_samples.jsonl"
NUM_SAMPLES = 20  # (input, reference, hypothesis) triples written for a human to read


class IdText:
    """Stands in for a tokenizer where data has no text: ids as space-separated numbers.

    BLEU over these "words" is still the n-gram overlap of the id sequences.
    """

    eos_id, pad_id = EOS_ID, PAD_ID

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


@functools.lru_cache(maxsize=16)
def _compiled(graphdef, mesh, rules: tuple, settings: BeamSettings, prefix_lm: bool):
    """jit(fn(params, sources_BS, lengths_B) -> tokens_BN), outputs replicated.

    A prefix LM (a decoder trained on seq2seq) continues the sources as prompts; an
    encoder-decoder encodes them. Cached per (model, mesh, rules, settings): the rules are
    read while tracing, so a function traced under one set must not serve another.
    """
    del rules  # part of the cache key only
    if settings.beam_size == 1:
        greedy = SamplingSettings(
            max_new_tokens=settings.max_new_tokens,
            temperature=0.0,
            eos_id=settings.eos_id,
            pad_id=settings.pad_id,
        )
        if prefix_lm:
            generate = make_generate(graphdef, greedy)
        else:
            generate = make_seq2seq_generate(graphdef, greedy, start_id=DECODER_START_ID)

        def run(params, sources_BS, lengths_B):
            # Greedy decoding draws no randomness; the key only fills the signature.
            return generate(params, sources_BS, lengths_B, jax.random.key(0))[0]

    else:
        if prefix_lm:
            search = make_prefix_beam_search(graphdef, settings)
        else:
            search = make_beam_search(graphdef, settings, start_id=DECODER_START_ID)

        def run(params, sources_BS, lengths_B):
            return search(params, sources_BS, lengths_B)[0][:, 0]  # the best hypothesis

    return jax.jit(run, out_shardings=NamedSharding(mesh, PartitionSpec()))


def padded_sources(sources: Sequence[np.ndarray], width: int):
    """(ids [n, width] right-padded with 0, lengths [n]).

    A source longer than `width` keeps its first width - 1 tokens and its last one (the EOS
    every input ends with), as the model was trained on inputs of at most `width` tokens.
    """
    cut = []
    for i, src in enumerate(sources):
        src = np.asarray(src, np.int32).reshape(-1)
        if src.size == 0:
            raise ValueError(f"example {i} has an empty input: inputs hold at least their EOS")
        cut.append(np.append(src[: width - 1], src[-1]) if src.size > width else src)
    ids, segment_ids = padded(cut, width)
    return ids, segment_ids.sum(axis=1).astype(np.int32)


def strip_output(tokens: Sequence[int], eos_id: int, pad_id: int) -> list[int]:
    """The tokens before the first EOS, padding dropped (it is never a target token)."""
    out = []
    for t in tokens:
        t = int(t)
        if t == eos_id:
            break
        if t != pad_id:
            out.append(t)
    return out


def decode_ids(s, params, sources: Sequence[np.ndarray], settings: BeamSettings) -> list:
    """Decoded ids of each source (EOS included in the source), cut before EOS.

    `s` is a `train.Setup` or anything with .graphdef, .mesh, .batch_sharding and .config
    (data.batch_size, data.seq_len, mesh.rules).
    """
    settings.check()
    config, mesh = s.config, s.mesh
    batch, width = config.data.batch_size, config.data.seq_len
    rules = tuple(tuple(r) for r in config.mesh.rules)
    fn = _compiled(s.graphdef, mesh, rules, settings, config.model.family == "decoder")
    ids, lengths = padded_sources(sources, width)
    row_sh = s.batch_sharding  # rows split over the batch axes as in training
    out, count = [], -(-len(ids) // batch)
    with sharding.use_rules(mesh, rules):
        for start in range(0, len(ids), batch):
            n = min(batch, len(ids) - start)
            # Filler rows: one EOS token each, so no row has an empty (all-masked) source.
            src = np.zeros((batch, width), np.int32)
            src[:, 0] = settings.eos_id
            src_len = np.ones(batch, np.int32)
            src[:n], src_len[:n] = ids[start : start + n], lengths[start : start + n]
            where = f"decode batch {start // batch + 1} of {count}"
            # Every process decodes all the sources, one batch at a time: the same steps.
            with distributed.deadline(where, config.train.hang_timeout):
                tokens = fn(params, _global(src, row_sh), _global(src_len, row_sh))
                tokens = np.asarray(tokens)[:n]
            out.extend(strip_output(row, settings.eos_id, settings.pad_id) for row in tokens)
    return out


def _global(x: np.ndarray, sh: NamedSharding) -> jax.Array:
    """A global array from a host array every process holds in full."""
    return jax.make_array_from_callback(x.shape, sh, lambda index: x[index])


def decode_examples(s, params, examples: Sequence[dict], tokenizer, settings) -> list[str]:
    """Hypothesis text of each example's input_ids."""
    ids = decode_ids(s, params, [e["input_ids"] for e in examples], settings)
    return [tokenizer.decode(x) for x in ids]


def examples_from_batches(batches: Sequence[dict], text, max_examples: int = 0) -> list[dict]:
    """Eval examples from whole seq2seq validation batches (rows whose loss mask counts)."""
    out = []
    for b in batches:
        real = np.asarray(b["loss_mask"]).sum(axis=1) > 0
        for i in np.flatnonzero(real):
            src = np.asarray(b["inputs"][i])[np.asarray(b["input_segment_ids"][i]) > 0]
            ref = strip_output(b["targets"][i], text.eos_id, text.pad_id)
            out.append(
                {
                    "input_ids": src,
                    "input": text.decode(strip_output(src, text.eos_id, text.pad_id)),
                    "reference": text.decode(ref),
                }
            )
    return out[:max_examples] if max_examples > 0 else out


def validation_examples(s, num_examples: int, num_batches: int) -> tuple[list[dict], object]:
    """(the first `num_examples` validation examples (0: all), what detokenizes them).

    Sources without `eval_examples` (synthetic data) give their first `num_batches`
    validation batches' rows (0: the source's default), all processes' rows.
    """
    data = s.data
    if data.eval_examples is not None:
        return data.eval_examples(num_examples), data.tokenizer
    text = data.tokenizer if data.tokenizer is not None else IdText()
    batches = data.eval_batches(num_batches, 0, 1)
    return examples_from_batches(batches, text, num_examples), text


def evaluate_generation(
    s,
    params,
    *,
    num_examples: int,
    num_batches: int,
    beam_size: int = 1,
    length_penalty: float = 0.6,
    samples_path: str | None = None,
) -> dict:
    """BLEU, chrF, exact match and the decoding settings over the validation examples.

    `num_examples` 0 takes all; `num_batches` bounds synthetic data (see validation_examples).
    The first NUM_SAMPLES (input, reference, hypothesis) triples go to `samples_path`
    (process 0 writes it).
    """
    examples, text = validation_examples(s, num_examples, num_batches)
    if not examples:
        raise ValueError(
            "the validation split has no examples to decode; pass --nodecode to jaxlm-eval "
            "(training: --config.train.eval_decode=0)"
        )
    settings = BeamSettings(
        beam_size=beam_size,
        length_penalty=length_penalty,
        max_new_tokens=s.config.data.target_len,
        eos_id=text.eos_id,
        pad_id=text.eos_id if text.pad_id is None else text.pad_id,  # GPT-2 has no pad piece
    )
    hyps = decode_examples(s, params, examples, text, settings)
    refs = [e["reference"] for e in examples]
    if samples_path is not None and jax.process_index() == 0:
        lines = [
            json.dumps({"input": e["input"], "reference": e["reference"], "hypothesis": h})
            for e, h in zip(examples[:NUM_SAMPLES], hyps, strict=False)
        ]
        epath.Path(samples_path).write_text("\n".join(lines) + "\n")
    return {
        "bleu": text_metrics.bleu(hyps, refs),
        "chrf": text_metrics.chrf(hyps, refs),
        "exact_match": text_metrics.exact_match(hyps, refs),
        "decoded_examples": len(examples),
        "beam_size": beam_size,
        "length_penalty": length_penalty,
    }
