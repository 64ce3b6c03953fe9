"""Data layer.

readers (where documents come from) -> clean -> tokenizer -> prepare (tokenize into the cache)
-> cache (token shards, rows) -> pipeline (which rows at step s; model arrays) -> source (the
DataSource the trainer uses) -> feed (batches placed on the mesh ahead of the step). Labelled
examples: example_cache (read, clean, tokenize once) -> examples (their batches); spans builds
seq2seq and span-corruption rows. corpus, stdlib_builder, code_tasks and task_builders provide
the embedded corpus and tasks; storage handles local and gs:// paths; diagnostics backs
`jaxlm-data inspect` and `bench`.
"""
