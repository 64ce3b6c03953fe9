"""Device mesh, logical-axis rules, and the shardings of parameters, optimizer state and batches.

Model code names axes logically (`batch`, `length`, `embed`, `heads`, `kv_heads`, `kv`, `mlp`,
`vocab`); a rules table (config `mesh.rules`) maps each name to a mesh axis (`dcn`, `data`,
`fsdp`, `tensor`), a tuple of them, or None (replicated). Activations are constrained with
`constrain`, which is a no-op outside `use_rules`, so modules also run unsharded in tests and
notebooks.

The mesh is (dcn, data, fsdp, tensor). `dcn` is data parallelism across slices (granules joined by
the slower data-centre network); the other three axes lie inside a slice, on the fast
interconnect (ICI on TPU, NVLink on GPU). With one slice `dcn` has size 1 and changes nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("dcn", "data", "fsdp", "tensor")
BATCH_AXES = ("dcn", "data", "fsdp")

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("jaxlm_sharding", default=None)


class ShardingError(ValueError):
    """A mesh, batch or parameter shape that does not fit the devices; the message names the fix."""


def make_mesh(
    data: int, fsdp: int, tensor: int, devices: Sequence | None = None, dcn_data: int = 1
) -> Mesh:
    """A (dcn, data, fsdp, tensor) mesh over `devices` (default: all).

    `dcn_data` is the number of slices; data, fsdp and tensor lay out the devices of one slice,
    and one of them may be -1 to fill it.
    """
    devices = list(jax.devices() if devices is None else devices)
    if dcn_data < 1:
        raise ShardingError(f"mesh.dcn_data={dcn_data}: set it to the number of slices (>= 1)")
    slices = _slices(devices, dcn_data)
    per_slice = len(slices[0])
    where = "" if dcn_data == 1 else f" in each of the {dcn_data} slices (mesh.dcn_data)"
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
        raise ShardingError(
            f"mesh {sizes}: each axis must be a positive size, and at most one may be -1"
        )
    known = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if per_slice % known:
            raise ShardingError(
                f"mesh {sizes}: {per_slice} devices{where} are not divisible by the fixed axes "
                f"({known}); change mesh.* so their product divides {per_slice}"
            )
        sizes[fill[0]] = per_slice // known
    if math.prod(sizes.values()) != per_slice:
        raise ShardingError(
            f"mesh {sizes} needs {math.prod(sizes.values())} devices but {per_slice} "
            f"{'is' if per_slice == 1 else 'are'} present{where}; set one of "
            "mesh.data/fsdp/tensor to -1 to fill"
        )
    return Mesh(device_grid(devices, slices, [sizes[a] for a in MESH_AXES[1:]]), MESH_AXES)


def device_grid(devices: list, slices: list[list], ici: list[int]) -> np.ndarray:
    """[slices, *ici] devices; within a slice the library orders them by the physical network."""
    if len(slices) > 1 and len(_slice_ids(devices)) > 1:
        return mesh_utils.create_hybrid_device_mesh(
            [1, *ici], [len(slices), 1, 1, 1], devices, allow_split_physical_axes=True
        )
    return np.stack(
        [mesh_utils.create_device_mesh(ici, s, allow_split_physical_axes=True) for s in slices]
    )


def _slice_ids(devices: Sequence) -> set:
    """The slices the devices belong to; empty when they do not say (CPU, most GPUs)."""
    if not all(hasattr(d, "slice_index") for d in devices):
        return set()
    return {d.slice_index for d in devices}


def _slices(devices: list, dcn_data: int) -> list[list]:
    """The devices of each slice, in slice order.

    Devices that carry `slice_index` (TPU) are grouped by it, and there must be exactly
    `dcn_data` slices. Devices without it (CPU, most GPUs), or all in one slice, are split into
    `dcn_data` consecutive blocks in process order: the first mesh axis is the outer one, so on
    GPU clusters a block is a node (or several) and on CPU tests it is a simulated slice.
    """
    ids = _slice_ids(devices)
    if len(ids) > 1:
        if len(ids) != dcn_data:
            raise ShardingError(
                f"the {len(devices)} devices form {len(ids)} slices but "
                f"mesh.dcn_data={dcn_data}; set mesh.dcn_data={len(ids)}"
            )
        return [[d for d in devices if d.slice_index == i] for i in sorted(ids)]
    if len(devices) % dcn_data:
        raise ShardingError(
            f"mesh.dcn_data={dcn_data} does not divide the {len(devices)} devices; set "
            "mesh.dcn_data to the number of slices (a divisor of the device count)"
        )
    ordered = sorted(devices, key=lambda d: d.process_index) if dcn_data > 1 else devices
    n = len(devices) // dcn_data
    return [ordered[i * n : (i + 1) * n] for i in range(dcn_data)]


def mesh_from_config(mesh_config, devices: Sequence | None = None) -> Mesh:
    """The mesh a config's `mesh` section describes, with its rules checked against it."""
    mesh = make_mesh(
        mesh_config.data, mesh_config.fsdp, mesh_config.tensor, devices, mesh_config.dcn_data
    )
    check_rules(mesh, mesh_config.rules)
    return mesh


def check_rules(mesh: Mesh, rules) -> None:
    """Rules name only mesh axes, and with several slices the batch is split across them."""
    for name, target in rules:
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        unknown = [t for t in targets if t not in mesh.axis_names]
        if unknown:
            raise ShardingError(
                f"mesh.rules maps {name!r} to {unknown[0]!r}, which is not a mesh axis; "
                f"use one of {', '.join(mesh.axis_names)} or None"
            )
        if name == "batch" and targets and "dcn" not in targets and mesh.shape["dcn"] > 1:
            raise ShardingError(
                f"mesh.dcn_data={mesh.shape['dcn']} but mesh.rules maps 'batch' to {target!r}, "
                "so every slice would compute the same rows; add 'dcn' to it, "
                "e.g. ('dcn', 'data', 'fsdp')"
            )


def logical_to_spec(axes: Sequence[str | None], rules) -> PartitionSpec:
    """PartitionSpec for logical axis names; a mesh axis is used at most once per array."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in axes:
        target = table.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if n not in used)
        used.update(names)
        out.append(None if not names else names[0] if len(names) == 1 else names)
    return PartitionSpec(*out)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules):
    """Activate `mesh` and `rules` for `constrain` calls traced inside this block."""
    token = _ACTIVE.set((mesh, tuple(tuple(r) for r in rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names, when rules are active and the dims divide."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(axes, rules)
    if not _divides(x.shape, spec, mesh):
        return x  # e.g. a decode step of length 1: let XLA choose rather than fail
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _axis_size(mesh: Mesh, entry) -> int:
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else entry
    return math.prod(mesh.shape[n] for n in names)


def _divides(shape, spec: PartitionSpec, mesh: Mesh) -> bool:
    return all(dim % _axis_size(mesh, entry) == 0 for dim, entry in zip(shape, spec, strict=False))


def path_name(path) -> str:
    """'blocks/0/attn/query/kernel' for a jax key path (dict keys, list indices, attributes).

    The one way parameters are named to users: in errors, init_from and train.freeze patterns.
    """
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def param_shardings(abstract_params, axes_tree, mesh: Mesh, rules):
    """NamedSharding per parameter from its logical axes; a dim that does not divide is an error."""

    def one(path, leaf, axes):
        spec = logical_to_spec(axes, rules)
        for dim, entry, name in zip(leaf.shape, spec, axes, strict=False):
            size = _axis_size(mesh, entry)
            if dim % size:
                raise ShardingError(
                    f"parameter {path_name(path)} {tuple(leaf.shape)}: axis {name!r} of size {dim} "
                    f"does not divide over mesh axis {entry} of size {size}; change the model "
                    "dimension or the mesh (mesh.*) or map that axis to None in mesh.rules"
                )
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, abstract_params, axes_tree)


def state_shardings(abstract_tree, params_shardings, mesh: Mesh):
    """Shardings for a tree whose sub-trees mirror the parameters (optimizer moments).

    A leaf whose key path ends with a parameter's path and has that parameter's shape gets the
    parameter's sharding; anything else (step counters, scalars) is replicated.
    """
    by_path = {}
    for path, sh in jax.tree_util.tree_flatten_with_path(params_shardings)[0]:
        by_path[path_name(path)] = sh
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        name = path_name(path)
        for suffix, sh in by_path.items():
            if (name == suffix or name.endswith("/" + suffix)) and len(sh.spec) <= leaf.ndim:
                return sh
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract_tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are split over the dcn, data and fsdp axes and replicated over tensor."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def check_batch(batch_size: int, mesh: Mesh, microbatches: int = 1) -> None:
    shards = _axis_size(mesh, BATCH_AXES)
    per_micro = batch_size // microbatches
    if batch_size % microbatches or per_micro % shards:
        raise ShardingError(
            f"data.batch_size={batch_size} split into {microbatches} microbatch(es) does not "
            f"divide over the {shards} dcn*data*fsdp shards of the mesh; use a batch size that is "
            f"a multiple of {shards * microbatches}"
        )


def replicated_batch_rules(rules) -> tuple:
    """`rules` with the batch axis replicated: inference then takes any batch size on any mesh."""
    return tuple((name, None if name == "batch" else axes) for name, axes in rules)
