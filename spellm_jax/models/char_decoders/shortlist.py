"""Word rows for the chain decoder: a shortlist of frequent tokens, each scored by its own row.

`W_i h` scores a symbol with one direction of h for every word that has it at position i, while
the teacher scores each word with its own row. The shortlist keeps R such rows (the LM head's, at
first) for the R tokens most frequent in the training text. At step i the shortlist tokens whose
spelling starts with the symbols chosen so far (the "alive" ones) add `exp(u_r·h + b_r)` to the
logit of their i-th symbol (PAD where the token ends), so over those tokens the decoder starts out
as the teacher's exact conditionals; the chain decoder's own logits cover the rest. The cost is
R·d multiply-adds per token and k passes over R numbers, whatever the vocabulary's size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spellm_jax import sharding
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


def _safe_log(x: jax.Array) -> jax.Array:
    """`log x`, -inf where x = 0, with finite gradients there."""
    positive = x > 0
    return jnp.where(positive, jnp.log(jnp.where(positive, x, 1.0)), -jnp.inf)


class Shortlist(nnx.Module):
    """`scores(h)` `[N, R]` once per hidden state; `step_logits` the log-mass each symbol gets
    from the alive tokens at one step."""

    def __init__(self, d: int, tokens: tuple[int, ...], k: int, options: RuntimeOptions,
                 rngs: nnx.Rngs):
        size = len(tokens)
        self.tokens, self.dtype = tokens, options.dtype

        def param(shape, axes):
            return sharding.param(rngs.params(), jax.nn.initializers.zeros, shape, axes,
                                  options.param_dtype)

        self.kernel = param((d, size), ("embed", "char_shortlist"))
        self.bias = param((size,), ("char_shortlist",))
        self.spellings = SpellingConstant(jnp.zeros((size, k), jnp.int32))  # [R, k]

    def attach_spelling(self, spelling: SpellingTable, unembedding: np.ndarray | None) -> None:
        """The tokens' rows of the table and, given the LM head's `[V, d]` rows, their rows."""
        tokens = np.asarray(self.tokens)
        self.spellings[...] = jnp.asarray(spelling.table[tokens], jnp.int32)
        if unembedding is not None:
            self.kernel[...] = jnp.asarray(unembedding[tokens].T, self.kernel[...].dtype)

    def scores(self, hidden: jax.Array) -> jax.Array:
        """`u_r·h + b_r` `[N, R]` (fp32) for hidden states `[N, d]`."""
        z = jnp.einsum("nd,dr->nr", hidden.astype(self.dtype), self.kernel[...].astype(self.dtype),
                       preferred_element_type=jnp.float32)
        return z + self.bias[...].astype(jnp.float32)

    def alive_at_start(self, n: int, beam: int) -> jax.Array:
        """bool `[N, B, R]`: before any symbol every shortlist token is alive."""
        return jnp.ones((n, beam, len(self.tokens)), bool)

    def step_logits(self, scores: jax.Array, alive: jax.Array, previous: jax.Array | None,
                    i: int | jax.Array, num_symbols: int) -> tuple[jax.Array, jax.Array]:
        """`(log Σ_{alive r, spell(r)_i = c} exp(scores_r)` `[N, B, C]`, alive `[N, B, R]`)
        after `previous` `[N, B]` was chosen at i - 1 (-inf where no alive token has c). A row
        that has ended (PAD, the last symbol) keeps no token alive, and a step where no token is
        alive skips the work (a decoded token leaves the shortlist within a few symbols)."""
        spellings = self.spellings[...]
        n, beam, size = alive.shape

        def log_masses(alive):
            masked = jnp.where(alive, scores[:, None], -jnp.inf)
            top = jax.lax.stop_gradient(jnp.max(masked, axis=-1, keepdims=True))
            top = jnp.where(jnp.isfinite(top), top, 0.0)
            weights = jnp.where(alive, jnp.exp(masked - top), 0.0).reshape(-1, size)
            mass = jax.ops.segment_sum(weights.T, spellings[:, i], num_segments=num_symbols).T
            return _safe_log(mass).reshape(n, beam, num_symbols) + top

        if previous is None:
            return log_masses(alive), alive
        alive = alive & (spellings[:, i - 1] == previous[..., None]) & (
            previous[..., None] != num_symbols - 1)
        nothing = jnp.full((n, beam, num_symbols), -jnp.inf)
        return jax.lax.cond(jnp.any(alive), log_masses, lambda _: nothing, alive), alive
