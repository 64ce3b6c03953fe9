"""Data layer. It takes a DataSpec (specs.py, built by jaxlm.config.data_spec), never a
ConfigDict, and imports nothing above it (no config, models, train, tasks or inference).

Shared: types (DataSource, DataError, special ids), specs (DataSpec and its parts), sources
(data.source parsed; the table of source kinds: readers and cache identity), readers (UTF-8,
globs, JSON lines, TFDS), clean, tokenizer, run_tokenizer (which tokenizer a run uses),
sampling (the (seed, step) order, process shares, eval batches with fill rows), cache_format
(manifest, cache key, chunking, writers: one format for both pipelines, local or gs://),
batches (one-example-per-row arrays), feed (batches placed on the mesh ahead of the step),
source (build_source: the DataSource of a spec's layout).

Pipelines: documents/ (lm, mlm, span corruption: read -> prepare -> rows -> text) and
examples/ (seq2seq, classify: read -> cache -> source); builtin/ holds the embedded offline
datasets (stdlib corpus, code tasks, synthetic data).
"""
