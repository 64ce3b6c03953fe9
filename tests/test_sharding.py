"""Sharded training equals one device; shardings follow the rules; misfits are clear errors."""

import dataclasses

import jax
import numpy as np
import pytest
from conftest import losses_after, tiny_config
from jax.sharding import PartitionSpec as P

from jaxlm import sharding, train
from jaxlm.config import DEFAULT_RULES
from jaxlm.state import abstract_model


@pytest.fixture(scope="module")
def one_device_losses(tmp_path_factory) -> list[float]:
    return losses_after(tiny_config(), jax.devices()[:1], tmp_path_factory.mktemp("one"))


# (dcn_data, data, fsdp, tensor); dcn_data=2 splits the 8 CPU devices into two simulated slices.
@pytest.mark.parametrize("mesh", [(1, 8, 1, 1), (1, 1, 8, 1), (1, 2, 2, 2), (2, 1, 2, 2)])
def test_sharded_equals_one_device(mesh, one_device_losses, tmp_path):
    c = tiny_config()
    c.mesh.dcn_data, c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    got = losses_after(c, None, tmp_path)
    np.testing.assert_allclose(got, one_device_losses, rtol=1e-5)
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
    _, axes = abstract_model(s.model_cfg)[1:]
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
    assert dict(sharding.make_mesh(-1, 2, 1).shape) == {
        "dcn": 1,
        "data": 4,
        "fsdp": 2,
        "tensor": 1,
    }
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
        match="parameter blocks/0/attn/key/kernel .* axis 'kv_heads' of size 2 does not divide",
    ):
        train.setup(c, tmp_path)


def test_logical_to_spec_uses_each_mesh_axis_once():
    rules = (("a", "fsdp"), ("b", "fsdp"), ("c", ("data", "fsdp")))
    assert sharding.logical_to_spec(("a", "b"), rules) == P("fsdp", None)
    assert sharding.logical_to_spec(("c", None), rules) == P(("data", "fsdp"), None)
    assert sharding.logical_to_spec(("unknown",), rules) == P(None)


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """What the mesh code reads from a device; TPU devices also carry `slice_index`."""

    id: int
    slice_index: int
    process_index: int = 0
    platform: str = "cpu"
    device_kind: str = "cpu"


def test_dcn_mesh_puts_each_slice_in_one_block():
    mesh = sharding.make_mesh(1, 2, 2, dcn_data=2)
    assert mesh.axis_names == ("dcn", "data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"dcn": 2, "data": 1, "fsdp": 2, "tensor": 2}
    # CPU devices have no slice_index: the slices are consecutive blocks of jax.devices().
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    assert sorted(ids[0].ravel()) == [0, 1, 2, 3] and sorted(ids[1].ravel()) == [4, 5, 6, 7]
    assert dict(sharding.make_mesh(-1, 1, 2, dcn_data=4).shape)["data"] == 1
    # Devices that carry slice_index are grouped by it, whatever their order in the list.
    fake = [FakeDevice(i, slice_index=i % 2) for i in range(8)]
    grid = sharding.device_grid(fake, sharding._slices(fake, 2), [2, 2, 1])
    assert grid.shape == (2, 2, 2, 1)
    assert {d.slice_index for d in grid[0].ravel()} == {0}
    assert {d.slice_index for d in grid[1].ravel()} == {1}


def test_dcn_mesh_that_does_not_fit_is_a_clear_error(tmp_path):
    with pytest.raises(sharding.ShardingError, match="mesh.dcn_data=3 does not divide the 8"):
        sharding.make_mesh(-1, 1, 1, dcn_data=3)
    with pytest.raises(sharding.ShardingError, match="needs 8 devices but 4 are present in each"):
        sharding.make_mesh(2, 4, 1, dcn_data=2)
    with pytest.raises(sharding.ShardingError, match="set it to the number of slices"):
        sharding.make_mesh(-1, 1, 1, dcn_data=0)
    fake = [FakeDevice(i, slice_index=i // 2) for i in range(8)]
    with pytest.raises(sharding.ShardingError, match="form 4 slices but mesh.dcn_data=2; set"):
        sharding.make_mesh(-1, 1, 1, fake, dcn_data=2)
    c = tiny_config()
    c.mesh.dcn_data = 2
    c.mesh.rules = tuple((n, ("data", "fsdp") if n == "batch" else a) for n, a in DEFAULT_RULES)
    with pytest.raises(sharding.ShardingError, match="add 'dcn' to it"):
        train.setup(c, tmp_path)
    c.mesh.rules = tuple((n, "fdsp" if n == "embed" else a) for n, a in DEFAULT_RULES)
    with pytest.raises(sharding.ShardingError, match="'fdsp', which is not a mesh axis"):
        train.setup(c, tmp_path)
