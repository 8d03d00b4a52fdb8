"""Benchmark tasks for several models side by side: the same documents, requests and code."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from spellm_jax.benchmarks import metrics
from spellm_jax.benchmarks.scoring import DEFAULT_BATCH, Backend, encode_pair, score_pairs
from spellm_jax.benchmarks.tasks import check_task_names, load_task, task_spec

DEFAULT_TASKS = ("lambada", "hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande")


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
    for task in tasks:
        spec = task_spec(task)
        items = load_task(task, limit, root)
        pairs = [encode_pair(tokenizer, context, continuation)
                 for item in items for context, continuation in item.requests]
        values, entry = {}, {"kind": spec.kind, "split": spec.split, "variant": spec.variant,
                             "documents": len(items), "requests": len(pairs),
                             "continuation_tokens": sum(len(p.continuation) for p in pairs),
                             "models": {}, "seconds": {}}
        for name, backend in backends.items():
            start = time.perf_counter()
            scores = score_pairs(backend, pairs, batch_size, max_length,
                                 progress=f"{task}: {name}" if progress else None)
            entry["seconds"][name] = time.perf_counter() - start
            values[name] = metrics.per_document(spec, items, scores, backend.modes)
            entry["models"][name] = metrics.summary(values[name])
        entry["gaps"] = {name: metrics.gaps(values[name], values[names[0]]) for name in names[1:]}
        results["tasks"][task] = entry
    return results
