"""jaxlm-compress COMMAND --workdir RUN --out NEW [flags]

Commands (each writes a new run directory NEW, atomically, that jaxlm-eval, jaxlm-generate and
LanguageModel.load use like any other run; RUN is never changed):
  quantize    --bits 8|4 [--group_size N]: block matmul kernels as int8, or int4 packed two to a
              byte with one scale per N input rows (0: per output channel) and fp32 scales.
  merge-lora  the LoRA run's adapters merged (in fp32) into its train.init_from base: a plain run.
  export-peft the LoRA run's adapters in PEFT's format (adapter_config.json,
              adapter_model.safetensors) for its base's Hugging Face architecture; NEW is a
              folder for peft.PeftModel.from_pretrained, not a run.
--step picks RUN's checkpoint (default: the latest).
"""

from __future__ import annotations

import json

from absl import app, flags, logging

from jaxlm.cli import common

flags.DEFINE_string("workdir", None, "Run directory to compress (read only).")
flags.DEFINE_string("out", None, "New run directory to write; must not exist.")
flags.DEFINE_integer("step", None, "Checkpoint step of --workdir; default: the latest.")
flags.DEFINE_integer("bits", 8, "quantize: 8 (int8) or 4 (int4).")
flags.DEFINE_integer("group_size", 0, "quantize: input rows per scale; 0: one per output.")
FLAGS = flags.FLAGS
_OVERRIDES: list[str] = []
COMMANDS = ("quantize", "merge-lora", "export-peft")


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)
    common.quiet_orbax_errors()
    from jaxlm.compress import lora, peft_export, quantize

    program = "jaxlm-compress"
    command = argv[1] if len(argv) > 1 else None
    if command not in COMMANDS or len(argv) > 2:
        common.fail(program, ValueError(f"name one command: {' or '.join(COMMANDS)}; see --help"))
    if _OVERRIDES:
        common.fail(program, ValueError("--config.* overrides are not taken; see --help"))
    if not FLAGS.workdir or not FLAGS.out:
        common.fail(program, ValueError("--workdir and --out are required"))
    try:
        if command == "quantize":
            result = quantize.quantize_run(
                FLAGS.workdir, FLAGS.out, FLAGS.bits, FLAGS.group_size, FLAGS.step
            )
        elif command == "merge-lora":
            result = lora.merge_run(FLAGS.workdir, FLAGS.out, FLAGS.step)
        else:
            result = peft_export.export_peft(FLAGS.workdir, FLAGS.out, FLAGS.step)
    except common.USER_ERRORS as e:
        common.fail(program, e)
    print(json.dumps(result), flush=True)


def run() -> None:
    app.run(main, flags_parser=common.make_flags_parser(_OVERRIDES, __name__))


if __name__ == "__main__":
    run()
