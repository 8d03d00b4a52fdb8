"""`python -m spellm_jax.train --compile_only --topology=SLICE`: a config's real train step,
lowered from abstract shapes (no weights, no data) with the config's mesh and sharding rules onto
a TPU slice's devices, compiled by libtpu, and measured: per-device bytes against the chip's HBM,
FLOPs and bytes accessed, and a step time at the chip's peak."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from spellm_jax import sharding
from spellm_jax.aot.architectures import teacher_architecture
from spellm_jax.aot.flops import step_flops
from spellm_jax.aot.slices import GIB, TpuSliceShape, named_slice
from spellm_jax.aot.topology import compile_only_devices
from spellm_jax.distill import split_model
from spellm_jax.errors import ConfigError
from spellm_jax.models.char_decoders import HeadsConfig
from spellm_jax.models.config import ModelConfig
from spellm_jax.models.spellm import SpeLLM
from spellm_jax.runs import distill_spec, runtime_options
from spellm_jax.trainer import heads_config, jit_train_step, optimizer_for, validate

FIXES = ("shard the parameters over more chips (a bigger fsdp axis, e.g. "
         "--config.mesh.shape='(1,-1,1)'), recompute activations (--config.model.remat=full), "
         "use a smaller --config.train.batch_size or more --config.train.grad_accum, or "
         "--config.loss.save_targets=False")


class StepDoesNotFit(ConfigError):
    """The train step needs more memory per device than the chip's HBM."""


@dataclasses.dataclass
class AbstractRun:
    """A config's train step and its arguments as shapes with shardings, on a mesh."""

    mesh: jax.sharding.Mesh
    step_fn: Any
    args: tuple  # (state, teacher_params, rest, batch), every leaf a ShapeDtypeStruct
    shardings: tuple  # the NamedShardings of `args` (the batch's included)
    architecture: ModelConfig
    heads: HeadsConfig


@dataclasses.dataclass
class StepCompilation:
    """What the compiled step costs on one device of the slice."""

    slice: TpuSliceShape
    run: AbstractRun
    parts: dict[str, int]  # per-device bytes by part: the arguments, new outputs, code
    temp_bytes: int | None  # XLA's temporaries (activations); None when it refused the program
    flops: float | None  # XLA's, per device and step (each loop body counted once)
    bytes_accessed: float | None  # likewise
    tokens_per_step: int
    model_flops: float  # the whole step's, counted from the architecture (`aot.flops`)
    compiler_message: str = ""
    compiled: Any = None  # the TPU executable; None when XLA refused it for memory

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        return tuple(self.run.mesh.devices.shape)

    @property
    def total_bytes(self) -> int | None:
        """Every part (all arguments are on the device, read or not) plus the temporaries."""
        return None if self.temp_bytes is None else sum(self.parts.values()) + self.temp_bytes

    @property
    def hbm_bytes(self) -> int:
        return self.slice.family.hbm_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes is not None and self.total_bytes <= self.hbm_bytes

    @property
    def step_seconds(self) -> float | None:
        """A lower bound on the step: each chip's share of the model FLOPs at peak FLOP/s, or
        XLA's bytes at HBM bandwidth, whichever takes longer."""
        if self.bytes_accessed is None:
            return None
        return max(self._compute_seconds, self.bytes_accessed / self.slice.family.hbm_bytes_per_s)

    @property
    def _compute_seconds(self) -> float:
        return self.model_flops / self.slice.chips / self.slice.family.peak_bf16_flops

    @property
    def bound(self) -> str:
        return "compute" if self._compute_seconds >= self.step_seconds else "memory"

    def table(self) -> str:
        """The per-device memory and cost table, in markdown."""
        rows = [(name, _gib(value)) for name, value in self.parts.items()]
        rows.append(("activations and temporaries (XLA)", _gib(self.temp_bytes)))
        rows.append(("**total**", _gib(self.total_bytes)))
        rows.append((f"HBM of one {self.slice.family.topology_prefix} chip", _gib(self.hbm_bytes)))
        lines = [f"train step on {self.slice.accelerator_type} ({self.slice.topology_name}, "
                 f"{self.slice.chips} chips), mesh (data, fsdp, tensor) = {self.mesh_shape}: "
                 + ("fits" if self.fits else "DOES NOT FIT"), "",
                 "| per device | GiB |", "| --- | ---: |"]
        lines += [f"| {name} | {value} |" for name, value in rows]
        if self.step_seconds is not None:
            tokens = self.tokens_per_step / self.step_seconds / self.slice.chips
            lines += ["", f"model FLOPs per chip and step: {self.model_flops / self.slice.chips:.3e}"
                          f"; XLA's cost analysis (each loop body once): {self.flops:.3e} FLOPs, "
                          f"{self.bytes_accessed:.3e} bytes accessed",
                      f"estimated step time at the chip's peak: {self.step_seconds * 1e3:.1f} ms "
                      f"({self.bound}-bound), {tokens:,.0f} tokens/s per chip (upper bounds)"]
        if self.compiler_message:
            lines += ["", f"XLA: {self.compiler_message}"]
        return "\n".join(lines)


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.3f}"


def per_device_bytes(tree, shardings) -> int:
    """Bytes one device holds of `tree` laid out by `shardings` (the most any device holds)."""
    leaves, layouts = jax.tree.leaves(tree), jax.tree.leaves(shardings)
    if len(leaves) != len(layouts):
        raise ValueError(f"{len(leaves)} arrays but {len(layouts)} shardings.")
    return sum(int(np.prod(layout.shard_shape(leaf.shape))) * jnp.dtype(leaf.dtype).itemsize
               for leaf, layout in zip(leaves, layouts, strict=True))


def abstract_run(config: ml_collections.ConfigDict, devices: list[jax.Device]) -> AbstractRun:
    """The train step of `config` and its abstract arguments on a mesh of `devices`."""
    validate(config, len(devices), len({device.process_index for device in devices}))
    if not config.heads.k:
        raise ConfigError("heads.k=0 picks k from the training data, which a compile-only run "
                          "does not read; set --config.heads.k= (the presets use 16).")
    architecture = teacher_architecture(config)
    heads = heads_config(config, config.heads.k, architecture.num_symbols)
    options = runtime_options(config)
    model = nnx.eval_shape(lambda: SpeLLM(architecture.config, heads, options,
                                          rngs=nnx.Rngs(config.seed)))
    spec = distill_spec(config)
    graphdef, params, rest = split_model(model, spec)
    tx = optimizer_for(config, type(model.char_heads))
    opt_state = jax.eval_shape(tx.init, params)
    mesh = sharding.make_mesh(config.mesh.shape, devices)
    params_layout = sharding.shardings_of(params, mesh)
    rest_layout = sharding.shardings_of(rest, mesh)
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params, "opt_state": opt_state}
    state_layout = {"step": NamedSharding(mesh, PartitionSpec()), "params": params_layout,
                    "opt_state": sharding.shardings_of(opt_state, mesh)}
    step_fn, batch_layout = jit_train_step(graphdef, tx, spec, mesh, state_layout, params_layout,
                                           rest_layout)
    shape = (config.train.batch_size, config.train.seq_len)
    batch = {"input_ids": jax.ShapeDtypeStruct(shape, jnp.int32),
             "loss_mask": jax.ShapeDtypeStruct(shape, jnp.bool_)}
    return AbstractRun(mesh, step_fn, (state, params, rest, batch),
                       (state_layout, params_layout, rest_layout,
                        {"input_ids": batch_layout, "loss_mask": batch_layout}),
                       architecture.config, heads)


def compile_train_step(config: ml_collections.ConfigDict, shape: TpuSliceShape | str
                       ) -> StepCompilation:
    """Compiles `config`'s train step for a slice (or its name: `v5litepod-16`, `v5e:4x4`)."""
    shape = named_slice(shape) if isinstance(shape, str) else shape
    run = abstract_run(config, compile_only_devices(shape))
    state, teacher_params, rest, batch = run.args
    state_layout, params_layout, rest_layout, batch_layout = run.shardings
    parts = {"trained parameters": per_device_bytes(state["params"], state_layout["params"]),
             "optimizer state": per_device_bytes(state["opt_state"], state_layout["opt_state"]),
             "the teacher's copy of the trained parameters": per_device_bytes(teacher_params,
                                                                               params_layout),
             "frozen parameters and spelling tables": per_device_bytes(rest, rest_layout),
             "batch": per_device_bytes(batch, batch_layout)}
    lowered = run.step_fn.lower(*run.args)
    tokens = config.train.batch_size * config.train.seq_len
    model_flops = step_flops(config, run.architecture, run.heads)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        message = " ".join(str(error).split())[:600]
        return StepCompilation(shape, run, parts, None, None, None, tokens, model_flops, message)
    memory = compiled.memory_analysis()
    parts["new outputs (not written over the donated state)"] = max(
        memory.output_size_in_bytes - memory.alias_size_in_bytes, 0)
    parts["program code"] = memory.generated_code_size_in_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return StepCompilation(shape, run, parts, int(memory.temp_size_in_bytes), float(cost["flops"]),
                           float(cost["bytes accessed"]), tokens, model_flops, compiled=compiled)

def check(config: ml_collections.ConfigDict, shape: TpuSliceShape | str) -> StepCompilation:
    """`compile_train_step`, printed; a step that does not fit is refused with its numbers."""
    compilation = compile_train_step(config, shape)
    if not compilation.fits:
        raise StepDoesNotFit(f"{compilation.table()}\n\nTo fit, {FIXES}.")
    print(compilation.table())
    return compilation
