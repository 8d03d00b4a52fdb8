"""Agreement of a SpeLLM with its teacher on teacher-forced sequences."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spellm_jax.models.spellm import SpeLLM


def continuation_rows(prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                      pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompt + continuation rows (right-padded) and the mask of positions predicting a
    continuation token."""
    length = max(len(p) + len(c) for p, c in zip(prompts, continuations, strict=True))
    rows = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for row, (prompt, continuation) in enumerate(zip(prompts, continuations, strict=True)):
        rows[row, :len(prompt) + len(continuation)] = [*prompt, *continuation]
        mask[row, len(prompt) - 1:len(prompt) + len(continuation) - 1] = True
    return rows, mask


def spelled_choices(model: SpeLLM, hidden: jax.Array, beam: int = 1) -> dict[str, jax.Array]:
    """The SpeLLM's greedy next-token choices from the hidden states `[T, d]` of one row (the
    best of `beam` strings where the decoder searches): the free rows and their tokens, and the
    vocabulary-constrained token."""
    decoder, spelling = model.char_heads, model.spelling
    rows = decoder.choose(hidden, spelling, beam=beam)
    constrained = decoder.choose(hidden, spelling, constrained=True, beam=beam)
    return {"free_rows": rows, "free": spelling.lookup(rows), "vocab": spelling.lookup(constrained)}


@nnx.jit
def _predictions(model: SpeLLM, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Free and vocabulary-constrained next-token predictions `[N, T]`, one row at a time (a
    row's `[T, V]` vocabulary scores, for the independent kind, would not fit for a batch)."""

    def one_row(row_ids):
        choices = spelled_choices(model, model.model(row_ids[None])[0][0])
        return choices["free"], choices["vocab"]

    return jax.lax.map(one_row, ids)


def continuation_agreement(model: SpeLLM, sequences: np.ndarray, predicts_target: np.ndarray
                           ) -> dict[str, float]:
    """Share of target positions where the SpeLLM's next token equals the sequence's next token.

    `sequences` `[N, T]` are prompts followed by the teacher's greedy continuation;
    `predicts_target` marks the positions whose next token is a continuation token (as
    `continuation_rows` gives them).
    """
    free, constrained = (np.asarray(x) for x in _predictions(model, jnp.asarray(sequences)))
    targets, mask = sequences[:, 1:], predicts_target[:, :-1].astype(bool)
    count = max(int(mask.sum()), 1)
    return {"free_agreement": float(((free[:, :-1] == targets) & mask).sum() / count),
            "vocab_agreement": float(((constrained[:, :-1] == targets) & mask).sum() / count),
            "positions": int(mask.sum())}
