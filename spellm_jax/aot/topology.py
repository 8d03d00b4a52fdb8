"""Compile-only TPU devices of a slice, described by libtpu on a host that has no TPU."""

from __future__ import annotations

import os

import jax

from spellm_jax.aot.slices import TpuSliceShape
from spellm_jax.errors import ConfigError

LIBTPU_HINT = ("install libtpu, the TPU compiler jax 0.10.2 pins (`pip install -e .[tpu-compile]`, "
               "about 210 MB); it compiles for TPUs without one")


def libtpu_available() -> bool:
    """Whether libtpu (the TPU compiler) is installed."""
    from jax._src import cloud_tpu_init

    return cloud_tpu_init.get_tpu_library_path() is not None


def compile_only_devices(shape: TpuSliceShape) -> list[jax.Device]:
    """The slice's devices (one per chip), for lowering and compiling programs only."""
    if not libtpu_available():
        raise ConfigError(f"compiling for {shape.accelerator_type} needs libtpu: {LIBTPU_HINT}.")
    from jax.experimental import topologies

    # Off a TPU VM libtpu cannot look its slice up; these quiet its warnings about that.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", shape.accelerator_type)
    # No chip is opened, so compiles in several processes at once need not exclude each other.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    topology = topologies.get_topology_desc(
        platform="tpu", topology_name=shape.topology_name, chip_config_name=shape.family.chip_config,
        chips_per_host_bounds=shape.chips_per_host_bounds, num_slices=1)
    devices = list(topology.devices)
    if len(devices) != shape.chips:
        raise RuntimeError(f"libtpu described {shape.topology_name} with {len(devices)} devices, "
                           f"expected {shape.chips} (one per chip).")
    return devices
