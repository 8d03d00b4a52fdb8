"""The chain-rule character decoder: head i sees the symbols chosen before it.

Linear heads on the final hidden state plus a small recurrence of width r fed the previous
symbol: `s_0 = tanh(P h)`, `s_i = silu(U s_{i-1} + E_i[c_{i-1}])`, `logits_i = W_i h + b_i +
V_i s_i`. `V` starts at zero, so the decoder starts as the independent heads (and takes their
trained `kernel` and `bias` from an independent run). The string distribution is the product of
the conditionals, so its targets are the teacher's exact conditionals along the target spelling:
`q_i(c | prefix)`, the teacher's mass on tokens continuing the prefix with c over its mass on the
prefix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from spellm_jax import sharding
from spellm_jax.models.char_decoders.base import HeadsConfig, register_decoder
from spellm_jax.models.char_decoders.independent import IndependentHeads
from spellm_jax.models.char_decoders.search import forced_log_probs, search_rows
from spellm_jax.models.llama import RuntimeOptions
from spellm_jax.sampling import GREEDY, Sampling
from spellm_jax.spelling import DeviceSpelling


def chain_targets(token_probs: jax.Array, rows: jax.Array, spelling: DeviceSpelling) -> jax.Array:
    """`q_i(c | rows_<i)` `[..., k, C]`: the mass of the tokens whose rows continue `rows[..., :i]`
    with c, over the mass of the tokens whose rows start with it; PAD gets the mass of the tokens
    equal to the prefix. In the trie's order every prefix is a contiguous range of tokens, so a
    prefix's mass is a difference of one cumulative sum: O(V) per position for the sum, then
    binary searches (no `[..., V, k]` array, no per-head pass over the vocabulary)."""
    k, c = spelling.k, spelling.num_symbols
    lead = token_probs.shape[:-1]
    probs = token_probs.reshape(-1, token_probs.shape[-1])  # [N, V]
    rows = rows.reshape(-1, k)
    ordered = jnp.where(spelling.trie_tokens[...] >= 0, probs[:, spelling.trie_tokens[...]], 0.0)
    cumulative = jnp.concatenate([jnp.zeros_like(ordered[:, :1]), jnp.cumsum(ordered, -1)], -1)
    lo = jnp.zeros((len(probs), 1), jnp.int32)
    hi = jnp.full((len(probs), 1), spelling.trie_count, jnp.int32)
    symbols = jnp.arange(c + 1)[None]
    targets = []
    for i in range(k):
        # Symbol c's range ends where c + 1's begins: C + 1 searches give all C ranges.
        bounds = spelling.trie_lower_bound(i, lo, hi, symbols)  # [N, C + 1]
        at = jnp.take_along_axis(cumulative, bounds, -1)
        mass = jnp.maximum(at[:, 1:] - at[:, :-1], 0.0)
        targets.append(mass / jnp.maximum(mass.sum(-1, keepdims=True), 1e-30))
        lo, hi = spelling.trie_narrow(i, lo, hi, rows[:, i:i + 1])
    return jnp.stack(targets, axis=1).reshape(*lead, k, c)


def up_to_first_pad(rows: jax.Array, pad: int) -> jax.Array:
    """1.0 for the symbols `[..., k]` up to and including the first PAD, else 0."""
    before = jnp.cumsum(rows == pad, axis=-1) - (rows == pad)
    return (before == 0).astype(jnp.float32)


@register_decoder("chain")
class ChainHeads(IndependentHeads):
    """The independent heads' `W_i h + b_i` (same parameters and names) plus the width-r
    recurrence over the symbols chosen so far."""

    FRESH_PARAMETERS = ("state_in", "transition", "symbol_embed", "readout")

    def __init__(self, d: int, config: HeadsConfig, options: RuntimeOptions, rngs: nnx.Rngs):
        super().__init__(d, config, options, rngs)
        k, c, r = config.k, config.num_symbols, config.recurrent_width

        def param(init, shape, axes):
            return sharding.param(rngs.params(), init, shape, axes, options.param_dtype)

        normal = jax.nn.initializers.normal
        self.state_in = param(normal(d ** -0.5), (d, r), ("embed", "char_state"))
        self.transition = param(normal(r ** -0.5), (r, r), ("char_state", "char_state"))
        self.symbol_embed = param(normal(1.0), (k, c, r), ("char_head", "char_vocab", "char_state"))
        self.readout = param(jax.nn.initializers.zeros, (k, r, c),
                             ("char_head", "char_state", "char_vocab"))

    def _stepper(self, hidden: jax.Array, beam: int):
        """`(step, initial state)` for `search`: hidden `[N, d]`, hypotheses `[N, beam]`."""
        base = super().logits(hidden)  # [N, k, C]: W_i h + b_i + the symbol mask
        s0 = jnp.tanh(hidden.astype(self.dtype) @ self.state_in[...].astype(self.dtype))
        s0 = jnp.broadcast_to(s0[:, None], (s0.shape[0], beam, s0.shape[-1]))

        def step(s, previous, i):
            if previous is not None:
                embed = self.symbol_embed[...][i].astype(self.dtype)[previous]  # [N, B, r]
                s = jax.nn.silu(s @ self.transition[...].astype(self.dtype) + embed)
            correction = jnp.einsum("nbr,rc->nbc", s, self.readout[...][i].astype(self.dtype),
                                    preferred_element_type=jnp.float32)
            return base[:, None, i] + correction, s

        return step, s0

    # -- the CharDecoder interface -------------------------------------------------------------

    def logits(self, hidden: jax.Array, rows: jax.Array | None = None) -> jax.Array:
        """Symbol i's logits `[..., k, C]` given `rows[..., :i]` (the decoder's own greedy row
        when None)."""
        k, c = self.config.k, self.config.num_symbols
        flat = hidden.reshape(-1, hidden.shape[-1])
        if rows is None:
            rows = self.choose(flat, None)
        rows = rows.reshape(-1, k)
        step, state = self._stepper(flat, 1)
        out = []
        for i in range(k):
            logits, state = step(state, None if i == 0 else rows[:, i - 1:i], i)
            out.append(logits[:, 0])
        return jnp.stack(out, axis=1).reshape(*hidden.shape[:-1], k, c)

    def choose(self, hidden: jax.Array, spelling: DeviceSpelling | None,
               key: jax.Array | None = None, sampling: Sampling = GREEDY,
               constrained: bool = False, beam: int = 1) -> jax.Array:
        """Symbol by symbol: greedy, ancestral sampling or a beam of `beam` strings, within the
        vocabulary's prefix trie if `constrained`."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        step, state = self._stepper(flat, beam)
        rows = search_rows(step, state, self.config.k, self.config.num_symbols - 1,
                           trie=spelling if constrained else None, beam=beam, sampling=sampling,
                           key=key)
        return rows.reshape(*hidden.shape[:-1], self.config.k)

    def token_log_probs(self, hidden: jax.Array, rows: jax.Array, spelling: DeviceSpelling
                        ) -> jax.Array:
        """The trie-renormalised string probability of each row `[...]`: a distribution over
        the vocabulary's distinct rows."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        step, state = self._stepper(flat, 1)
        return forced_log_probs(step, state, rows.reshape(-1, self.config.k),
                                spelling.pad_symbol, trie=spelling).reshape(hidden.shape[:-1])

    def soft_targets(self, token_probs: jax.Array, rows: jax.Array, spelling: DeviceSpelling
                     ) -> jax.Array:
        return chain_targets(token_probs, rows, spelling)

    def loss_weights(self, rows: jax.Array, spelling: DeviceSpelling) -> jax.Array:
        """Positions past the target's first PAD carry no loss (the row has ended)."""
        return up_to_first_pad(rows, spelling.pad_symbol)
