"""Word rows for the chain decoder: a shortlist of frequent tokens, each scored by its own row,
and one rest row for every other token, whose spelling the chain decoder gives.

`W_i h` scores a symbol with one direction of h for every word that has it at position i, while
the teacher scores each word with its own row. The shortlist keeps R such rows (the LM head's,
not trained) for the R tokens most frequent in the training text, plus a trained rest row: a
softmax over the R + 1 scores `u_r·h`, `u_rest·h + b_rest` gives each shortlist token its
probability and the rest row the mass of all other tokens, which the chain's string distribution
shares out. So the decoder's token
distribution is `p(v) = p_words(v) + p_rest · chain(spell(v))`, and the choice among the
shortlist is a plain argmax: exact, however the tokens' spellings overlap. Its targets are the
teacher's probabilities of the shortlist tokens and its remaining mass. The cost is (R + 1)·d
multiply-adds per token, whatever the vocabulary's size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spellm_jax import sharding
from spellm_jax.models.char_decoders.base import MASKED_LOGIT
from spellm_jax.models.llama import RuntimeOptions
from spellm_jax.spelling import SpellingTable
from spellm_jax.spelling.device import SpellingConstant


def most_frequent_tokens(counts: np.ndarray, spelling: SpellingTable, size: int
                         ) -> tuple[int, ...]:
    """The `size` valid tokens counted most often (`counts` `[V]`; ties go to the lower id)."""
    if size > int(spelling.valid.sum()):
        raise ValueError(f"heads.shortlist={size} exceeds the {int(spelling.valid.sum())} tokens "
                         "the spelling table can spell; choose a smaller shortlist.")
    ranked = np.lexsort((np.arange(len(counts)), -np.where(spelling.valid, counts, -1)))
    return tuple(int(t) for t in ranked[:size])


def rest_share_logit(outside: np.ndarray, prior: np.ndarray | None) -> float:
    """The log-odds of the teacher's average mass on the tokens `outside` the shortlist (bool
    `[V]`), from its token `prior` `[V]` (an average next-token distribution); 0 without one,
    and no share at all when no token is outside."""
    if not outside.any():
        return MASKED_LOGIT
    if prior is None:
        return 0.0
    share = float(np.clip(np.sum(prior[outside]) / max(np.sum(prior), 1e-30), 1e-6, 1 - 1e-6))
    return float(np.log(share / (1 - share)))


class Shortlist(nnx.Module):
    """`scores(h)` `[N, R + 1]`: the R word rows' scores, then the rest row's, `log Σ_r
    exp(u_r·h) + w·h + b`: the rest row learns the log-odds `w·h + b` of the rest against the
    shortlist, which starts at the teacher's average (`rest_share_logit`)."""

    def __init__(self, d: int, tokens: tuple[int, ...], k: int, options: RuntimeOptions,
                 rngs: nnx.Rngs):
        size = len(tokens)
        self.tokens, self.dtype = tokens, options.dtype

        def param(shape, axes):
            return sharding.param(rngs.params(), jax.nn.initializers.zeros, shape, axes,
                                  options.param_dtype)

        self.kernel = param((d, size), ("embed", "char_shortlist"))
        self.rest_kernel = param((d,), ("embed",))
        self.rest_bias = param((), ())
        self.spellings = SpellingConstant(jnp.zeros((size, k), jnp.int32))  # [R, k]

    def attach_spelling(self, spelling: SpellingTable, unembedding: np.ndarray | None,
                        token_prior: np.ndarray | None = None) -> None:
        """The tokens' rows of the table and, given the LM head's `[V, d]` rows, the word rows
        and the rest row's log-odds (`w = 0`, `b` from the teacher's `token_prior`)."""
        tokens = np.asarray(self.tokens)
        self.spellings[...] = jnp.asarray(spelling.table[tokens], jnp.int32)
        if unembedding is None:
            return
        self.kernel[...] = jnp.asarray(unembedding[tokens].T, self.kernel[...].dtype)
        self.rest_kernel[...] = jnp.zeros_like(self.rest_kernel[...])
        outside = self.outside(spelling.vocab_size, spelling.valid)
        self.rest_bias[...] = jnp.asarray(rest_share_logit(outside, token_prior),
                                          self.rest_bias[...].dtype)

    def outside(self, vocab_size: int, valid: np.ndarray | None = None) -> np.ndarray:
        """bool `[V]`: the (valid) tokens the shortlist does not hold."""
        out = np.ones(vocab_size, bool) if valid is None else np.asarray(valid, bool).copy()
        out[np.asarray(self.tokens, np.int64)] = False
        return out

    def scores(self, hidden: jax.Array) -> jax.Array:
        """`[u_r·h, log Σ_r exp(u_r·h) + w·h + b]` `[N, R + 1]` (fp32) for hidden states
        `[N, d]`."""
        h = hidden.astype(self.dtype)
        words = jnp.einsum("nd,dr->nr", h, self.kernel[...].astype(self.dtype),
                           preferred_element_type=jnp.float32)
        odds = jnp.einsum("nd,d->n", h, self.rest_kernel[...].astype(self.dtype),
                          preferred_element_type=jnp.float32)
        rest = jax.nn.logsumexp(words, axis=-1) + odds + self.rest_bias[...].astype(jnp.float32)
        return jnp.concatenate([words, rest[:, None]], -1)

    def slot_of(self, tokens: jax.Array) -> jax.Array:
        """Each token's index among the R + 1 scores: its row, or R (the rest row)."""
        size = len(self.tokens)
        vocab_slots = np.full(max(max(self.tokens, default=0) + 1, 1), size, np.int32)
        vocab_slots[np.asarray(self.tokens, np.int64)] = np.arange(size)
        inside = (tokens >= 0) & (tokens < len(vocab_slots))  # -1: a row that spells no token
        return jnp.where(inside, jnp.asarray(vocab_slots)[jnp.where(inside, tokens, 0)], size)

    def target_log_probs(self, teacher_log_probs: jax.Array) -> jax.Array:
        """The teacher's log-probabilities `[..., V]` gathered into the R + 1 classes: each
        shortlist token's, then the log of the mass of all others."""
        tokens = jnp.asarray(self.tokens, jnp.int32)
        rest = jnp.asarray(self.outside(teacher_log_probs.shape[-1]))
        rest_mass = jax.nn.logsumexp(jnp.where(rest, teacher_log_probs, -jnp.inf), axis=-1)
        return jnp.concatenate([teacher_log_probs[..., tokens], rest_mass[..., None]], -1)

    def word_log_probs(self, log_probs: jax.Array, tokens: jax.Array) -> jax.Array:
        """`log p_words` `[N]` of each token `[N]` from the normalised scores `[N, R + 1]`: -inf
        for tokens outside the shortlist (and -1, no token)."""
        slot = self.slot_of(tokens)
        picked = jnp.take_along_axis(log_probs, slot[:, None], axis=-1)[:, 0]
        return jnp.where(slot < len(self.tokens), picked, -jnp.inf)
