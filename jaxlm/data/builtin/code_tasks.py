"""Two supervised tasks cut from the embedded stdlib corpus (pure Python and `ast`; no TF).

* docstring: a function's code without its docstring -> the docstring's first sentence.
* package: a function's code -> which stdlib package (a fixed PACKAGES tuple) it comes from.

Both use the corpus file split of the `python_stdlib` pretraining data (corpus.iter_split with
VALIDATION_PERCENT), so validation examples come only from files a pretrained model never saw.

Conventions shared by both tasks:

* One candidate per FunctionDef/AsyncFunctionDef, nested ones and methods included, in sorted
  file order, then source order within a file (outer before inner).
* `code` starts at the `def` line: decorators are left out (they are module context, and
  otherwise a snippet could begin with an arbitrary expression). It ends at the function's last
  statement (trailing comments dropped) and is dedented by the `def` line's own indentation.
  Only the function's own docstring is removed; nested functions keep theirs. A body that held
  only the docstring becomes `pass`.
* Skipped functions: a docstring that shares a line with other code (`def f(): "doc"`), and a
  docstring followed by another bare string (which would become the new docstring).
* Codes longer than MAX_CODE_CHARS are dropped, and exact duplicate codes are dropped per task:
  the first occurrence is kept, and validation also drops codes of any function in the train
  files (so validation never tests code a pretrained model saw; the `encodings` codecs, for
  instance, repeat the same methods in every file).
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import warnings
from collections.abc import Iterator
from typing import NamedTuple

from jaxlm.data.builtin import corpus

# The pretraining corpus's file split, so tasks match it.
VALIDATION_PERCENT = corpus.VALIDATION_PERCENT
MAX_CODE_CHARS = 2000
MAX_DOCSTRING_CHARS = 200
MIN_DOCSTRING_WORDS = 3

# Top-level stdlib packages to classify: the 8 with the most validation examples under the 5%
# file split (only 10 packages have any validation file at all). Examples per class on Python
# 3.11, train / validation, after filtering and dedup; lib2to3 and unittest fall short of 20
# validation examples (encodings, next, has 15), and unittest's all come from one file.
PACKAGES: tuple[str, ...] = (
    "asyncio",  # 903 / 21
    "distutils",  # 485 / 21
    "idlelib",  # 1143 / 82
    "importlib",  # 436 / 20
    "lib2to3",  # 341 / 17
    "multiprocessing",  # 580 / 31
    "tkinter",  # 917 / 28
    "unittest",  # 418 / 16
)

# Words ending in "." that do not end a sentence: "Pick a codec, e.g. utf-8." stays whole.
_ABBREVIATIONS = frozenset({"e.g.", "i.e.", "cf.", "vs.", "viz."})
_SENTENCE_END = re.compile(r"\. ")
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_FUNCTION_TYPES = (ast.FunctionDef, ast.AsyncFunctionDef)


class Function(NamedTuple):
    """A function's name, code (docstring removed, dedented) and cleaned docstring (or None)."""

    name: str
    code: str
    docstring: str | None


def first_sentence(docstring: str) -> str:
    """The first sentence of a docstring, whitespace collapsed, without its final period.

    The sentence ends at the first blank line or at the first ". " that does not follow an
    abbreviation in _ABBREVIATIONS; a docstring with neither is taken whole.
    """
    paragraph = _BLANK_LINE.split(inspect.cleandoc(docstring).strip(), maxsplit=1)[0]
    text = " ".join(paragraph.split())
    for match in _SENTENCE_END.finditer(text):
        word = text[: match.start() + 1].rsplit(" ", 1)[-1]
        if word.lower() not in _ABBREVIATIONS:
            text = text[: match.start() + 1]
            break
    # Drop one final period, consistently, but leave an ellipsis alone.
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1].rstrip()  # "label), ." must not leave a space behind
    return text


def _is_blank(data: bytes) -> bool:
    return not data.strip()


def _code_without_docstring(lines: list[str], node: ast.AST) -> str | None:
    """The function's dedented source minus its own docstring; None if it cannot be cut out."""
    start, end = node.lineno - 1, node.end_lineno
    body = node.body
    first = body[0]
    has_doc = (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    )
    out = list(lines[start:end])
    if has_doc:
        if len(body) > 1:
            second = body[1]
            if isinstance(second, ast.Expr) and isinstance(second.value, ast.Constant):
                if isinstance(second.value.value, str):
                    return None  # removing the docstring would promote this string
        # ast offsets are UTF-8 byte columns.
        head = lines[first.lineno - 1].encode("utf-8")
        tail = lines[first.end_lineno - 1].encode("utf-8")[first.end_col_offset :]
        if not _is_blank(head[: first.col_offset]):
            return None  # `def f(): "doc"` style: the docstring shares the def's line
        if not (_is_blank(tail) or tail.lstrip().startswith(b"#")):
            return None  # `"doc"; x = 1`: other code after it on the same line
        indent = head[: first.col_offset].decode("utf-8")
        replacement = [] if len(body) > 1 else [indent + "pass"]
        cut_end = first.end_lineno - start
        while cut_end < len(out) and not out[cut_end].strip():
            cut_end += 1  # the blank lines that set the docstring apart go with it
        out[first.lineno - 1 - start : cut_end] = replacement
    # Dedent by the def line's own indentation; lines inside multi-line strings that are less
    # indented are kept as they are (textwrap.dedent would then dedent nothing at all).
    prefix = lines[start][: len(lines[start]) - len(lines[start].lstrip())]
    dedented = []
    for line in out:
        if line.startswith(prefix):
            dedented.append(line[len(prefix) :])
        else:
            dedented.append("" if not line.strip() else line)
    return "\n".join(dedented).rstrip() + "\n"


def _function_nodes(tree: ast.Module) -> list[ast.AST]:
    """Every def in `tree`. A def is a statement, so only statement lists are searched:
    ast.walk would also visit every expression node, 4x the time on the stdlib."""
    found, pending = [], list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, _FUNCTION_TYPES):
            found.append(node)
        # Statement lists: bodies, else and finally blocks, except handlers and match cases.
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            value = getattr(node, field, None)
            if isinstance(value, list):
                pending.extend(value)
    return found


def functions(source: str) -> list[Function]:
    """Every function in `source`, in source order; [] if it does not parse."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escapes etc. in old stdlib code
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    # ast counts only \n (and \r\n) as line breaks; str.splitlines also breaks on form feeds.
    lines = [line.removesuffix("\r") for line in source.split("\n")]
    nodes = sorted(_function_nodes(tree), key=lambda n: (n.lineno, n.col_offset))
    out = []
    for node in nodes:
        code = _code_without_docstring(lines, node)
        if code is not None:
            out.append(Function(node.name, code, ast.get_docstring(node, clean=True)))
    return out


@functools.lru_cache(maxsize=4)
def _split_functions(split: str, stdlib: str) -> tuple[tuple[str, tuple[Function, ...]], ...]:
    """(path, functions) of every file of a split; cached since both tasks parse the same files.

    `stdlib` is only part of the cache key (a different interpreter has different files).
    """
    del stdlib
    return tuple(
        (rel, tuple(functions(text))) for rel, text in corpus.iter_split(split, VALIDATION_PERCENT)
    )


def _files(split: str) -> tuple[tuple[str, tuple[Function, ...]], ...]:
    if split not in ("train", "validation"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'validation'")
    return _split_functions(split, str(corpus.stdlib_root()))


def package_of(path: str) -> str | None:
    """The top-level package of a stdlib relative path, or None for a top-level module."""
    head, slash, _ = path.partition("/")
    return head if slash else None


def _docstring_candidates(split: str) -> Iterator[dict]:
    for rel, funcs in _files(split):
        for f in funcs:
            if f.docstring is None or len(f.code) > MAX_CODE_CHARS:
                continue
            sentence = first_sentence(f.docstring)
            if len(sentence.split()) < MIN_DOCSTRING_WORDS or len(sentence) > MAX_DOCSTRING_CHARS:
                continue
            yield {"code": f.code, "docstring": sentence, "name": f.name, "path": rel}


def _package_candidates(split: str) -> Iterator[dict]:
    for rel, funcs in _files(split):
        package = package_of(rel)
        if package not in PACKAGES:
            continue
        for f in funcs:
            if len(f.code) <= MAX_CODE_CHARS:
                label = PACKAGES.index(package)
                yield {"code": f.code, "label": label, "package": package, "path": rel}


def _deduplicated(candidates, split: str) -> Iterator[dict]:
    """Drop repeated codes; validation also drops any function code of the train files."""
    seen = set()
    if split == "validation":  # the pretrained model saw every train file, not just examples
        seen = {f.code for _, funcs in _files("train") for f in funcs}
    for ex in candidates(split):
        if ex["code"] not in seen:
            seen.add(ex["code"])
            yield ex


def docstring_examples(split: str) -> Iterator[dict]:
    """{"code", "docstring", "name", "path"} of the split's documented functions."""
    return _deduplicated(_docstring_candidates, split)


def package_examples(split: str) -> Iterator[dict]:
    """{"code", "label", "package", "path"} of the split's functions in PACKAGES."""
    return _deduplicated(_package_candidates, split)
