"""What a training run is made of (its teacher, runtime options and train-step spec, from its
config) and reading a finished one: metadata, spelling table, and a trained SpeLLM from one of its
checkpoints (parameters only; no optimizer is built).

A run directory (`--workdir`) holds `spellm.json` (the config, teacher source and decoder
config), `spelling_table.json` and `checkpoints/N` (the state after N updates).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from spellm_jax.checkpointing import TrainCheckpoints
from spellm_jax.conversion.sources import Pretrained, load_source
from spellm_jax.conversion.spellm_files import has_spellm_parts
from spellm_jax.distill import DistillSpec, split_model
from spellm_jax.losses import LossConfig
from spellm_jax.models.char_decoders import HeadsConfig
from spellm_jax.models.config import ModelConfig
from spellm_jax.models.llama import LlamaForCausalLM, RuntimeOptions
from spellm_jax.models.params import model_params
from spellm_jax.paths import as_path
from spellm_jax.spelling import SPELLING_FILE, SpellingTable

TINY_TEACHER = "tiny_random"
METADATA_FILE = "spellm.json"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def runtime_options(config: ml_collections.ConfigDict) -> RuntimeOptions:
    """How a run's models compute (dtypes, scanned layers, remat, LoRA for `trainable=lora`)."""
    lora = config.train.trainable == "lora"
    return RuntimeOptions(dtype=DTYPES[config.model.dtype],
                          param_dtype=DTYPES[config.model.param_dtype],
                          scan_layers=config.model.scan_layers, remat=config.model.remat,
                          lora_rank=config.train.lora_rank if lora else 0,
                          lora_alpha=config.train.lora_alpha)


def distill_spec(config: ml_collections.ConfigDict) -> DistillSpec:
    """The static part of a run's train step: what trains, and the loss."""
    loss = config.loss  # a run recorded before `save_targets` or `paths` existed takes the default
    return DistillSpec(config.train.trainable, config.train.top_layers,
                       LossConfig(loss.soft_weight, loss.hard_weight, loss.temperature,
                                  loss.chunk_size, loss.get("save_targets", LossConfig.save_targets),
                                  loss.get("paths", LossConfig.paths)),
                       config.train.grad_accum)


def tiny_model_config(config: ml_collections.ConfigDict, vocab_size: int,
                      eos_token_ids: tuple[int, ...]) -> ModelConfig:
    """The architecture of `teacher=tiny_random`: `config.model.tiny` on a given vocabulary."""
    tiny = config.model.tiny
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size, num_layers=tiny.num_layers,
        num_heads=tiny.num_heads, num_kv_heads=tiny.num_kv_heads,
        head_dim=tiny.hidden_size // tiny.num_heads, tie_word_embeddings=True,
        eos_token_ids=eos_token_ids)


def load_teacher(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Pretrained:
    """The frozen teacher of a config: a pretrained source (read straight onto `mesh` where the
    source allows, see `read_source`), or a seeded random tiny model for tests
    (`teacher=tiny_random`, with the SmolLM2 tokenizer)."""
    if config.teacher != TINY_TEACHER:
        return load_source(config.teacher, mesh)
    from spellm_jax.tokenizers import load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    model_config = tiny_model_config(config, len(tokenizer), (tokenizer.eos_token_id,))
    model = LlamaForCausalLM(model_config, rngs=nnx.Rngs(config.seed))
    params = {k: np.asarray(v) for k, v in model_params(model).items()}
    return Pretrained(model_config, params, tokenizer, TINY_TEACHER)


def checkpoint_location(path: epath.Path) -> tuple[epath.Path, int | None]:
    """`(workdir, step or None for the latest)` of a workdir or a `workdir/checkpoints/N` dir."""
    if (path / METADATA_FILE).is_file():
        return path, None
    if path.parent.name == "checkpoints" and (path.parent.parent / METADATA_FILE).is_file():
        return path.parent.parent, int(path.name)
    raise FileNotFoundError(f"{path} is not a training workdir (with {METADATA_FILE}) or a "
                            "checkpoint directory inside one.")


def run_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The `spellm.json` of the run that `path` (a workdir or one of its checkpoints) belongs to."""
    workdir, _ = checkpoint_location(as_path(path))
    return json.loads((workdir / METADATA_FILE).read_text())


def run_spelling(workdir: epath.Path, metadata: dict[str, Any]) -> SpellingTable:
    """The run's spelling table, checked against the hash its metadata recorded."""
    spelling = SpellingTable.load(workdir / SPELLING_FILE)
    spelling.check_hash(metadata["spelling_table_hash"], str(workdir / METADATA_FILE))
    return spelling


def load_spellm(path: str | os.PathLike, teacher: Pretrained | None = None
                ) -> tuple[Any, Any, SpellingTable]:
    """`(model, tokenizer, spelling)` of a trained SpeLLM: a workdir (its latest checkpoint), one
    `workdir/checkpoints/N` directory, or an exported directory (`python -m spellm_jax.export`).

    A training checkpoint holds no teacher weights: the frozen parts are rebuilt from its
    recorded source (or `teacher`, when the caller has loaded it already), and only the trained
    parameters are read from the checkpoint.
    """
    from spellm_jax.pretrained import build_spellm, load_exported

    path = as_path(path)
    if has_spellm_parts(path):
        return load_exported(str(path))
    workdir, step = checkpoint_location(path)
    metadata = run_metadata(workdir)
    config = ml_collections.ConfigDict(metadata["config"])
    spelling = run_spelling(workdir, metadata)
    teacher = teacher or load_teacher(config)
    model = build_spellm(teacher, spelling, HeadsConfig(**metadata["heads_config"]),
                         runtime_options(config), seed=config.seed, prior_tokens=0)
    graphdef, params, rest = split_model(model, distill_spec(config))
    checkpoints = TrainCheckpoints(workdir, config.checkpoint.keep, config.checkpoint.save_every)
    step = checkpoints.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{workdir} has no checkpoint yet.")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            params)
    params = checkpoints.restore_params(step, abstract)
    checkpoints.close()
    return nnx.merge(graphdef, params, rest), teacher.tokenizer, spelling


@dataclasses.dataclass(frozen=True)
class InferenceModels:
    """A run's SpeLLM and its teacher (the LM head, rebuilt from the recorded source), both laid
    out for inference, with the tokenizer, spelling table and config they share."""

    spellm: nnx.Module
    teacher: nnx.Module
    tokenizer: Any
    spelling: SpellingTable
    config: ml_collections.ConfigDict


def load_for_inference(path: str | os.PathLike) -> InferenceModels:
    """SpeLLM and teacher of a workdir (its latest checkpoint) or one `workdir/checkpoints/N`,
    the teacher's weights read once for both."""
    from spellm_jax.models.llama import fused_for_inference
    from spellm_jax.pretrained import build_model

    config = ml_collections.ConfigDict(run_metadata(path)["config"])
    teacher = load_teacher(config)
    model, tokenizer, spelling = load_spellm(path, teacher=teacher)
    teacher_model = build_model(teacher.config, RuntimeOptions(), teacher.params, teacher.source)
    return InferenceModels(fused_for_inference(model), fused_for_inference(teacher_model),
                           tokenizer, spelling, config)
