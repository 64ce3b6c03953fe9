"""Sharded training equals one device; shardings follow the rules; misfits are clear errors."""

import jax
import numpy as np
import pytest
from conftest import tiny_config
from jax.sharding import PartitionSpec as P

from jaxlm import sharding, train
from jaxlm.config import DEFAULT_RULES


def losses_after(config, devices, tmp_path, steps: int = 3) -> list[float]:
    s = train.setup(config, tmp_path, devices)
    state = train.create_state(s)
    step_fn = train.make_train_step(s)
    out = []
    with sharding.use_rules(s.mesh, config.mesh.rules):
        for i in range(steps):
            state, metrics = step_fn(
                state, train.to_device(s.data.train_batch(i), s.batch_sharding)
            )
            out.append(float(metrics["loss"]))
    return out


@pytest.mark.parametrize("mesh", [(8, 1, 1), (1, 8, 1), (2, 2, 2)])
def test_sharded_equals_one_device(mesh, tmp_path):
    c = tiny_config()
    ref = losses_after(c, jax.devices()[:1], tmp_path / "one")
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    got = losses_after(c, None, tmp_path / "many")
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert got[-1] < got[0]


def test_every_leaf_has_the_sharding_the_rules_say(tmp_path):
    c = tiny_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    s = train.setup(c, tmp_path)
    state = train.create_state(s)
    q = state["params"]["blocks"][0]["attn"]["query"]["kernel"]
    assert q.sharding.spec == P("fsdp", "tensor", None)
    assert state["params"]["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    assert state["params"]["blocks"][1]["mlp"]["down"]["kernel"].sharding.spec == P(
        "tensor", "fsdp"
    )
    _, axes = train.abstract_model(s.model_cfg)[1:]
    flat_axes = dict(
        (sharding.path_name(p), a)
        for p, a in jax.tree_util.tree_flatten_with_path(
            axes, is_leaf=lambda x: isinstance(x, tuple)
        )[0]
    )
    for path, leaf in jax.tree_util.tree_flatten_with_path(state["params"])[0]:
        name = sharding.path_name(path)
        assert leaf.sharding.spec == sharding.logical_to_spec(flat_axes[name], DEFAULT_RULES), name
        # The parameter really is split: each device holds 1/(product of its mesh axes).
        shard = leaf.addressable_shards[0].data
        assert (
            shard.size * np.prod([leaf.shape[i] // shard.shape[i] for i in range(leaf.ndim)])
            == leaf.size
        )
    mu = state["opt_state"][1][0].mu
    for path, leaf in jax.tree_util.tree_flatten_with_path(mu)[0]:
        name = sharding.path_name(path)
        assert leaf.sharding.spec == sharding.logical_to_spec(flat_axes[name], DEFAULT_RULES), name
    assert state["opt_state"][1][0].count.sharding.spec == P()


def test_mesh_fill_and_errors():
    assert dict(sharding.make_mesh(-1, 2, 1).shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    with pytest.raises(sharding.ShardingError, match="needs 4 devices but 8"):
        sharding.make_mesh(2, 2, 1)
    with pytest.raises(sharding.ShardingError, match="at most one may be -1"):
        sharding.make_mesh(-1, -1, 1)
    with pytest.raises(sharding.ShardingError, match="not divisible"):
        sharding.make_mesh(-1, 3, 1)


def test_batch_not_divisible_is_a_clear_error(tmp_path):
    c = tiny_config()
    c.mesh.data = 8
    c.data.batch_size = 12
    with pytest.raises(sharding.ShardingError, match="multiple of 8"):
        train.setup(c, tmp_path)


def test_model_dim_not_divisible_is_a_clear_error(tmp_path):
    c = tiny_config()
    c.mesh.data, c.mesh.tensor = 1, 8
    with pytest.raises(
        sharding.ShardingError,
        match="parameter blocks.0.attn.key.kernel .* axis 'kv_heads' of size 2 does not divide",
    ):
        train.setup(c, tmp_path)


def test_logical_to_spec_uses_each_mesh_axis_once():
    rules = (("a", "fsdp"), ("b", "fsdp"), ("c", ("data", "fsdp")))
    assert sharding.logical_to_spec(("a", "b"), rules) == P("fsdp", None)
    assert sharding.logical_to_spec(("c", None), rules) == P(("data", "fsdp"), None)
    assert sharding.logical_to_spec(("unknown",), rules) == P(None)
