"""jaxlm-convert import --hf_dir HF_DIR --workdir RUN_DIR
jaxlm-convert export --workdir RUN_DIR --out HF_DIR [--dtype bfloat16] [--max_shard_size 2GB]
    [--step N] [--architecture NAME]

import: a Hugging Face model folder (config.json, model.safetensors or a sharded index, tokenizer
files) becomes a new jaxlm run directory at step 0, used by jaxlm-eval, jaxlm-generate,
LanguageModel.load and --config.train.init_from like a run jaxlm trained.
export: a run's checkpoint (the latest unless --step) becomes a folder transformers'
from_pretrained loads. Architectures: GPT2LMHeadModel, LlamaForCausalLM (and those of
jaxlm/interop/convert.py's table). Nothing is left behind when a conversion fails.
"""

from __future__ import annotations

from absl import app, flags, logging

from jaxlm.cli import common

flags.DEFINE_string("hf_dir", None, "import: the Hugging Face model folder to read.")
flags.DEFINE_string("workdir", None, "The jaxlm run directory (import: a new one to write).")
flags.DEFINE_string("out", None, "export: the new Hugging Face folder to write.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "export: tensor dtype.")
flags.DEFINE_string(
    "max_shard_size", None, "export: split weights into files of at most this size (e.g. 2GB)."
)
flags.DEFINE_integer("step", None, "export: checkpoint step; default: the latest.")
flags.DEFINE_string(
    "architecture", None, "export: HF architecture; default: the first that fits the model."
)
FLAGS = flags.FLAGS
_OVERRIDES: list[str] = []
_NEEDS = {"import": ("hf_dir", "workdir"), "export": ("workdir", "out")}


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)
    common.quiet_orbax_errors()
    command = argv[1] if len(argv) == 2 else None
    if command not in _NEEDS or _OVERRIDES:
        common.fail(
            "jaxlm-convert",
            ValueError("usage: jaxlm-convert import|export ...; see jaxlm-convert --help"),
        )
    missing = [f"--{name}" for name in _NEEDS[command] if not FLAGS[name].value]
    if missing:
        common.fail("jaxlm-convert", ValueError(f"{command} needs {' and '.join(missing)}"))
    from jaxlm import interop

    try:
        if command == "import":
            out = interop.import_hf(FLAGS.hf_dir, FLAGS.workdir)
        else:
            out = interop.export_hf(
                FLAGS.workdir,
                FLAGS.out,
                dtype=FLAGS.dtype,
                max_shard_size=FLAGS.max_shard_size,
                step=FLAGS.step,
                architecture=FLAGS.architecture,
            )
    except common.USER_ERRORS as e:
        common.fail("jaxlm-convert", e)
    print(f"wrote {out}", flush=True)


def run() -> None:
    app.run(main, flags_parser=common.make_flags_parser(_OVERRIDES, __name__))


if __name__ == "__main__":
    run()
