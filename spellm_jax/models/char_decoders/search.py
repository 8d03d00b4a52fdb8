"""Choosing a row of k symbols one symbol at a time: greedy, ancestral sampling, or beam search
over symbol strings, free or constrained by the vocabulary's prefix trie (so the row always spells
exactly one token).

A decoder supplies `step(state, previous, i) -> (logits [N, B, C], state)`: the logits of symbol
i for each of B hypotheses given its state and the symbols `previous` `[N, B]` chosen at i - 1
(None at i = 0). States are pytrees with leading dimensions `[N, B]`. Rows stop at PAD: every
symbol after it is PAD and adds nothing to a hypothesis's log-probability.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from spellm_jax.sampling import GREEDY, Sampling, sample
from spellm_jax.spelling import DeviceSpelling

Step = Callable[[Any, jax.Array | None, int], tuple[jax.Array, Any]]


def constrained_log_probs(logits: jax.Array, allowed: jax.Array | None) -> jax.Array:
    """log-softmax over the last axis, over the `allowed` symbols only (-inf elsewhere; all -inf
    where nothing is allowed)."""
    if allowed is None:
        return jax.nn.log_softmax(logits, axis=-1)
    masked = jnp.where(allowed, logits, -jnp.inf)
    norm = jax.nn.logsumexp(masked, axis=-1, keepdims=True)
    return jnp.where(allowed, masked - norm, -jnp.inf)


def _reorder(tree: Any, parents: jax.Array) -> Any:
    """Hypotheses `[N, B, ...]` of every leaf, picked by `parents` `[N, B]`."""
    def pick(leaf):
        index = parents.reshape(*parents.shape, *([1] * (leaf.ndim - 2)))
        return jnp.take_along_axis(leaf, index, axis=1)

    return jax.tree.map(pick, tree)


def search_rows(step: Step, state: Any, k: int, pad: int, *, trie: DeviceSpelling | None = None,
                beam: int = 1, sampling: Sampling = GREEDY, key: jax.Array | None = None,
                unroll: bool = True, with_score: bool = False, every_row: bool = False
                ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The best (or sampled) row `[N, k]` for each of N hidden states. `state` has leading
    dimensions `[N, beam]`. With a `trie` (the spelling's), only symbols that keep the row a
    prefix of some vocabulary token are chosen, so the row spells exactly one token. `unroll`:
    the k symbol steps are unrolled (fastest to run: decoding), else one `lax.scan` step with a
    traced `i` (fastest to compile: evaluation's ceilings). `with_score`: also the row's
    log-probability `[N]` (each symbol's renormalised over the trie's symbols when constrained).
    `every_row`: every hypothesis's row `[N, beam, k]` and log-probability `[N, beam]` instead."""
    if beam > 1 and not sampling.greedy:
        raise ValueError("beam search is greedy; sample with beam=1.")
    constrained = trie is not None
    n = jax.tree.leaves(state)[0].shape[0]

    def advance(carry, previous, i):
        score, rows, done, lo, hi, state = carry
        logits, state = step(state, previous, i)
        allowed = trie.trie_allowed(i, lo) if constrained else None
        log_probs = constrained_log_probs(logits.astype(jnp.float32), allowed)
        log_probs = jnp.where(jnp.isnan(log_probs), -jnp.inf, log_probs)  # hypotheses with no mass
        is_pad = jnp.arange(logits.shape[-1]) == pad
        log_probs = jnp.where(done[..., None], jnp.where(is_pad, 0.0, -jnp.inf), log_probs)
        if beam == 1:
            step_key = None if key is None else jax.random.fold_in(key, i)
            symbol = jnp.where(done, pad, sample(log_probs, step_key, sampling))
            if with_score:
                score = score + jnp.take_along_axis(log_probs, symbol[..., None], -1)[..., 0]
        else:
            candidates = (score[..., None] + log_probs).reshape(n, -1)  # [N, B * C]
            score, flat = jax.lax.top_k(candidates, beam)
            parents, symbol = flat // logits.shape[-1], (flat % logits.shape[-1]).astype(jnp.int32)
            rows, state, done, lo, hi = _reorder((rows, state, done, lo, hi), parents)
        rows = rows.at[..., i].set(symbol)
        if constrained:
            lo, hi = trie.trie_narrow(i, lo, hi, symbol)
        return (score, rows, done | (symbol == pad), lo, hi, state), symbol

    carry = (jnp.where(jnp.arange(beam) == 0, 0.0, -jnp.inf)[None].repeat(n, 0),  # scores [N, B]
             jnp.full((n, beam, k), pad, jnp.int32), jnp.zeros((n, beam), bool),
             jnp.zeros((n, beam), jnp.int32),
             jnp.full((n, beam), trie.trie_count if constrained else 0, jnp.int32), state)
    carry, previous = advance(carry, None, 0)
    if unroll:
        for i in range(1, k):
            carry, previous = advance(carry, previous, i)
    else:
        (carry, previous), _ = jax.lax.scan(
            lambda c, i: (advance(*c, i), None), (carry, previous), jnp.arange(1, k))
    score, rows = carry[:2]
    if every_row:
        return rows, score
    best = jnp.argmax(score, axis=-1)
    row = jnp.take_along_axis(rows, best[:, None, None], axis=1)[:, 0]
    if with_score:
        return row, jnp.take_along_axis(score, best[:, None], axis=1)[:, 0]
    return row


def forced_log_probs(step: Step, state: Any, rows: jax.Array, pad: int,
                     trie: DeviceSpelling | None = None) -> jax.Array:
    """`log p(rows)` `[N]` under the decoder (`state` with a beam dimension of 1): the sum over
    the symbols up to and including the first PAD of each symbol's log-probability given those
    before it, each renormalised over the `trie`'s allowed symbols if one is given."""
    n, k = rows.shape
    constrained = trie is not None
    total = jnp.zeros((n,))
    done = jnp.zeros((n,), bool)
    lo = jnp.zeros((n, 1), jnp.int32)
    hi = jnp.full((n, 1), trie.trie_count if constrained else 0, jnp.int32)
    for i in range(k):
        logits, state = step(state, None if i == 0 else rows[:, i - 1:i], i)
        allowed = trie.trie_allowed(i, lo) if constrained else None
        log_probs = constrained_log_probs(logits.astype(jnp.float32), allowed)[:, 0]
        picked = jnp.take_along_axis(log_probs, rows[:, i:i + 1], axis=-1)[:, 0]
        total = total + jnp.where(done, 0.0, picked)
        if constrained:
            lo, hi = trie.trie_narrow(i, lo, hi, rows[:, i:i + 1])
        done = done | (rows[:, i] == pad)
    return total
