"""Batched KV-cache decoding: one compiled prefill, one compiled on-device loop, pluggable output rule.

An output rule maps the final hidden state of each row to its next input token. The LM-head rule
is the baseline; the character-head rules of SpeLLM plug into the same loop.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from spellm_jax.models.llama import KVCache

PROMPT_BUCKET = 16  # prompts are left-padded to a multiple of this, so lengths share compilations


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Greedy when temperature is 0; otherwise temperature, then top-k, then top-p (nucleus)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"invalid sampling settings {self}: need temperature >= 0, "
                             "top_k >= 0 and 0 < top_p <= 1.")


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Index drawn from the last axis of `logits` (any leading shape)."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
        cutoff_index = jnp.sum(cumulative < sampling.top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class OutputRule(Protocol):
    """Hidden states `[B, d]` -> next input token ids `[B]`. Must be hashable (it is static)."""

    def __call__(self, model: nnx.Module, hidden: jax.Array, key: jax.Array) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class LMHeadRule:
    """The ordinary output layer: logits over the vocabulary from `model.lm_logits`."""

    sampling: Sampling = Sampling()

    def __call__(self, model, hidden, key):
        return sample(model.lm_logits(hidden), key, self.sampling)


@struct.dataclass
class DecodeState:
    cache: KVCache
    key_valid: jax.Array  # [B, S] cache slots holding real tokens
    hidden: jax.Array  # [B, d] hidden state that picks the next token
    positions: jax.Array  # [B] position of the next token fed
    slot: jax.Array  # () next cache slot to write
    tokens: jax.Array  # [B, max_new] generated ids (-1 where none)
    num_tokens: jax.Array  # [B]
    done: jax.Array  # [B]
    step: jax.Array  # ()
    key: jax.Array


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, bucket: int = PROMPT_BUCKET
             ) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded `[B, P]` ids and mask, P rounded up to a multiple of `bucket`."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token; got an empty prompt.")
    length = -(-max(len(p) for p in prompts) // bucket) * bucket
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = prompt
        mask[row, length - len(prompt):] = True
    return ids, mask


def _backbone(model):
    """The decoder stack that returns hidden states (a SpeLLM or a causal LM both expose it)."""
    return model.model


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "rule"))
def _generate(graphdef, state, ids, mask, key, eos_ids, *, max_new_tokens: int, rule):
    model = nnx.merge(graphdef, state)
    backbone = _backbone(model)
    batch, prompt_len = ids.shape
    total = prompt_len + max_new_tokens
    cache = KVCache.zeros(model.config, batch, total, dtype=model.options.dtype)
    key_valid = jnp.zeros((batch, total), bool).at[:, :prompt_len].set(mask)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    hidden, cache = backbone(ids, positions=positions, attention_mask=mask, cache=cache,
                             write_index=0, key_valid=key_valid)
    state0 = DecodeState(
        cache=cache, key_valid=key_valid, hidden=hidden[:, -1], positions=positions[:, -1] + 1,
        slot=jnp.asarray(prompt_len, jnp.int32),
        tokens=jnp.full((batch, max_new_tokens), -1, jnp.int32),
        num_tokens=jnp.zeros((batch,), jnp.int32), done=jnp.zeros((batch,), bool),
        step=jnp.asarray(0, jnp.int32), key=key)

    def cond(s: DecodeState):
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def body(s: DecodeState):
        key, step_key = jax.random.split(s.key)
        token = rule(model, s.hidden, step_key)
        rows = jnp.arange(batch)
        tokens = s.tokens.at[rows, s.num_tokens].set(jnp.where(s.done, s.tokens[rows, s.num_tokens],
                                                               token))
        num_tokens = s.num_tokens + (~s.done)
        done = s.done | jnp.isin(token, eos_ids)
        key_valid = s.key_valid.at[:, s.slot].set(True)
        hidden, cache = backbone(token[:, None], positions=s.positions[:, None],
                                 cache=s.cache, write_index=s.slot, key_valid=key_valid)
        return DecodeState(cache=cache, key_valid=key_valid, hidden=hidden[:, 0],
                           positions=s.positions + 1, slot=s.slot + 1, tokens=tokens,
                           num_tokens=num_tokens, done=done, step=s.step + 1, key=key)

    final = jax.lax.while_loop(cond, body, state0)
    return final.tokens, final.num_tokens


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             rule: OutputRule | None = None, *, eos_ids: Sequence[int] = (), pad_id: int = 0,
             seed: int = 0) -> list[list[int]]:
    """New token ids for each prompt (ending with the EOS id if one was produced)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}; ask for at least one new token.")
    ids, mask = left_pad(prompts, pad_id)
    graphdef, state = nnx.split(model)
    tokens, counts = _generate(
        graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(seed),
        jnp.asarray(list(eos_ids) or [-1], jnp.int32), max_new_tokens=max_new_tokens,
        rule=rule or LMHeadRule())
    tokens, counts = np.asarray(tokens), np.asarray(counts)
    return [tokens[row, :counts[row]].tolist() for row in range(len(prompts))]
