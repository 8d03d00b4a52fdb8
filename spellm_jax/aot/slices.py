"""Cloud TPU slice names (`v4-8`, `v5litepod-16`, ...): chips, hosts, the topology JAX compiles
for, and each generation's public per-chip figures. Standard library only: the launcher reads it
on a laptop without JAX."""

from __future__ import annotations

import dataclasses
import math

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Family:
    """A TPU generation: how its accelerator-type suffix maps to chips and hosts, and one chip."""

    cores_per_chip: int  # the suffix counts TensorCores (2 per chip) or chips (1)
    max_single_host_chips: int  # slices up to this many chips run on one host
    chips_per_host: int  # chips on each host of a larger (multi-host) slice
    runtime_version: str  # the default TPU VM software version
    topology_prefix: str  # the generation as `get_topology_desc` names it
    torus_dims: int  # 3 (v4, v5p) or 2 (v5e, v6e)
    chip_config: str  # "megacore": one JAX device per chip of two TensorCores
    hbm_bytes: int
    peak_bf16_flops: float  # per chip, per second
    hbm_bytes_per_s: float


# The single source of slice shapes: v4-8 = 4 chips = 1 host, v4-32 = 4 hosts; v5litepod-8 =
# 1 host of 8 chips, v5litepod-16 = 4 hosts of 4 chips; v5p like v4; v6e like v5litepod.
# Chip figures are Google's published per-chip HBM, bf16 peak and HBM bandwidth.
FAMILIES: dict[str, Family] = {
    "v4": Family(2, 4, 4, "tpu-ubuntu2204-base", "v4", 3, "megacore", 32 * GIB, 275e12, 1.2e12),
    "v5litepod": Family(1, 8, 4, "v2-alpha-tpuv5-lite", "v5e", 2, "default", 16 * GIB, 197e12,
                        819e9),
    "v5p": Family(2, 4, 4, "v2-alpha-tpuv5", "v5p", 3, "megacore", 95 * GIB, 459e12, 2.765e12),
    "v6e": Family(1, 8, 4, "v2-alpha-tpuv6e", "v6e", 2, "default", 32 * GIB, 918e12, 1.64e12),
}
# Generation names as `get_topology_desc` writes them, for `--topology=v5e:4x4`.
_TOPOLOGY_FAMILIES = {family.topology_prefix: name for name, family in FAMILIES.items()}


@dataclasses.dataclass(frozen=True)
class TpuSliceShape:
    """One slice: `accelerator_type` as gcloud spells it, its family, chips and hosts."""

    accelerator_type: str
    family: Family
    chips: int

    @property
    def num_hosts(self) -> int:
        family = self.family
        return 1 if self.chips <= family.max_single_host_chips else self.chips // family.chips_per_host

    @property
    def torus(self) -> tuple[int, ...]:
        """Chips along each torus axis: v4-8 (4 chips) is 2x2x1, v5litepod-16 is 4x4."""
        exponent = self.chips.bit_length() - 1
        if self.family.torus_dims == 2:
            return (1 << exponent // 2, 1 << (exponent - exponent // 2))
        if exponent == 2:
            return (2, 2, 1)
        base, extra = divmod(exponent, 3)
        return tuple(1 << (base + (axis >= 3 - extra)) for axis in range(3))

    @property
    def topology_name(self) -> str:
        return f"{self.family.topology_prefix}:{'x'.join(map(str, self.torus))}"

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        """The torus block one host holds (the whole slice when it has one host)."""
        return (*self.torus, 1)[:3] if self.num_hosts == 1 else (2, 2, 1)


def named_slice(name: str) -> TpuSliceShape:
    """The slice of a gcloud accelerator type (`v4-8`) or a topology name (`v5e:4x4`)."""
    return _from_topology(name) if ":" in name else slice_shape(name)


def slice_shape(accelerator_type: str) -> TpuSliceShape:
    """The slice of a gcloud accelerator type: `v4-8`, `v5litepod-16`, `v5p-32`, `v6e-8`."""
    name, _, size = accelerator_type.partition("-")
    family = FAMILIES.get(name)
    if family and size.isdigit() and int(size) > 0 and int(size) % family.cores_per_chip == 0:
        chips = int(size) // family.cores_per_chip
        fits_hosts = chips <= family.max_single_host_chips or chips % family.chips_per_host == 0
        if fits_hosts and chips & (chips - 1) == 0 and (family.torus_dims == 2 or chips >= 4):
            return TpuSliceShape(accelerator_type, family, chips)
    raise ValueError(f"unsupported accelerator type {accelerator_type!r}; supported families: "
                     f"{', '.join(f'{name}-N' for name in FAMILIES)} with a power-of-two "
                     "number of chips (e.g. v4-8, v5litepod-16).")


def _from_topology(topology: str) -> TpuSliceShape:
    prefix, _, dims = topology.partition(":")
    name = _TOPOLOGY_FAMILIES.get(prefix)
    try:
        chips = [int(d) for d in dims.split("x")]
    except ValueError:
        chips = []
    if name is None or len(chips) != FAMILIES[name].torus_dims or min(chips, default=0) < 1:
        raise ValueError(f"unsupported topology {topology!r}; write GENERATION:AxB (v5e, v6e) or "
                         "GENERATION:AxBxC (v4, v5p), e.g. v5e:4x4 or v4:2x2x1.")
    count = math.prod(chips)
    shape = slice_shape(f"{name}-{count * FAMILIES[name].cores_per_chip}")
    if shape.torus != tuple(chips):
        raise ValueError(f"topology {topology!r}: this table lays {count} chips out as "
                         f"{shape.topology_name}; use that name.")
    return shape
