"""A bucket in memory for tests of remote caches: `ram://` paths through etils epath's
TensorFlow backend (tf.io.gfile), the backend gs:// paths use when TensorFlow is installed.

epath knows gs://, s3://, az:// and hf:// only; the fixture registers ram:// beside them for
the test's duration, so jaxlm.storage handles it exactly like a gs:// path.
"""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture
def ram_bucket(monkeypatch) -> str:
    """A fresh ram://... directory of its own for each test."""
    pytest.importorskip("tensorflow")
    from etils.epath import backend, gpath, register

    monkeypatch.setattr(gpath, "_URI_PREFIXES", (*gpath._URI_PREFIXES, "ram://"))
    monkeypatch.setattr(gpath, "_URI_SCHEMES", gpath._URI_SCHEMES | {"ram"})
    monkeypatch.setitem(gpath._URI_MAP_ROOT, "ram://", "/ram/")
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "ram", backend.tf_backend)
    monkeypatch.setitem(register._URI_PREFIXES_TO_CLS, "ram://", gpath.PosixGPath)
    # Each test gets its own bucket; the in-memory filesystem ends with the test process (its
    # rmtree and walk do not handle the nested paths it holds, so nothing is removed here).
    return f"ram://bucket-{uuid.uuid4().hex[:8]}"
