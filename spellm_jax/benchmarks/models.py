"""The two models a benchmark compares, read from a finished run."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from flax import nnx

from spellm_jax.benchmarks.scoring import JaxBackend
from spellm_jax.spelling import SpellingTable


@dataclasses.dataclass(frozen=True)
class RunModels:
    """A run's teacher (its LM head) and SpeLLM, laid out for inference, with the tokenizer and
    spelling table they share; `beam`: the strings the SpeLLM's decoder searches per step."""

    teacher: nnx.Module
    spellm: nnx.Module
    tokenizer: Any
    spelling: SpellingTable
    beam: int = 1

    def backends(self) -> dict[str, JaxBackend]:
        """`{"teacher": ..., "spellm": ...}`: the teacher first, so gaps are SpeLLM - teacher."""
        return {"teacher": JaxBackend.teacher(self.teacher),
                "spellm": JaxBackend.spellm(self.spellm, self.beam)}

    @property
    def max_length(self) -> int:
        return self.teacher.config.max_position_embeddings


def load_run(source: str | Path, beam: int = 1) -> RunModels:
    """Teacher and SpeLLM of a training workdir (its latest checkpoint) or one
    `workdir/checkpoints/N` directory."""
    from spellm_jax.runs import load_for_inference

    models = load_for_inference(source)
    return RunModels(models.teacher, models.spellm, models.tokenizer, models.spelling, beam)
