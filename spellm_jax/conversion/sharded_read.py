"""Reading a teacher straight onto a device mesh: each host reads only the slices of each tensor
that its own devices hold (safetensors slices, or Orbax's sharded restore of a converted
directory), laid out by the rules table, so no host holds the whole model at any point.

The params come back as `jax.Array`s already on the mesh; building the student and the
teacher from a `Pretrained` holding them uses them as they are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from spellm_jax import sharding
from spellm_jax.checkpointing import restore_params
from spellm_jax.conversion import hf_dir, mapping
from spellm_jax.conversion.errors import ConversionError
from spellm_jax.models.config import ModelConfig
from spellm_jax.models.llama import LlamaForCausalLM
from spellm_jax.models.params import check_params, flatten


def canonical_shardings(config: ModelConfig, mesh: Mesh) -> dict[str, NamedSharding]:
    """Our flat key (one entry per layer) -> where the rules table puts that tensor on `mesh`."""
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    return {"/".join(str(p) for p in path): NamedSharding(
                mesh, sharding.logical_to_spec(sharding.logical_axes(variable)))
            for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@contextlib.contextmanager
def _safetensors_slices(path: Path) -> Iterator[dict[str, Any]]:
    """transformers name -> an open, lazily read slice of it, over an HF directory's files."""
    from safetensors import safe_open

    files = hf_dir.weight_files(path)
    if any(file.suffix != ".safetensors" for file in files):
        raise ConversionError(f"{path} stores its weights as PyTorch pickles, which cannot be "
                              "read in slices; save it with safetensors (`save_pretrained(..., "
                              "safe_serialization=True)`) to load it sharded.")
    with contextlib.ExitStack() as stack:
        slices = {}
        for file in files:
            handle = stack.enter_context(safe_open(str(file), framework="pt"))
            slices.update({name: handle.get_slice(name) for name in handle.keys()})  # noqa: SIM118
        yield slices


def read_hf_sharded(path: Path, config: ModelConfig, mesh: Mesh) -> dict[str, jax.Array]:
    """Canonical params of an HF safetensors directory, each host reading only its slices."""
    shardings = canonical_shardings(config, mesh)
    with _safetensors_slices(path) as slices:
        mapping.check_hf_names(config, slices, str(path))
        rules = mapping.conversion_rules(config)
        shapes = {rule.ours: jax.ShapeDtypeStruct(
            tuple(slices[rule.hf].get_shape())[::-1 if rule.transpose else 1], "float32")
            for rule in rules}
        check_params(mapping.expected_shapes(config), shapes, str(path))

        def reader(stored, transpose: bool):
            def read(index):  # our layout's index; a kernel is the transposed HF weight
                piece = hf_dir.torch_to_numpy(stored[index[::-1] if transpose else index])
                return piece.T if transpose else piece
            return read

        return {rule.ours: jax.make_array_from_callback(
                    shapes[rule.ours].shape, shardings[rule.ours],
                    reader(slices[rule.hf], rule.transpose))
                for rule in rules}


def read_orbax_sharded(params_dir: Path, config: ModelConfig, mesh: Mesh,
                       source: str) -> dict[str, jax.Array]:
    """Canonical params saved by `save_params`, restored by Orbax straight into their shards."""
    import orbax.checkpoint as ocp

    params_dir = Path(params_dir).absolute()
    stored = flatten(ocp.StandardCheckpointer().metadata(params_dir).item_metadata)
    shardings = canonical_shardings(config, mesh)
    check_params(mapping.expected_shapes(config), stored, source)
    return restore_params(params_dir, {
        key: jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype, sharding=shardings[key])
        for key, meta in stored.items()})
