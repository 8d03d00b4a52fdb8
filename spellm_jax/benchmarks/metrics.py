"""Task metrics from scored requests, as lm-evaluation-harness defines them, with standard errors.

Multiple choice: `acc` is 1 where the gold choice has the highest summed log-likelihood; `acc_norm`
where it has the highest log-likelihood per character of the choice (`Item.norm_lengths`).
Last word (LAMBADA): `acc` is 1 where every continuation token is the model's greedy choice (for
each greedy mode of the model), `perplexity` is `exp(-mean log-likelihood)` over documents and
`bits_per_byte` is `-Σ log-likelihood / (ln 2 · Σ UTF-8 bytes of the continuations)`.

Standard errors: of a mean over documents, `std(ddof=1) / sqrt(n)`; of the gap between two
models, the same over the per-document differences (the documents are shared, so it is paired);
of perplexity and bits per byte (and their gaps), a bootstrap over documents with a fixed seed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from spellm_jax.benchmarks.scoring import Scores
from spellm_jax.benchmarks.tasks import Item, TaskSpec

BOOTSTRAP_SAMPLES = 1000


def mean_stderr(values: np.ndarray) -> float:
    """Standard error of the mean of per-document values."""
    n = len(values)
    return float(np.std(values, ddof=1) / np.sqrt(n)) if n > 1 else float("nan")


def _bootstrap_stderr(statistic: Callable[[np.ndarray], float], n: int, seed: int = 0) -> float:
    """Standard deviation of `statistic(document indices)` over bootstrap resamples."""
    if n < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    values = [statistic(rng.integers(0, n, n)) for _ in range(BOOTSTRAP_SAMPLES)]
    return float(np.std(values, ddof=1))


def per_document(spec: TaskSpec, items: Sequence[Item], scores: Scores, modes: Sequence[str]
                 ) -> dict[str, np.ndarray]:
    """Per-document values `[n]` of a task for one model. `scores` hold the items' requests in
    order. Last word: `acc` is the first greedy mode, `acc_<mode>` the others."""
    if spec.kind == "last_word":
        values = {"log_likelihood": scores.log_prob,
                  "bytes": np.array([len(item.requests[0][1].encode()) for item in items], float),
                  "acc": scores.greedy[modes[0]].astype(float)}
        for mode in modes[1:]:
            values[f"acc_{mode}"] = scores.greedy[mode].astype(float)
        return values
    offsets = np.cumsum([0] + [len(item.requests) for item in items])
    acc, acc_norm = np.zeros(len(items)), np.zeros(len(items))
    for n, item in enumerate(items):
        lls = scores.log_prob[offsets[n]:offsets[n + 1]]
        acc[n] = np.argmax(lls) == item.gold
        acc_norm[n] = np.argmax(lls / np.asarray(item.norm_lengths, float)) == item.gold
    return {"acc": acc, "acc_norm": acc_norm} if spec.acc_norm else {"acc": acc}


def _perplexity(values: Mapping[str, np.ndarray], index: np.ndarray) -> float:
    return float(np.exp(-values["log_likelihood"][index].mean()))


def _bits_per_byte(values: Mapping[str, np.ndarray], index: np.ndarray) -> float:
    return float(-values["log_likelihood"][index].sum() / np.log(2) / values["bytes"][index].sum())


CORPUS_STATISTICS = {"perplexity": _perplexity, "bits_per_byte": _bits_per_byte}


def summary(values: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """`{metric: {"value", "stderr"}}` of one model's per-document values."""
    out = {}
    for name, column in values.items():
        if name.startswith("acc"):
            out[name] = {"value": float(column.mean()), "stderr": mean_stderr(column)}
    if "log_likelihood" in values:
        n = len(values["log_likelihood"])
        everything = np.arange(n)
        for name, statistic in CORPUS_STATISTICS.items():
            out[name] = {"value": statistic(values, everything),
                         "stderr": _bootstrap_stderr(lambda i, s=statistic: s(values, i), n)}
    return out


def reference_metric(name: str, reference: Mapping[str, object]) -> str:
    """The metric of the `reference` model's metrics that `name` is compared with: the same one
    where it has it, else its `acc` (LAMBADA's `acc_free` against the teacher's only accuracy)."""
    return name if name in reference else "acc"


def gaps(values: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
         ) -> dict[str, dict[str, float]]:
    """`{metric: {"value", "stderr"}}` of `model - reference` on the same documents (paired)."""
    out = {}
    for name, column in values.items():
        if name.startswith("acc"):
            difference = column - reference[reference_metric(name, reference)]
            out[name] = {"value": float(difference.mean()), "stderr": mean_stderr(difference)}
    if "log_likelihood" in values:
        n = len(values["log_likelihood"])
        for name, statistic in CORPUS_STATISTICS.items():
            def gap(index, s=statistic):
                return s(values, index) - s(reference, index)

            out[name] = {"value": gap(np.arange(n)), "stderr": _bootstrap_stderr(gap, n)}
    return out
