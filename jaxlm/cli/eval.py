"""jaxlm-eval --workdir DIR [--step N] [--max_batches N] [--output FILE] [--config.KEY=VALUE ...]

Restores only the parameters of a checkpoint (the latest unless --step) and prints one JSON line
with the objective's metrics and step:
  lm: loss, perplexity, bits_per_byte, tokens, bytes;
  mlm: loss, perplexity, accuracy and tokens over masked positions;
  classify: loss, accuracy, macro_f1;
  seq2seq: teacher-forced token loss, perplexity, accuracy and tokens, plus generation metrics
    of the validation inputs decoded up to data.target_len tokens: bleu and chrf (sacrebleu,
    0-100), exact_match (a fraction), decoded_examples, beam_size, length_penalty. Decoding is
    greedy with --beam_size 1, beam search with GNMT --length_penalty otherwise;
    --max_decode_examples bounds it (0: the examples the evaluated batches hold) and --nodecode
    (or --decode=false) skips it. The first examples' (input, reference, hypothesis) triples go
    to DIR/eval_samples.jsonl.
The record also goes to --output, to DIR/eval_metrics.jsonl and to TensorBoard
(DIR/tensorboard/jaxlm-eval). Overrides such as `--config.data.source=...` evaluate other data
with the same model.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags, logging

from jaxlm.cli import common

flags.DEFINE_string("workdir", None, "Run directory written by jaxlm-train.")
flags.DEFINE_integer("step", None, "Checkpoint step to evaluate; default: the latest.")
flags.DEFINE_enum("split", "validation", ["validation"], "Split to evaluate.")
flags.DEFINE_integer(
    "max_batches", None, "Batches to evaluate; default: the run's train.eval_steps; 0: all."
)
flags.DEFINE_string("output", None, "Also write the JSON record to this file.")
flags.DEFINE_bool("decode", True, "seq2seq: also decode the validation inputs for BLEU.")
flags.DEFINE_integer("beam_size", 1, "seq2seq decoding: beams per example; 1 is greedy.")
flags.DEFINE_float(
    "length_penalty", 0.6, "seq2seq beam search: GNMT alpha; 0 ranks by log-probability."
)
flags.DEFINE_integer(
    "max_decode_examples", 0, "seq2seq: examples to decode; 0: those the eval batches hold."
)
common.define_distributed_flags()
FLAGS = flags.FLAGS
_OVERRIDES: list[str] = []


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    from jaxlm import config as config_lib

    if not FLAGS.workdir:
        common.fail("jaxlm-eval", ValueError("--workdir is required"))
    try:
        # The flags, then the run directory, are refused before JAX loads (3 s).
        config_lib.check_eval_args(
            max_batches=FLAGS.max_batches,
            max_decode_examples=FLAGS.max_decode_examples,
            beam_size=FLAGS.beam_size,
            length_penalty=FLAGS.length_penalty,
        )
        config_lib.load_run_config(FLAGS.workdir, _OVERRIDES)
        import jax

        from jaxlm import inference

        common.init_distributed()
        metrics = inference.evaluate_run(
            FLAGS.workdir,
            step=FLAGS.step,
            max_batches=FLAGS.max_batches,
            overrides=_OVERRIDES,
            decode=FLAGS.decode,
            beam_size=FLAGS.beam_size,
            length_penalty=FLAGS.length_penalty,
            max_decode_examples=FLAGS.max_decode_examples,
        )
        # The overrides say which data (or settings) the figures are for.
        record = {"workdir": FLAGS.workdir, "split": FLAGS.split, "overrides": _OVERRIDES}
        record.update(metrics)
        if jax.process_index() != 0:
            return
        # Inside the try: a full disk or a read-only file here is one line too.
        inference.write_eval_record(FLAGS.workdir, record, FLAGS.split)
        line = json.dumps(record)
        if FLAGS.output:
            _write_output(FLAGS.output, line + "\n")
    except common.USER_ERRORS as e:
        common.fail("jaxlm-eval", e)
    print(line, flush=True)


def _write_output(path: str, text: str) -> None:
    try:
        Path(path).write_text(text)
    except OSError as e:
        raise OSError(
            f"could not write --output {path}: {e.strerror or e} (errno {e.errno}); free "
            "space, fix its permissions or pick another --output",
        ) from None


def run() -> None:
    app.run(main, flags_parser=common.make_flags_parser(_OVERRIDES, __name__))


if __name__ == "__main__":
    run()
