"""JAXLM_TEST_COMPILE_REPORT=1: XLA compile seconds per file, per test and per program.

Each pytest process (xdist workers included) appends one JSON line per (test, program) to a file
the controller names before the workers start; the controller prints the totals at the end.
Compiles in subprocesses the tests start are not counted (their time shows in --durations).
"""

import collections
import json
import os
import tempfile

import pytest
from jax import monitoring

ENABLED = os.environ.get("JAXLM_TEST_COMPILE_REPORT", "") not in ("", "0")
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # also on a cache hit (then short)
_current = ["(collection)"]
# (test node id, program name) -> [compiles, seconds]
_seen: dict[tuple[str, str], list] = collections.defaultdict(lambda: [0, 0.0])


def _listen(event: str, secs: float, **kwargs) -> None:
    if event == COMPILE_EVENT:
        entry = _seen[(_current[0], str(kwargs.get("fun_name", "?")))]
        entry[0] += 1
        entry[1] += secs


if ENABLED:
    if "JAXLM_TEST_COMPILE_REPORT_FILE" not in os.environ:  # the controller, before any worker
        fd, _path = tempfile.mkstemp(prefix="jaxlm-compile-report-", suffix=".jsonl")
        os.close(fd)
        os.environ["JAXLM_TEST_COMPILE_REPORT_FILE"] = _path
    monitoring.register_event_duration_secs_listener(_listen)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _current[0] = item.nodeid
    try:
        return (yield)
    finally:
        _current[0] = "(between tests)"


def pytest_sessionfinish(session):
    if not ENABLED:
        return
    with open(os.environ["JAXLM_TEST_COMPILE_REPORT_FILE"], "a") as f:
        for (nodeid, name), (n, secs) in _seen.items():
            f.write(json.dumps({"test": nodeid, "program": name, "n": n, "secs": secs}) + "\n")
    _seen.clear()


def _table(rows: dict, top: int) -> list[str]:
    best = sorted(rows.items(), key=lambda kv: -kv[1][1])[:top]
    return [f"{secs:9.1f} s {n:6d}x  {key}" for key, (n, secs) in best]


def pytest_terminal_summary(terminalreporter, config):
    if not ENABLED or hasattr(config, "workerinput"):  # workers' output is not shown
        return
    # The workers wrote theirs in their pytest_sessionfinish, before telling xdist they finished.
    path = os.environ["JAXLM_TEST_COMPILE_REPORT_FILE"]
    by_file: dict = collections.defaultdict(lambda: [0, 0.0])
    by_test: dict = collections.defaultdict(lambda: [0, 0.0])
    by_program: dict = collections.defaultdict(lambda: [0, 0.0])
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            for table, key in (
                (by_file, r["test"].split("::", 1)[0]),
                (by_test, r["test"]),
                (by_program, r["program"]),
            ):
                table[key][0] += r["n"]
                table[key][1] += r["secs"]
    os.remove(path)
    total = sum(secs for _, secs in by_file.values())
    write = terminalreporter.write_line
    terminalreporter.section(f"XLA compiles in the test processes: {total:.1f} s")
    for title, table, top in (
        ("per file", by_file, 25),
        ("per test", by_test, 25),
        ("per program", by_program, 40),
    ):
        write(f"-- {title} (seconds, compiles)")
        for line in _table(table, top):
            write(line)
