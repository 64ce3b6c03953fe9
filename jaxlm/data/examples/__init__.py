"""Labelled examples (seq2seq, classify): read, clean and tokenize into the cache, batch rows."""
