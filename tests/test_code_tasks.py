"""The code tasks: docstring removal and first sentences, the corpus file split, TFDS builders."""

from __future__ import annotations

import ast
import errno

import pytest

from jaxlm.data import readers
from jaxlm.data.builtin import code_tasks, corpus
from jaxlm.data.builtin.code_tasks import PACKAGES, first_sentence, functions
from jaxlm.data.specs import ReadOptions

SPLITS = ("train", "validation")


@pytest.fixture(scope="module")
def docstring_sets() -> dict[str, list[dict]]:
    return {split: list(code_tasks.docstring_examples(split)) for split in SPLITS}


@pytest.fixture(scope="module")
def package_sets() -> dict[str, list[dict]]:
    return {split: list(code_tasks.package_examples(split)) for split in SPLITS}


def _function_node(code: str) -> ast.FunctionDef | ast.AsyncFunctionDef:
    tree = ast.parse(code)
    assert len(tree.body) == 1
    node = tree.body[0]
    assert isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    return node


# --- first sentences on hand-written docstrings ------------------------------------------------


@pytest.mark.parametrize(
    ("docstring", "expected"),
    [
        ("Return the sum of a and b.", "Return the sum of a and b"),
        ("Return the sum of a and b", "Return the sum of a and b"),  # no period: same result
        ("Return the sum.  More detail follows.", "Return the sum"),
        # A multi-line first sentence is joined; it ends at ". ", not at the line end.
        (
            "\n    Return the sum\n    of a and b. Then more.\n\n    Args: ...\n    ",
            "Return the sum of a and b",
        ),
        # A blank line ends the first paragraph even without a period.
        ("Summary line without a period\n\nDetails. More.", "Summary line without a period"),
        # Abbreviations do not end the sentence (documented choice).
        (
            "Pick a codec, e.g. utf-8 or latin-1. Then encode.",
            "Pick a codec, e.g. utf-8 or latin-1",
        ),
        ("Do it, i.e. now.", "Do it, i.e. now"),
        ("Wait for it...", "Wait for it..."),  # an ellipsis keeps its dots
        ("Tabs\tand   spaces\n   collapse here.", "Tabs and spaces collapse here"),
        ("Version 3.11 is fine. Next.", "Version 3.11 is fine"),  # "3.11" has no ". "
        ("Return (entry, label), .", "Return (entry, label),"),  # no space left behind
    ],
)
def test_first_sentence(docstring: str, expected: str) -> None:
    assert first_sentence(docstring) == expected


# --- docstring removal on hand-written sources -------------------------------------------------

SOURCE = '''\
import functools


@functools.cache
def top(a, b):
    """Add two numbers.

    Longer text.
    """

    return a + b


class Thing:
    def method(self):
        """Only a docstring."""

    async def fetch(self, url):
        \'\'\'Fetch a url
        over the network.\'\'\'
        text = """
not indented like the method
"""
        def inner():
            "Inner doc here."
            return 1
        return text, inner


def one_liner(): "Shares the def line."


def promoted():
    "Doc."
    "Would become the docstring."
    return 0


def undocumented(x):
    # a comment
    return x
'''


def test_functions_remove_the_docstring_and_dedent() -> None:
    found = {f.name: f for f in functions(SOURCE)}
    # one_liner and promoted cannot lose their docstring cleanly, so they are skipped.
    assert list(found) == ["top", "method", "fetch", "inner", "undocumented"]
    assert found["top"].code == "def top(a, b):\n    return a + b\n"  # decorator left out
    assert found["top"].docstring == "Add two numbers.\n\nLonger text."
    assert found["method"].code == "def method(self):\n    pass\n"  # emptied body -> pass
    fetch = found["fetch"].code
    assert fetch.startswith("async def fetch(self, url):\n    text = ")
    assert "\nnot indented like the method\n" in fetch  # string contents kept as they were
    assert '"Inner doc here."' in fetch  # nested functions keep their own docstrings
    assert first_sentence(found["fetch"].docstring) == "Fetch a url over the network"
    assert found["inner"].code == "def inner():\n    return 1\n"
    assert found["undocumented"].docstring is None
    assert found["undocumented"].code == "def undocumented(x):\n    # a comment\n    return x\n"
    for f in found.values():
        assert ast.get_docstring(_function_node(f.code)) is None


def test_functions_handle_form_feeds_and_bad_sources() -> None:
    # ast does not break lines at form feeds (str.splitlines does); the cut must follow ast.
    src = 'x = 1\n\x0c\ndef f():\n    "Doc string here."\n    return 2\n'
    assert [f.code for f in functions(src)] == ["def f():\n    return 2\n"]
    assert functions("def broken(:\n") == []


# --- the real tasks -----------------------------------------------------------------------------


def test_docstring_examples_are_clean(docstring_sets) -> None:
    for split, examples in docstring_sets.items():
        assert examples, split
        codes = [ex["code"] for ex in examples]
        assert len(set(codes)) == len(codes)  # no exact duplicates
        for ex in examples:
            assert set(ex) == {"code", "docstring", "name", "path"}
            node = _function_node(ex["code"])
            assert node.name == ex["name"] and ast.get_docstring(node) is None
            assert len(ex["code"]) <= code_tasks.MAX_CODE_CHARS
            doc = ex["docstring"]
            assert len(doc.split()) >= 3 and len(doc) <= code_tasks.MAX_DOCSTRING_CHARS
            assert doc == " ".join(doc.split()) and not doc.endswith(". ")
    train_codes = {ex["code"] for ex in docstring_sets["train"]}
    assert not train_codes & {ex["code"] for ex in docstring_sets["validation"]}


def _check_split_paths(sets: dict[str, list[dict]]) -> None:
    files = {split: {rel for rel, _ in corpus.iter_split(split, 5.0)} for split in SPLITS}
    paths = {split: {ex["path"] for ex in sets[split]} for split in SPLITS}
    assert not paths["train"] & paths["validation"]
    for split in SPLITS:
        assert paths[split] <= files[split], split  # validation only from validation files


def test_splits_follow_the_corpus_file_split(docstring_sets, package_sets) -> None:
    _check_split_paths(docstring_sets)
    _check_split_paths(package_sets)
    # Many validation files contribute, not one: the split is by file, not by function.
    assert len({ex["path"] for ex in docstring_sets["validation"]}) >= 10


def test_package_labels(package_sets) -> None:
    assert 8 <= len(PACKAGES) <= 16 and len(set(PACKAGES)) == len(PACKAGES)
    for split, examples in package_sets.items():
        counts = [0] * len(PACKAGES)
        for ex in examples:
            assert 0 <= ex["label"] < len(PACKAGES)
            assert ex["package"] == PACKAGES[ex["label"]] == code_tasks.package_of(ex["path"])
            assert ast.get_docstring(_function_node(ex["code"])) is None
            counts[ex["label"]] += 1
        assert min(counts) > 0, (split, counts)  # every class in both splits
        codes = [ex["code"] for ex in examples]
        assert len(set(codes)) == len(codes)


def test_tasks_are_deterministic(docstring_sets, package_sets) -> None:
    assert list(code_tasks.docstring_examples("validation")) == docstring_sets["validation"]
    assert list(code_tasks.package_examples("validation")) == package_sets["validation"]
    # The per-split parse is cached; parsing the files afresh gives the same functions.
    texts = dict(corpus.iter_split("validation", 5.0))
    for rel, funcs in code_tasks._files("validation"):
        assert tuple(functions(texts[rel])) == funcs
    with pytest.raises(ValueError, match="unknown split"):
        list(code_tasks.package_examples("test"))


# --- TFDS ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "keys", "supervised"),
    [
        ("code_docstring", {"code", "docstring", "name", "path"}, ("code", "docstring")),
        ("stdlib_package", {"code", "label", "path"}, ("code", "label")),
    ],
)
def test_tfds_builders_with_mock_data(tmp_path, name, keys, supervised, capsys) -> None:
    tfds = pytest.importorskip("tensorflow_datasets")
    opts = ReadOptions(tfds_data_dir=str(tmp_path))
    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        builder = readers.tfds_builder(name, opts)
        said = f"building TFDS {name} once from the embedded corpus (nothing is downloaded)"
        assert said in capsys.readouterr().out
        assert builder.name == name and builder.builder_config.name == corpus.config_name()
        assert str(builder.info.version) == "1.0.0"
        assert builder.info.supervised_keys == supervised
        for split in SPLITS:
            examples = list(tfds.as_numpy(builder.as_dataset(split=split)))
            assert len(examples) == 4
            for ex in examples:
                assert set(ex) == keys
                if "label" in ex:
                    assert 0 <= ex["label"] < len(PACKAGES)
    if name == "stdlib_package":
        assert builder.info.features["label"].names == list(PACKAGES)


def test_tfds_stdlib_package_real_build(tmp_path, package_sets, monkeypatch) -> None:
    tfds = pytest.importorskip("tensorflow_datasets")
    from jaxlm.data.builtin import task_builders  # noqa: F401  (registers the builders)

    builder = tfds.builder("stdlib_package", data_dir=str(tmp_path))
    builder.download_and_prepare()
    for split in SPLITS:
        got = [
            {"code": ex["code"].decode(), "label": int(ex["label"]), "path": ex["path"].decode()}
            for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))
        ]
        want = [{k: ex[k] for k in ("code", "label", "path")} for ex in package_sets[split]]
        assert got == want, split

    # A second run that started the same build loses the race to rename it into place: it
    # reads what the first one prepared.
    opts = ReadOptions(tfds_data_dir=str(tmp_path))
    lost = [
        FileExistsError("Cannot rename ...: Destination ... already exists."),  # TFDS's check
        OSError(errno.ENOTEMPTY, "Directory not empty"),  # the rename right after it
    ]
    for error in lost + [PermissionError(errno.EACCES, "Permission denied")]:

        def prepare(self, *args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(type(builder), "download_and_prepare", prepare)
        if error in lost:
            again = readers.tfds_builder("stdlib_package", opts)
            assert again.info.splits["validation"].num_examples == len(package_sets["validation"])
        else:  # not a lost race: the error stands
            with pytest.raises(PermissionError):
                readers.tfds_builder("stdlib_package", opts)
    # The code_docstring generator yields code_tasks' examples in order, keyed by position.
    doc = tfds.builder("code_docstring", data_dir=str(tmp_path))
    generated = list(doc._generate_examples("validation"))
    assert [k for k, _ in generated] == list(range(len(generated)))
    assert [ex for _, ex in generated] == list(code_tasks.docstring_examples("validation"))
