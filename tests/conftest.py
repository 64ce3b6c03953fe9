"""Tests run on CPU with 8 fake devices, so sharding over data, fsdp and tensor is exercised."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxlm.config import base_config  # noqa: E402


def tiny_config(source: str = "synthetic"):
    """A small model derived from the base config; every dim divides a 2x2x2 mesh."""
    c = base_config()
    c.model.vocab_size = 64
    c.model.d_model = 32
    c.model.num_layers = 2
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.d_ff = 64
    c.model.max_len = 16
    c.model.dtype = "float32"  # exact comparisons (sharded vs one device, resume)
    c.data.source = source
    c.data.batch_size = 8
    c.data.seq_len = 16
    c.data.prefetch = 1
    c.optim.lr = 1e-2
    c.optim.warmup_steps = 2
    c.train.steps = 6
    c.train.log_every = 2
    c.train.eval_every = 0
    c.train.eval_steps = 2
    c.train.checkpoint_every = 3
    c.mesh.data = -1  # all 8 fake devices unless a test picks a layout
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    return c


@pytest.fixture
def config():
    return tiny_config()


@pytest.fixture
def one_device():
    return jax.devices()[:1]
