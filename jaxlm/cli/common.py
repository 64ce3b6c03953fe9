"""Shared flag handling for the jaxlm-* entry points.

`--config.KEY=VALUE` overrides are split off before absl parses the rest, so that jaxlm's own
`apply_overrides` can reject an unknown key or a wrongly typed value with a one-line error.
"""

from __future__ import annotations

import sys

from absl import flags

# Errors that mean "the user asked for something wrong": one line, exit status 1, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, RuntimeError)


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv without overrides, overrides) for `--config.a.b=v` (or `--config.a.b v`)."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            if "=" not in arg and i + 1 < len(argv):
                arg, i = f"{arg}={argv[i + 1]}", i + 1
            overrides.append(arg)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def make_flags_parser(store: list[str], module: str):
    """absl's flags parser for the entry point `module` (its __name__), with overrides split
    off into `store`."""
    _lend_help(module)

    def parse(argv: list[str]) -> list[str]:
        rest, overrides = split_overrides(argv)
        store.extend(overrides)
        return flags.FLAGS(rest)

    return parse


def _lend_help(module: str) -> None:
    """absl's --help prints __main__'s docstring and the key flags of sys.argv[0]; a console
    script's wrapper has neither, so lend it the entry point's docstring and flags (and the
    shared distributed ones)."""
    main = sys.modules["__main__"]
    if not main.__doc__:
        main.__doc__ = sys.modules[module].__doc__
    defined = flags.FLAGS.flags_by_module_dict()
    for name in (module, __name__):
        for flag in defined.get(name, []):
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def fail(program: str, error: BaseException) -> None:
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"{program}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def define_distributed_flags() -> None:
    """Flags for multi-process runs (one process per host); see jaxlm/distributed.py."""
    flags.DEFINE_string(
        "coordinator_address", None, "HOST:PORT of process 0 for a multi-process run."
    )
    flags.DEFINE_integer("num_processes", None, "Processes in the run, with --coordinator_address.")
    flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
    flags.DEFINE_bool(
        "multihost", False, "Let JAX detect the cluster (TPU pod, SLURM) even if jaxlm does not."
    )


def init_distributed() -> None:
    from jaxlm import distributed

    f = flags.FLAGS
    distributed.initialize(f.coordinator_address, f.num_processes, f.process_id, auto=f.multihost)
