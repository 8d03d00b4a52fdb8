"""Logical axis names on parameters, the rules that map them to mesh axes, and the mesh itself.

This is the only module that reads or writes variable metadata: models create parameters with
`param(...)` and name every dimension; training asks for `NamedSharding`s through `shardings_of`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
LOGICAL_AXES_KEY = "logical_axes"

# logical axis -> mesh axis (or axes); None means replicated.
LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "vocab": "tensor",
    "char_head": None,
    "char_vocab": None,
    "char_state": None,
    "char_shortlist": None,
    "layers": None,
    "norm": None,
    "lora_rank": None,
    "length": None,
}



def stacked_metadata(axis: str) -> dict:
    """`transform_metadata` for nnx.vmap that stacks modules: prepends the logical axis `axis`."""
    return {nnx.PARTITION_NAME: axis, LOGICAL_AXES_KEY: axis}


STACKED_LAYERS_METADATA = stacked_metadata("layers")  # blocks stacked for `scan_layers`
STACKED_HEADS_METADATA = stacked_metadata("char_head")  # one adapter per character head

Initializer = Callable[[jax.Array, Sequence[int], jax.typing.DTypeLike], jax.Array]


def param(
    key: jax.Array,
    init: Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype: jax.typing.DTypeLike,
) -> nnx.Param:
    """A parameter whose every dimension carries a logical axis name."""
    if len(axes) != len(shape):
        raise ValueError(f"{len(axes)} logical axes {tuple(axes)} for a shape {tuple(shape)}.")
    return nnx.Param(init(key, tuple(shape), dtype), **{LOGICAL_AXES_KEY: tuple(axes)})


def logical_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names of a variable's dimensions (None if it has none)."""
    return variable.get_metadata().get(LOGICAL_AXES_KEY)


def like(variable: nnx.Param, value: jax.Array) -> nnx.Param:
    """A new parameter holding `value`, with `variable`'s logical axes and other metadata."""
    return nnx.Param(value, **variable.get_metadata())


def transposed(variable: nnx.Param, order: Sequence[int]) -> nnx.Param:
    """A new parameter holding `variable`'s value with its dimensions, and their logical axis
    names, put in `order`."""
    metadata = dict(variable.get_metadata())
    if metadata.get(LOGICAL_AXES_KEY) is not None:
        metadata[LOGICAL_AXES_KEY] = tuple(metadata[LOGICAL_AXES_KEY][i] for i in order)
    return nnx.Param(jnp.transpose(variable[...], order), **metadata)


def logical_to_spec(
    axes: Sequence[str | None],
    rules: dict[str, str | tuple[str, ...] | None] | None = None,
) -> PartitionSpec:
    """PartitionSpec of a tensor whose dimensions have these logical names."""
    rules = LOGICAL_AXIS_RULES if rules is None else rules
    spec, used = [], set()
    for name in axes:
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule; add it to the rules table.")
        mesh_axes = None if name is None else rules[name]
        as_tuple = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        # A mesh axis may shard only one dimension of a tensor.
        as_tuple = tuple(a for a in as_tuple if a not in used)
        used.update(as_tuple)
        spec.append(None if not as_tuple else as_tuple[0] if len(as_tuple) == 1 else as_tuple)
    return PartitionSpec(*spec)


def partition_specs(tree, rules=None):
    """PartitionSpecs for every variable of an NNX state/module (scalars and unnamed: replicated)."""

    def spec_of(variable):
        axes = logical_axes(variable) if isinstance(variable, nnx.Variable) else None
        return PartitionSpec() if axes is None else logical_to_spec(axes, rules)

    return jax.tree.map(spec_of, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shardings_of(tree, mesh: Mesh, rules=None):
    """NamedShardings for every variable of an NNX state, laid out on `mesh`."""
    specs = partition_specs(tree, rules)
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
    """The ("data", "fsdp", "tensor") shape with -1 filled in; refuses shapes that do not fit."""
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {tuple(shape)} must have {len(MESH_AXES)} entries {MESH_AXES}.")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {tuple(shape)}: sizes must be positive, at most one may be -1.")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if num_devices % known:
            raise ValueError(
                f"mesh shape {tuple(shape)} cannot use {num_devices} devices: "
                f"{num_devices} is not a multiple of {known}.")
        shape[shape.index(-1)] = num_devices // known
    if int(np.prod(shape)) != num_devices:
        raise ValueError(
            f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices but "
            f"{num_devices} are available; make the product of the mesh axes equal it.")
    return tuple(shape)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh; one entry may be -1 (all remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh(resolve_mesh_shape(shape, len(devices)), MESH_AXES,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
