"""Embedded offline data: the stdlib corpus, its code tasks (TFDS builders) and synthetic data."""
