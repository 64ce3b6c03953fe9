"""jaxlm-train --config experiments/NAME.py --workdir DIR [--config.KEY=VALUE ...]

Re-running the same command resumes from the latest checkpoint in DIR. On several hosts, run the
same command on each; add --coordinator_address HOST:PORT --num_processes N --process_id I where
JAX cannot detect the cluster itself (GPU nodes without SLURM, local tests).
"""

from __future__ import annotations

from absl import app, flags, logging

from jaxlm.cli import common

flags.DEFINE_string("config", None, "Experiment file defining get_config().")
flags.DEFINE_string("workdir", None, "Run directory: config, checkpoints, metrics, TensorBoard.")
common.define_distributed_flags()
FLAGS = flags.FLAGS
_OVERRIDES: list[str] = []


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
    common.quiet_orbax_errors()
    from jaxlm import config as config_lib

    if not FLAGS.config or not FLAGS.workdir:
        common.fail("jaxlm-train", ValueError("--config and --workdir are required"))
    try:
        config = config_lib.load_config(FLAGS.config, _OVERRIDES)
        from jaxlm import train  # after the config: a bad one is refused before JAX loads

        common.init_distributed()
        train.train(config, FLAGS.workdir)
    except common.USER_ERRORS as e:
        common.fail("jaxlm-train", e)


def run() -> None:
    app.run(main, flags_parser=common.make_flags_parser(_OVERRIDES, __name__))


if __name__ == "__main__":
    run()
