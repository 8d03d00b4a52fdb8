"""A small benchmark subset scored during training (`config.benchmark`), beside agreement.

The teacher is frozen, so its figures are computed once, at the first evaluation; the student
is scored at every one. Metrics are flat `{task}/{metric}` values (SpeLLM) and
`{task}/teacher_{metric}` (the teacher, logged once), ready for `metrics.jsonl` and TensorBoard.
"""

from __future__ import annotations

from typing import Any

from spellm_jax.benchmarks import metrics
from spellm_jax.benchmarks.runner import prepare_task, score_task
from spellm_jax.benchmarks.scoring import JaxBackend


class TrainingBenchmark:
    """The benchmark settings of a training config, with the tasks read and tokenized once."""

    def __init__(self, settings: Any, teacher_model, tokenizer):
        self.settings = settings
        self.teacher = JaxBackend.teacher(teacher_model)
        self.max_length = teacher_model.config.max_position_embeddings
        self.tasks = [prepare_task(name, tokenizer, settings.limit) for name in settings.tasks]
        self.teacher_values: list[dict] | None = None

    def _values(self, backend: JaxBackend) -> list[dict]:
        return [score_task(task, backend, self.settings.batch_size, self.max_length)
                for task in self.tasks]

    def __call__(self, student_model) -> dict[str, float]:
        """The SpeLLM's metrics (and, the first time, the teacher's) on the subset."""
        out = {}
        if self.teacher_values is None:
            self.teacher_values = self._values(self.teacher)
            for task, values in zip(self.tasks, self.teacher_values, strict=True):
                for name, metric in metrics.summary(values).items():
                    out[f"{task.spec.name}/teacher_{name}"] = metric["value"]
        student = self._values(JaxBackend.spellm(student_model))
        for task, values in zip(self.tasks, student, strict=True):
            for name, metric in metrics.summary(values).items():
                out[f"{task.spec.name}/{name}"] = metric["value"]
        return out
