"""The training run's view of data: `build_source(spec, workdir)` gives the DataSource (batches
addressed by step, for any process, and eval batches) of a DataSpec's layout.

Every text source is tokenized once into its cache (cache_format.py) and training reads that
cache with numpy random access, so TensorFlow is needed only while a cache is being built.
Batches are numpy dicts (documents: documents.rows.BATCH_KEYS; other layouts: their own);
`train_batch(step)` returns this process's rows of the global batch at `step`, a pure function
of (seed, step, data spec).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from jaxlm import monitor
from jaxlm.data import run_tokenizer
from jaxlm.data.builtin import synthetic
from jaxlm.data.documents import span_corruption, text
from jaxlm.data.examples import source as examples
from jaxlm.data.specs import DataSpec
from jaxlm.data.types import DataSource

# layout -> (spec, tokenizer, log) -> (DataSource, what the run reads, for data.json).
BUILDERS = {
    "documents": text.build,
    "spans": span_corruption.build,
    "examples": examples.build,
}


def build_source(
    spec: DataSpec, workdir: str | Path, log: Callable[[str], None] = monitor.console
) -> DataSource:
    """The DataSource of the spec; text layouts resolve the run's tokenizer into the workdir."""
    if spec.layout == "synthetic":
        return synthetic.build(spec)
    tok = run_tokenizer.load_tokenizer(spec, Path(workdir), log)
    data, described = BUILDERS[spec.layout](spec, tok, log)
    # Not written here: the eval program builds sources too, maybe over other data.
    return dataclasses.replace(data, description=described)
