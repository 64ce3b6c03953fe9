"""jaxlm-compress SUBCOMMAND --workdir RUN --out NEW [flags]: a trained run into a new, smaller run.

Subcommands (each one module in jaxlm/compress/):
  prune  sparsity masks by --method magnitude or wanda (|W| x input norms over
         --calibration_batches training batches): --sparsity S per matrix, or --pattern 2:4;
         or structured pruning into a smaller model: --heads H (share of KV groups) and/or
         --neurons F (share of MLP neurons) per block.
  quantize     --bits 8|4 [--group_size N]: block matmul kernels as int8, or int4 packed two to
               a byte with one scale per N input rows (0: per output channel), fp32 scales.
  merge-lora   a LoRA run's adapters merged (in fp32) into its train.init_from base: a plain run.
  export-peft  a LoRA run's adapters in PEFT's format (adapter_config.json,
               adapter_model.safetensors) for its base's Hugging Face architecture; NEW is a
               folder for peft.PeftModel.from_pretrained, not a run.

NEW is written whole or not at all (a failed run leaves no directory) and loads like any run:
jaxlm-eval, jaxlm-generate, LanguageModel.load, train.init_from. A masked run keeps its masks
in NEW/masks.safetensors and names them in train.masks, so a recovery fine-tune
  jaxlm-train --config NEW/config.json --workdir FT --config.train.init_from=NEW
keeps the pruned weights at zero. One JSON line with the outcome is printed.
"""

from __future__ import annotations

import json

import numpy as np
from absl import app, flags, logging

from jaxlm.cli import common

flags.DEFINE_string("workdir", None, "Run directory to compress (written by jaxlm-train).")
flags.DEFINE_string("out", None, "New run directory to write; must not exist.")
flags.DEFINE_integer("step", None, "Checkpoint step to compress; default: the latest.")
flags.DEFINE_enum("method", "wanda", ["magnitude", "wanda"], "prune: weight scores.")
flags.DEFINE_float("sparsity", 0.0, "prune: share of each block kernel's weights set to zero.")
flags.DEFINE_string("pattern", "", "prune: N:M semi-structured sparsity, e.g. 2:4.")
flags.DEFINE_float("heads", 0.0, "prune: share of KV groups (with their query heads) removed.")
flags.DEFINE_float("neurons", 0.0, "prune: share of MLP hidden neurons removed.")
flags.DEFINE_integer("calibration_batches", 8, "prune --method wanda: training batches used.")
flags.DEFINE_integer("bits", 8, "quantize: 8 (int8) or 4 (int4).")
flags.DEFINE_integer("group_size", 0, "quantize: input rows per scale; 0: one per output.")
common.define_distributed_flags()
FLAGS = flags.FLAGS
_OVERRIDES: list[str] = []


def _prune() -> dict:
    from jaxlm.compress import prune

    request = prune.PruneRequest(
        method=FLAGS.method,
        sparsity=FLAGS.sparsity,
        pattern=FLAGS.pattern,
        heads=FLAGS.heads,
        neurons=FLAGS.neurons,
        calibration_batches=FLAGS.calibration_batches,
    )
    request.check()  # before any loading: a bad flag fails in a second
    record = prune.prune_run(FLAGS.workdir, FLAGS.out, request, FLAGS.step)
    summary = {k: v for k, v in record.items() if k != "sparsity"}
    if "sparsity" in record:
        values = list(record["sparsity"].values())
        summary["sparsity_min"], summary["sparsity_max"] = min(values), max(values)
        summary["sparsity_mean"] = float(np.mean(values))
    return summary


def _quantize() -> dict:
    from jaxlm.compress import quantize

    return quantize.quantize_run(FLAGS.workdir, FLAGS.out, FLAGS.bits, FLAGS.group_size, FLAGS.step)


def _merge_lora() -> dict:
    from jaxlm.compress import lora

    return lora.merge_run(FLAGS.workdir, FLAGS.out, FLAGS.step)


def _export_peft() -> dict:
    from jaxlm.compress import peft_export

    return peft_export.export_peft(FLAGS.workdir, FLAGS.out, FLAGS.step)


SUBCOMMANDS = {
    "prune": _prune,
    "quantize": _quantize,
    "merge-lora": _merge_lora,
    "export-peft": _export_peft,
}


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)
    common.quiet_orbax_errors()
    program = "jaxlm-compress"
    names = ", ".join(SUBCOMMANDS)
    if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
        common.fail(program, ValueError(f"give one subcommand ({names}), then its flags"))
    if not FLAGS.workdir or not FLAGS.out:
        common.fail(program, ValueError("--workdir and --out are required"))
    if _OVERRIDES:
        common.fail(program, ValueError("--config.* overrides do not apply to jaxlm-compress"))
    try:
        common.init_distributed()
        summary = SUBCOMMANDS[argv[1]]()
    except common.USER_ERRORS as e:
        common.fail(f"{program} {argv[1]}", e)
    print(json.dumps({"subcommand": argv[1], "out": FLAGS.out, **summary}), flush=True)


def run() -> None:
    app.run(main, flags_parser=common.make_flags_parser(_OVERRIDES, __name__))


if __name__ == "__main__":
    run()
