"""Agreement of a SpeLLM with its teacher on teacher-forced sequences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spellm_jax.models.spellm import SpeLLM


@nnx.jit
def _predictions(model: SpeLLM, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Free and vocabulary-constrained next-token predictions `[N, T]`, one row at a time (the
    `[T, V, k]` gather of the constrained scores would not fit for a whole batch)."""

    def one_row(row_ids):
        hidden, _ = model.model(row_ids[None])
        char_logits = model.char_logits(hidden[0])
        free = model.lookup_tokens(jnp.argmax(char_logits, axis=-1))
        constrained = jnp.argmax(model.vocab_log_scores(char_logits), axis=-1)
        return free, constrained

    return jax.lax.map(one_row, ids)


def continuation_agreement(model: SpeLLM, sequences: np.ndarray, target_mask: np.ndarray
                           ) -> dict[str, float]:
    """Share of target positions where the SpeLLM's next token equals the sequence's next token.

    `sequences` `[N, T]` are prompts followed by the teacher's greedy continuation; `target_mask`
    marks the continuation tokens (the targets), so each is predicted from everything before it.
    """
    free, constrained = (np.asarray(x) for x in _predictions(model, jnp.asarray(sequences)))
    targets, mask = sequences[:, 1:], target_mask[:, 1:].astype(bool)
    count = max(int(mask.sum()), 1)
    return {"free_agreement": float(((free[:, :-1] == targets) & mask).sum() / count),
            "vocab_agreement": float(((constrained[:, :-1] == targets) & mask).sum() / count),
            "positions": int(mask.sum())}
