"""Benchmark tasks for several models side by side: the same documents, requests and code."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spellm_jax.benchmarks import metrics
from spellm_jax.benchmarks.scoring import DEFAULT_BATCH, Backend, Pair, encode_pair, score_pairs
from spellm_jax.benchmarks.tasks import Item, TaskSpec, check_task_names, load_task, task_spec

DEFAULT_TASKS = ("lambada", "hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande")


@dataclasses.dataclass(frozen=True)
class PreparedTask:
    """A task's documents and their tokenized requests, in order."""

    spec: TaskSpec
    items: list[Item]
    pairs: list[Pair]


def prepare_task(name: str, tokenizer: Any, limit: int | None = None, root: Path | None = None
                 ) -> PreparedTask:
    items = load_task(name, limit, root)
    pairs = [encode_pair(tokenizer, context, continuation)
             for item in items for context, continuation in item.requests]
    return PreparedTask(task_spec(name), items, pairs)


def score_task(task: PreparedTask, backend: Backend, batch_size: int = DEFAULT_BATCH,
               max_length: int = 2048, progress: str | None = None) -> dict[str, np.ndarray]:
    """Per-document values of one model on a task (see `metrics.per_document`)."""
    scores = score_pairs(backend, task.pairs, batch_size, max_length, progress)
    return metrics.per_document(task.spec, task.items, scores, backend.modes)


def run_tasks(backends: Mapping[str, Backend], tokenizer: Any, tasks: Sequence[str] = DEFAULT_TASKS,
              limit: int | None = None, batch_size: int = DEFAULT_BATCH, max_length: int = 2048,
              root: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Every task scored by every backend (the first is the reference of the gaps), JSON-ready:
    per task the documents scored, each model's metrics with standard errors, each later
    model's gap to the first, and each model's scoring time."""
    tasks = check_task_names(tasks)
    names = list(backends)
    results: dict[str, Any] = {"models": names, "limit": limit, "batch_size": batch_size,
                               "tasks": {}}
    for name in tasks:
        task = prepare_task(name, tokenizer, limit, root)
        values, entry = {}, {"kind": task.spec.kind, "split": task.spec.split,
                             "variant": task.spec.variant, "documents": len(task.items),
                             "requests": len(task.pairs),
                             "continuation_tokens": sum(len(p.continuation) for p in task.pairs),
                             "models": {}, "seconds": {}}
        for model, backend in backends.items():
            start = time.perf_counter()
            values[model] = score_task(task, backend, batch_size, max_length,
                                       f"{name}: {model}" if progress else None)
            entry["seconds"][model] = time.perf_counter() - start
            entry["models"][model] = metrics.summary(values[model])
        entry["gaps"] = {model: metrics.gaps(values[model], values[names[0]]) for model in names[1:]}
        results["tasks"][name] = entry
    return results
