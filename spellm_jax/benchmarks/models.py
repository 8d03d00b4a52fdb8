"""The two models a benchmark compares, read from a finished run."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from flax import nnx

from spellm_jax.benchmarks.scoring import JaxBackend
from spellm_jax.charset import SpellingTable


@dataclasses.dataclass(frozen=True)
class RunModels:
    """A run's teacher (its LM head, rebuilt from the recorded source) and its SpeLLM, both laid
    out for inference, with the tokenizer they share."""

    teacher: nnx.Module
    spellm: nnx.Module
    tokenizer: Any
    spelling: SpellingTable
    source: str

    def backends(self) -> dict[str, JaxBackend]:
        """`{"teacher": ..., "spellm": ...}`: the teacher first, so gaps are SpeLLM - teacher."""
        return {"teacher": JaxBackend.teacher(self.teacher), "spellm": JaxBackend.spellm(self.spellm)}

    @property
    def max_length(self) -> int:
        return self.teacher.config.max_position_embeddings


def load_run(source: str | Path) -> RunModels:
    """Teacher and SpeLLM of a training workdir (its latest checkpoint) or one
    `workdir/checkpoints/N` directory."""
    import ml_collections

    from spellm_jax.models.llama import RuntimeOptions, fused_for_inference
    from spellm_jax.pretrained import build_model
    from spellm_jax.trainer import load_spellm, load_teacher, run_metadata

    config = ml_collections.ConfigDict(run_metadata(source)["config"])
    teacher = load_teacher(config)
    spellm, tokenizer, spelling = load_spellm(source, teacher=teacher)
    teacher_model = build_model(teacher.config, RuntimeOptions(), teacher.params, teacher.source)
    return RunModels(fused_for_inference(teacher_model), fused_for_inference(spellm), tokenizer,
                     spelling, str(source))
