"""The import structure: layers point downward (import-linter's contracts in setup.cfg), and no
import hides inside a function except for the reasons listed here."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (file, function) -> why the import waits for the call. Anything else imports at the top, so
# a cycle cannot hide in a function.
DEFERRED = {
    # Command-line programs parse flags (and answer --help) before importing JAX and the library.
    **{(f"jaxlm/cli/{f.stem}.py", "*"): "start-up" for f in (ROOT / "jaxlm/cli").glob("*.py")},
    ("jaxlm/train.py", "_decode_metrics"): "sacrebleu, only for runs that decode",
    ("jaxlm/data/readers.py", "tfds_builder"): "TensorFlow Datasets builder classes",
}


def function_level_imports() -> list[tuple[str, str, str]]:
    """(file, function, module) of every jaxlm import inside a function."""
    out = []
    for path in sorted((ROOT / "jaxlm").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxlm"):
                    out.append((rel, fn.name, node.module))
                elif isinstance(node, ast.Import):
                    out += [
                        (rel, fn.name, a.name) for a in node.names if a.name.startswith("jaxlm")
                    ]
    return out


def test_no_import_hides_in_a_function():
    hidden = [
        f"{f}:{fn} imports {m}"
        for f, fn, m in function_level_imports()
        if (f, fn) not in DEFERRED and (f, "*") not in DEFERRED
    ]
    assert hidden == [], "import these at the top of the module (or say why in DEFERRED)"


def test_import_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    r = subprocess.run(
        [str(lint), "--no-cache", "setup.cfg"], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in r.stdout
