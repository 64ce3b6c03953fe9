"""Shared flag handling for the jaxlm-* entry points.

`--config.KEY=VALUE` overrides are split off before absl parses the rest, so that jaxlm's own
`apply_overrides` can reject an unknown key or a wrongly typed value with a one-line error.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import flags

# Errors that mean "the user asked for something wrong": one line, no traceback. Exit status 2
# (as absl and argparse) for usage errors: a flag, config key or value, a mesh that does not fit
# the devices; 1 when the run cannot proceed: data, checkpoint, workdir, disk, a NaN loss.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, RuntimeError)
USAGE, FAILED = 2, 1


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


def use_compilation_cache() -> None:
    """Keep XLA's compiled programs in ~/.cache/jaxlm/xla (JAXLM_XLA_CACHE=DIR elsewhere, =off
    for none), so that a second `make demo` or a resume does not compile the train, eval and
    decode steps again (about 20 s of a 2-core CPU demo). Keyed by program, jaxlib and flags,
    so never stale. Set before JAX is imported; a JAX_COMPILATION_CACHE_DIR already set wins."""
    where = os.environ.get("JAXLM_XLA_CACHE", "")
    if where == "off" or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    if not where:
        home = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        where = os.path.join(home, "jaxlm", "xla")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = where
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(1 << 30))  # LRU beyond 1 GiB


def make_flags_parser(store: list[str], module: str):
    """absl's flags parser for the entry point `module` (its __name__), with overrides split
    off into `store`; also turns on the compilation cache (use_compilation_cache)."""
    _lend_help(module)
    use_compilation_cache()

    def parse(argv: list[str]) -> list[str]:
        rest, overrides = split_overrides(argv)
        store.extend(overrides)
        try:
            return flags.FLAGS(rest)
        except flags.Error as e:  # an unknown flag or a bad value: one line, not a traceback
            spec = getattr(sys.modules.get(module), "__spec__", None)  # python -m: __main__
            program = "jaxlm-" + (spec.name if spec else module).rsplit(".", 1)[-1]
            print(f"{program}: error: {e}; see {program} --help", file=sys.stderr, flush=True)
            sys.exit(USAGE)

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
    sys.exit(exit_status(error))


def exit_status(error: BaseException) -> int:
    """2 for a usage error (a ValueError that is not about the data), else 1."""
    # By name: DataError's module moves with the data layer, and importing it here would load
    # the data stack for every --help.
    about_data = any(c.__name__ == "DataError" for c in type(error).__mro__)
    if isinstance(error, ValueError) and not about_data:
        return USAGE
    return FAILED


def quiet_orbax_errors() -> None:
    """Drop Orbax's ERROR records (with their tracebacks): jaxlm reports every checkpoint
    failure itself, in one line naming the step, the path and the fix."""

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR or "orbax" not in record.pathname

    logging.getLogger("absl").addFilter(keep)


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
