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
    spelling = model.spelling
    rows = model.choose(hidden, beam=beam)
    constrained = model.choose(hidden, constrained=True, beam=beam)
    return {"free_rows": rows, "free": spelling.lookup(rows), "vocab": spelling.lookup(constrained)}


@nnx.jit(static_argnames="beams")
def _predictions(model: SpeLLM, ids: jax.Array, beams: tuple[int, ...]) -> dict[str, jax.Array]:
    """Free and vocabulary-constrained next-token predictions `[N, T]` for each beam width, one
    row at a time (a row's `[T, V]` vocabulary scores, for the independent kind, would not fit
    for a batch)."""

    def one_row(row_ids):
        hidden = model.model(row_ids[None])[0][0]
        out = {}
        for beam in beams:
            choices = spelled_choices(model, hidden, beam)
            out |= {_agreement_key(mode, beam): choices[mode] for mode in ("free", "vocab")}
        return out

    return jax.lax.map(one_row, ids)


def _agreement_key(mode: str, beam: int) -> str:
    return f"{mode}_agreement" + ("" if beam == 1 else f"_beam{beam}")


def continuation_agreement(model: SpeLLM, sequences: np.ndarray, predicts_target: np.ndarray,
                           beams: Sequence[int] = ()) -> dict[str, float]:
    """Share of target positions where the SpeLLM's next token equals the sequence's next token,
    free and vocabulary-constrained, greedily and with each of `beams` (`free_agreement`,
    `vocab_agreement_beam4`, ...).

    `sequences` `[N, T]` are prompts followed by the teacher's greedy continuation;
    `predicts_target` marks the positions whose next token is a continuation token (as
    `continuation_rows` gives them).
    """
    widths = tuple(dict.fromkeys((1, *beams)))
    predictions = _predictions(model, jnp.asarray(sequences), widths)
    targets, mask = sequences[:, 1:], predicts_target[:, :-1].astype(bool)
    count = max(int(mask.sum()), 1)
    return {key: float(((np.asarray(tokens)[:, :-1] == targets) & mask).sum() / count)
            for key, tokens in predictions.items()} | {"positions": int(mask.sum())}
