"""The data layer's seams: the DataSpec config.data_spec builds, the table of source kinds, one
cache format on local and remote (ram://, as gs://) paths, and imports that point downward."""

from __future__ import annotations

import ast
import dataclasses
import json
import pathlib

import numpy as np
import pytest
from conftest import tiny_config

from jaxlm import config as config_lib
from jaxlm import storage
from jaxlm.data import cache_format, source, sources, specs, tokenizer
from jaxlm.data.builtin import corpus
from jaxlm.data.documents import prepare
from jaxlm.data.examples import source as examples
from jaxlm.data.types import DataError

DATA = pathlib.Path(config_lib.__file__).parent / "data"
pytest_plugins = ("remote_fs",)  # the ram_bucket fixture


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> tokenizer.Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "t.model"
    return tokenizer.train_tokenizer(corpus.read_split("train")[:40], path, vocab_size=400)


# --- DataSpec -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "objective,source,layout",
    [
        ("lm", "python_stdlib", "documents"),
        ("mlm", "python_stdlib", "documents"),
        ("span_corruption", "python_stdlib", "spans"),
        ("seq2seq", "jsonl:a.jsonl", "examples"),
        ("classify", "jsonl:a.jsonl", "examples"),
        ("seq2seq", "synthetic", "synthetic"),
        ("lm", "synthetic", "synthetic"),
    ],
)
def test_data_spec_layout_of_each_objective(objective, source, layout) -> None:
    c = tiny_config(source, objective)
    c.data.input_key, c.data.target_key = "x", "y"
    spec = config_lib.data_spec(c)
    assert spec.layout == layout and spec.objective == objective
    assert (spec.fields is not None) == (objective in config_lib.EXAMPLE_OBJECTIVES)
    assert set(config_lib.OBJECTIVE_LAYOUT) == set(config_lib.CHOICES["task.objective"])
    assert set(config_lib.OBJECTIVE_LAYOUT.values()) | {"synthetic"} == set(specs.LAYOUTS)


def test_data_spec_carries_every_setting_and_is_frozen() -> None:
    c = tiny_config("text:/d/*.txt@2,jsonl:/e.jsonl", "lm")
    c.data.cache_dir, c.data.tokenizer_sentinels, c.data.min_doc_chars = "gs://B/D", 3, 7
    c.data.eval_split, c.train.seed, c.data.seq_len = "test", 5, 48
    spec = config_lib.data_spec(c)
    assert spec.sources == (
        specs.SourceSpec("text", "/d/*.txt", 2.0),
        specs.SourceSpec("jsonl", "/e.jsonl", 1.0),
    )
    assert spec.cache_root == "gs://B/D" and spec.tokenizer.sentinels == 3
    assert spec.clean.min_chars == 7 and spec.read.eval_split == "test"
    assert (spec.seed, spec.seq_len, spec.batch_size) == (5, 48, c.data.batch_size)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 1  # type: ignore[misc]
    # train.init_from's tokenizer is resolved to a path here, not by the data layer.
    c.train.init_from = "gs://b/runs/pre:300"
    spec = config_lib.data_spec(c)
    assert spec.tokenizer.init_from == "gs://b/runs/pre/tokenizer.model"
    c.data.tokenizer = "/t.model"  # an explicit tokenizer wins
    assert config_lib.data_spec(c).tokenizer.init_from == ""


# --- source kinds ---------------------------------------------------------------------------


def test_every_source_kind_has_its_reader_and_cache_identity() -> None:
    opts = specs.ReadOptions()
    for name, kind in sources.KINDS.items():
        spec = specs.SourceSpec(name, "x/{split}.jsonl" if kind.takes_arg else "")
        assert isinstance(kind.identity(spec, opts), dict), name
        assert kind.reads in ("text", "cache", "generated"), name
        if kind.reads == "text":
            assert callable(kind.documents), f"source kind {name} has no documents reader"
        else:
            assert kind.documents is None and kind.examples is None, name
        assert name in kind.usage.split(" ")[0], name  # the usage names the kind
    assert sources.EXAMPLE_KINDS == ("tfds", "jsonl")
    # Every kind parses, and identities differ where the options shape the documents.
    assert sources.identity(specs.SourceSpec("text", "a/*.txt"), opts)["eval_fraction"] == 0.05
    assert "eval_fraction" not in sources.identity(specs.SourceSpec("text", "{split}/*"), opts)
    assert sources.identity(specs.SourceSpec("python_stdlib"), opts) == {
        "python": corpus.config_name()
    }


def test_every_layout_has_a_builder() -> None:
    assert set(source.BUILDERS) | {"synthetic"} == set(specs.LAYOUTS)


# --- one cache format, local or remote ------------------------------------------------------


def test_cache_root_keeps_remote_paths(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_format.root("gs://B/D/") == "gs://B/D"  # pathlib would give gs:/B/D
    assert storage.join(cache_format.root("gs://B/D"), "examples", "k") == "gs://B/D/examples/k"
    assert cache_format.root("") == str(tmp_path / ".cache" / "jaxlm")
    assert cache_format.root("~/c") == str(tmp_path / "c")
    assert cache_format.local_root("gs://B/D") == tmp_path / ".cache" / "jaxlm"
    assert cache_format.local_root("/x/c") == pathlib.Path("/x/c")


def _jsonl(directory: pathlib.Path, rows: dict[str, list[dict]]) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    for split, items in rows.items():
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    return f"jsonl:{directory}/{{split}}.jsonl"


def _assert_same_batches(a, b, steps=(0, 1, 5)) -> None:
    for step in steps:
        x, y = a.train_batch(step, 0, 1), b.train_batch(step, 0, 1)
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    for x, y in zip(a.eval_batches(0, 0, 1), b.eval_batches(0, 0, 1), strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_document_cache_on_a_remote_path(ram_bucket, tmp_path, tok, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # where remote caches are copied to
    docs = [{"text": f"def f{i}(x):\n    return x * {i}\n" * 3} for i in range(40)]
    c = tiny_config(_jsonl(tmp_path / "src", {"train": docs[:30], "validation": docs[30:]}))
    c.data.tokenizer, c.data.seq_len, c.data.batch_size = str(tok.path), 16, 4
    c.data.cache_dir = ram_bucket
    remote = source.build_source(config_lib.data_spec(c), tmp_path / "run", log=_quiet)
    directory = remote.description["sources"][0]["cache"]
    assert directory.startswith(f"{ram_bucket}/prepared/jsonl_")
    assert storage.exists(storage.join(directory, cache_format.MANIFEST))
    assert storage.glob(f"{directory}/train-*.tokens.npy")
    assert not pathlib.Path("ram:").exists()  # nothing written to a local look-alike path
    assert list((tmp_path / "home" / ".cache" / "jaxlm" / "mirror").iterdir())
    c.data.cache_dir = str(tmp_path / "local")
    local = source.build_source(config_lib.data_spec(c), tmp_path / "run", log=_quiet)
    assert pathlib.Path(local.description["sources"][0]["cache"]).name == directory.split("/")[-1]
    _assert_same_batches(remote, local)
    # A cache prepared into the bucket trains with data.source=prepared:ram://...
    out = f"{ram_bucket}/prepared_by_hand"
    spec = config_lib.data_spec(c)
    prepare.prepare_source(spec.sources[0], out, tok, spec.read, spec.clean, log=_quiet)
    c.data.source, c.data.tokenizer = f"prepared:{out}", ""
    by_hand = source.build_source(config_lib.data_spec(c), tmp_path / "run", log=_quiet)
    _assert_same_batches(by_hand, local)


def _pairs(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = "the cat sat on a mat while dogs ran far away".split()
    return [
        {"src": " ".join(rng.choice(words, 5)), "tgt": " ".join(rng.choice(words, 3))}
        for _ in range(n)
    ]


@pytest.mark.parametrize("objective", ["seq2seq", "classify"])
def test_example_cache_on_a_remote_path(ram_bucket, tmp_path, tok, monkeypatch, objective):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    rows = {"train": _pairs(24, 1), "validation": _pairs(9, 2)}
    for i, r in enumerate(rows["train"] + rows["validation"]):
        r["y"] = i % 2
    c = tiny_config(_jsonl(tmp_path / "src", rows), objective)
    c.data.input_key, c.data.target_key, c.data.label_key = "src", "tgt", "y"
    c.data.seq_len, c.data.target_len, c.data.batch_size = 12, 6, 4
    c.model.num_classes = 2 if objective == "classify" else 0
    c.data.cache_dir = ram_bucket
    remote = examples.ExampleData(config_lib.data_spec(c), tok, _quiet)
    assert remote.location.startswith(f"{ram_bucket}/examples/jsonl_")
    names = sorted(p.rsplit("/", 1)[1] for p in storage.glob(f"{remote.location}/*"))
    assert "manifest.json" in names and "validation.texts.jsonl" in names
    assert ("train.labels.npy" in names) == (objective == "classify")
    assert remote.describe()["cache"] == remote.location
    assert not pathlib.Path("ram:").exists()
    # Reused, not rebuilt: nothing is tokenized the second time.
    monkeypatch.setattr(tok, "encode_batch", lambda texts: pytest.fail("re-tokenized"))
    again = examples.ExampleData(config_lib.data_spec(c), tok, _quiet)
    monkeypatch.undo()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert again.location == remote.location
    c.data.cache_dir = str(tmp_path / "local")
    local = examples.ExampleData(config_lib.data_spec(c), tok, _quiet)
    assert local.location.rsplit("/", 1)[1] == remote.location.rsplit("/", 1)[1]  # one key
    _assert_same_batches(remote, local)
    assert remote.eval_examples(0)[3]["input"] == local.eval_examples(0)[3]["input"]


def test_both_caches_refuse_to_build_in_multi_process_jobs(tmp_path, tok, monkeypatch) -> None:
    import jax

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    c = tiny_config(_jsonl(tmp_path / "src", {"train": _pairs(8, 1), "validation": _pairs(4, 2)}))
    c.data.tokenizer, c.data.text_key, c.data.cache_dir = str(tok.path), "src", str(tmp_path)
    with pytest.raises(DataError, match="no cache of jsonl:.* in a multi-process job"):
        source.build_source(config_lib.data_spec(c), tmp_path / "run", log=_quiet)
    c.task.objective, c.data.input_key, c.data.target_key = "seq2seq", "src", "tgt"
    with pytest.raises(DataError, match="no example cache of jsonl:.* in a multi-process job"):
        source.build_source(config_lib.data_spec(c), tmp_path / "run", log=_quiet)


# --- imports point downward -----------------------------------------------------------------


def _imports(path: pathlib.Path) -> tuple[set[str], set[str]]:
    """(jaxlm modules imported at module level, those imported inside functions)."""
    top, inner = set(), set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxlm"):
            names = {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names = {a.name for a in node.names if a.name.startswith("jaxlm")}
        else:
            continue
        (top if node.col_offset == 0 else inner).update(names)
    return top, inner


def _module(path: pathlib.Path) -> str:
    rel = path.relative_to(DATA.parent.parent).with_suffix("")
    return ".".join(rel.parts).removesuffix(".__init__")


def test_data_imports_nothing_above_it_and_has_no_cycles() -> None:
    files = sorted(DATA.rglob("*.py"))
    modules = {_module(p) for p in files}
    graph, inner_all = {}, {}
    for path in files:
        top, inner = _imports(path)
        for name in top | inner:
            allowed = name.startswith(("jaxlm.data", "jaxlm.storage", "jaxlm.monitor"))
            assert allowed, f"{_module(path)} imports {name}: data/ must not import above it"
        # `from jaxlm.data import x` names module x; `from jaxlm.data.m import f` names m.
        graph[_module(path)] = {
            n if n in modules else n.rsplit(".", 1)[0] for n in top if n.startswith("jaxlm.data")
        } & modules
        inner_all[_module(path)] = inner
    # Imports inside functions only where TensorFlow must stay lazy: TFDS builder registration.
    lazy = {m: sorted(v) for m, v in inner_all.items() if v}
    assert lazy == {
        "jaxlm.data.readers": [
            "jaxlm.data.builtin.stdlib_builder",
            "jaxlm.data.builtin.task_builders",
        ]
    }
    seen, done = set(), set()

    def visit(m: str, chain: tuple) -> None:
        assert m not in seen or m in done, f"import cycle: {' -> '.join((*chain, m))}"
        if m in done:
            return
        seen.add(m)
        for dep in graph.get(m, ()):
            if dep != m and not m.startswith(dep + "."):  # a package's __init__ is not a cycle
                visit(dep, (*chain, m))
        done.add(m)

    for m in sorted(graph):
        visit(m, ())
