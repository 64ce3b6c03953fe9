"""jaxlm-bench --config experiments/NAME.py [--steps N] [--config.KEY=VALUE ...]

Prints one JSON line: median step ms, tokens/s, model TFLOP/s, MFU, peak memory, versions.
With --decode it times the generation loop instead, one JSON line per --batch_sizes entry.
With --memory it only compiles the train step (no state is allocated) and prints the bytes per
device: state from the shardings, and XLA's argument/output/alias/temp sizes; --topology
compiles for a TPU slice instead of the local devices (needs libtpu, not a TPU).
"""

from __future__ import annotations

import json

from absl import app, flags, logging

from jaxlm.cli import common

flags.DEFINE_string("config", None, "Experiment file defining get_config().")
flags.DEFINE_integer("steps", 20, "Timed steps (after compilation and warm-up).")
flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
flags.DEFINE_bool("decode", False, "Benchmark KV-cache generation instead of training.")
flags.DEFINE_list("batch_sizes", ["1", "32"], "Decode batch sizes (with --decode).")
flags.DEFINE_integer("prompt_len", 16, "Prompt tokens per row (with --decode).")
flags.DEFINE_integer("new_tokens", 100, "Generated tokens per row (with --decode).")
flags.DEFINE_bool("memory", False, "Compile only and report memory per device.")
flags.DEFINE_string("topology", "", "With --memory: a TPU topology, e.g. v4:2x2x4 (v4-32).")
flags.DEFINE_integer("topology_slices", 1, "With --topology: slices (set mesh.dcn_data too).")
FLAGS = flags.FLAGS
_OVERRIDES: list[str] = []


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    from jaxlm import config as config_lib

    if not FLAGS.config:
        common.fail("jaxlm-bench", ValueError("--config is required"))
    try:
        config = config_lib.load_config(FLAGS.config, _OVERRIDES)
        if FLAGS.topology and not FLAGS.memory:
            raise ValueError("--topology only works with --memory; add --memory")
        # After the checks: a bad config or flag is refused before JAX loads.
        from jaxlm.benchmark import benchmark, decode_benchmark, memory_report, tpu_topology_devices

        if FLAGS.memory:
            devices = None
            if FLAGS.topology:
                devices = tpu_topology_devices(FLAGS.topology, FLAGS.topology_slices)
            _print({"topology": FLAGS.topology or None, **memory_report(config, devices)})
            return
        if FLAGS.decode:
            for b in FLAGS.batch_sizes:
                result = decode_benchmark(
                    config.copy_and_resolve_references(), int(b), FLAGS.prompt_len, FLAGS.new_tokens
                )
                _print(result)
            return
        _print(benchmark(config, steps=FLAGS.steps, warmup=FLAGS.warmup))
    except common.USER_ERRORS as e:
        common.fail("jaxlm-bench", e)


def _print(result: dict) -> None:
    print(json.dumps({"config": FLAGS.config, "overrides": _OVERRIDES, **result}), flush=True)


def run() -> None:
    app.run(main, flags_parser=common.make_flags_parser(_OVERRIDES, __name__))


if __name__ == "__main__":
    run()
