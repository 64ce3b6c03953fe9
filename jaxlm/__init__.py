"""jaxlm: train Transformer language models with JAX and Flax NNX."""
