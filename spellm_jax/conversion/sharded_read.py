"""Reading a teacher straight onto a device mesh: each host reads only the slices of each tensor
that its own devices hold (safetensors rows, or Orbax's sharded restore of a converted
directory; local or `gs://`), laid out by the rules table, so no host holds the whole model.

The params come back as `jax.Array`s already on the mesh; building the student and the
teacher from a `Pretrained` holding them uses them as they are.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from spellm_jax import sharding
from spellm_jax.checkpointing import restore_params
from spellm_jax.conversion import hf_dir, mapping, safetensors_file
from spellm_jax.conversion.errors import ConversionError
from spellm_jax.models.config import ModelConfig
from spellm_jax.models.llama import LlamaForCausalLM
from spellm_jax.models.params import check_params, flatten
from spellm_jax.paths import as_path


def canonical_shardings(config: ModelConfig, mesh: Mesh) -> dict[str, NamedSharding]:
    """Our flat key (one entry per layer) -> where the rules table puts that tensor on `mesh`."""
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    return {"/".join(str(p) for p in path): NamedSharding(
                mesh, sharding.logical_to_spec(sharding.logical_axes(variable)))
            for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def read_hf_sharded(path, config: ModelConfig, mesh: Mesh) -> dict[str, jax.Array]:
    """Canonical params of an HF safetensors directory (local or `gs://`), each host reading
    only the rows of each tensor that its devices' slices span."""
    files = hf_dir.weight_files(path)
    if any(file.suffix != ".safetensors" for file in files):
        raise ConversionError(f"{path} stores its weights as PyTorch pickles, which cannot be "
                              "read in slices; save it with safetensors (`save_pretrained(..., "
                              "safe_serialization=True)`) to load it sharded.")
    stored = {name: tensor for file in files
              for name, tensor in safetensors_file.tensors_in(file).items()}
    mapping.check_hf_names(config, stored, str(path))
    rules = mapping.conversion_rules(config)
    shapes = {rule.ours: jax.ShapeDtypeStruct(
        stored[rule.hf].shape[::-1 if rule.transpose else 1], stored[rule.hf].dtype)
        for rule in rules}
    check_params(mapping.expected_shapes(config), shapes, str(path))

    def reader(tensor: safetensors_file.StoredTensor, transpose: bool):
        def read(index):  # our layout's index; a kernel is the transposed HF weight. A copy
            piece = tensor[index[::-1]].T if transpose else tensor[index]  # of just the slice:
            return np.ascontiguousarray(piece)  # the rows read for it are freed at once

        return read

    shardings = canonical_shardings(config, mesh)
    return {rule.ours: jax.make_array_from_callback(
                shapes[rule.ours].shape, shardings[rule.ours],
                reader(stored[rule.hf], rule.transpose))
            for rule in rules}


def read_orbax_sharded(params_dir, config: ModelConfig, mesh: Mesh,
                       source: str) -> dict[str, jax.Array]:
    """Canonical params saved by `save_params`, restored by Orbax straight into their shards."""
    import orbax.checkpoint as ocp

    params_dir = as_path(params_dir)
    stored = flatten(ocp.StandardCheckpointer().metadata(params_dir).item_metadata)
    shardings = canonical_shardings(config, mesh)
    check_params(mapping.expected_shapes(config), stored, source)
    return restore_params(params_dir, {
        key: jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype, sharding=shardings[key])
        for key, meta in stored.items()})
