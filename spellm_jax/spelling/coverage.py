"""How much of a vocabulary, and of the token occurrences in data, k symbols spell in full."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from spellm_jax.spelling.table import SpellingTable


def _occurrence_shares(lengths: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """`shares[k]`: the share of occurrences whose token is spelled in at most k symbols."""
    lengths, counts = np.asarray(lengths), np.asarray(counts)
    if lengths.shape != counts.shape or lengths.ndim != 1:
        raise ValueError(f"lengths {lengths.shape} and counts {counts.shape} must be equal 1-D shapes.")
    if (counts < 0).any():
        raise ValueError("counts must not be negative.")
    cumulative = np.cumsum(np.bincount(lengths, weights=counts.astype(np.float64)))
    if cumulative.size == 0 or cumulative[-1] <= 0:
        raise ValueError("counts hold no occurrences: nothing to measure coverage on.")
    return cumulative / cumulative[-1]


def choose_k(lengths: np.ndarray, counts: np.ndarray, target: float = 0.999) -> int:
    """The smallest k (>= 1) that spells at least `target` of the occurrences in full.

    `lengths[v]`: full spelling length of token v; `counts[v]`: its occurrences in the data.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target={target} must be a share in (0, 1].")
    shares = _occurrence_shares(lengths, counts)
    return max(1, int(np.argmax(shares >= target - 1e-12)))


def coverage(spelling: SpellingTable, ks: Sequence[int] = (8, 12, 16, 24),
             counts: np.ndarray | None = None) -> list[dict]:
    """Per k: the share of valid token types spelled in full (`type_coverage`), how many are
    truncated, and with `counts` ([vocab_size] corpus occurrences) the same for occurrences."""
    lengths = spelling.lengths[spelling.valid]
    shares = None
    if counts is not None:
        counts = np.asarray(counts)
        if counts.shape != (spelling.vocab_size,):
            raise ValueError(f"counts has shape {counts.shape}; expected ({spelling.vocab_size},).")
        counts = counts[spelling.valid]
        shares = _occurrence_shares(lengths, counts)
    rows = []
    for k in ks:
        truncated = lengths > k
        row = {"k": int(k), "type_coverage": float(1.0 - truncated.mean()),
               "truncated_types": int(truncated.sum()), "occurrence_coverage": None,
               "truncated_occurrences": None}
        if shares is not None:
            row["occurrence_coverage"] = float(shares[min(k, shares.size - 1)])
            row["truncated_occurrences"] = int(counts[truncated].sum())
        rows.append(row)
    return rows

def coverage_report(spelling: SpellingTable, ks: Sequence[int] = (8, 12, 16, 24),
                    counts: np.ndarray | None = None) -> str:
    """A markdown table of `coverage(spelling, ks, counts)` under a one-line summary of the vocabulary."""
    lines = [
        f"{spelling.kind} vocabulary: {spelling.vocab_size} rows, {int(spelling.valid.sum())} spellable, "
        f"{len(spelling.special_ids)} special, longest spelling {spelling.longest_spelling} symbols, "
        f"C = {spelling.num_symbols}, table k = {spelling.k}",
        "",
        "| k | token types spelled in full | truncated types | occurrences spelled in full |",
        "|---:|---:|---:|---:|",
    ]
    for row in coverage(spelling, ks, counts):
        occurrences = ("n/a" if row["occurrence_coverage"] is None
                       else f"{100 * row['occurrence_coverage']:.3f}%")
        lines.append(f"| {row['k']} | {100 * row['type_coverage']:.3f}% | {row['truncated_types']} "
                     f"| {occurrences} |")
    return "\n".join(lines)
