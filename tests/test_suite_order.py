"""The suite's own scheduling: slowest files first under `--dist loadfile` (tests/conftest.py)."""

from pathlib import Path

from conftest import SLOWEST_FILES, slowest_first


def test_slowest_files_go_first_and_each_file_keeps_its_order():
    nodeids = [
        "tests/test_data.py::test_a",
        "tests/test_model.py::test_b",
        "tests/test_data.py::test_c",
        "tests/test_multiprocess.py::test_d[lm]",
        "tests/test_model.py::TestX::test_e",
        "tests/test_architecture.py::test_f",
    ]
    assert slowest_first(nodeids) == [
        "tests/test_multiprocess.py::test_d[lm]",
        "tests/test_model.py::test_b",
        "tests/test_model.py::TestX::test_e",
        "tests/test_data.py::test_a",
        "tests/test_data.py::test_c",
        "tests/test_architecture.py::test_f",
    ]


def test_every_listed_file_exists():
    here = Path(__file__).parent
    assert [f for f in SLOWEST_FILES if not (here / f).exists()] == []
