"""Data layer: embedded corpus, tokenizer, TFDS builder and step-addressable batches."""
