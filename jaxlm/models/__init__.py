"""Flax NNX model families."""
