"""torch and transformers (the parity tests' references), imported on first use: every xdist
worker collects every test file, and importing them there cost 3.5 s a worker, also in workers
that never run a parity test."""

import importlib
import os
from types import ModuleType

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when transformers is imported: never download


class _OnFirstUse:
    """Stands for a module; the first attribute read imports it."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        if attr.startswith("_"):  # pytest's collection probing objects (a fixture marker, ...)
            raise AttributeError(attr)
        module: ModuleType = importlib.import_module(self._name)
        return getattr(module, attr)


torch = _OnFirstUse("torch")
transformers = _OnFirstUse("transformers")
