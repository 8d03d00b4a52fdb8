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
from spellm_jax.models.spellm import SpeLLM

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
    """Hidden states `[B, d]` -> `(next token ids [B], spelled rows [B, k] or None)`; a token id
    of -1 asks the host to turn that row's string into input ids. Must be hashable (static)."""

    def __call__(self, model: nnx.Module, hidden: jax.Array, key: jax.Array
                 ) -> tuple[jax.Array, jax.Array]: ...


@dataclasses.dataclass(frozen=True)
class LMHeadRule:
    """The ordinary output layer: logits over the vocabulary from `model.lm_logits`."""

    sampling: Sampling = Sampling()

    def __call__(self, model, hidden, key):
        return sample(model.lm_logits(hidden), key, self.sampling), None


@dataclasses.dataclass(frozen=True)
class FreeRule:
    """SpeLLM free decoding: each head picks a symbol; the string (cut at the first PAD) is looked
    up on device, and strings that are not one token go to the host tokenizer."""

    sampling: Sampling = Sampling()

    def __call__(self, model, hidden, key):
        rows = sample(model.char_logits(hidden), key, self.sampling)  # [B, k]
        return model.lookup_tokens(rows), rows


@dataclasses.dataclass(frozen=True)
class VocabRule:
    """SpeLLM vocabulary-constrained decoding: the token whose spelling the heads score highest."""

    sampling: Sampling = Sampling()

    def __call__(self, model, hidden, key):
        token = sample(model.vocab_log_scores(model.char_logits(hidden)), key, self.sampling)
        return token, model.spelling_table[...][token]


@struct.dataclass
class DecodeState:
    cache: KVCache
    key_valid: jax.Array  # [B, S] cache slots holding real tokens
    hidden: jax.Array  # [B, d] hidden state that picks the next token
    positions: jax.Array  # [B] position of the next token fed
    slot: jax.Array  # () next cache slot to write
    tokens: jax.Array  # [B, N] generated ids (-1 where none)
    num_tokens: jax.Array  # [B]
    done: jax.Array  # [B]
    step_tokens: jax.Array  # [B] tokens picked by the step that stopped for the host
    step_rows: jax.Array  # [B, k] their spelled rows
    needs_host: jax.Array  # [B]
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


@functools.partial(jax.jit, static_argnames=("graphdef", "record"), donate_argnames=("s",))
def _feed(graphdef, state, s: DecodeState, ids, mask, eos_ids, *, record: bool) -> DecodeState:
    """Writes a left-padded chunk `[B, m]` into the cache; the last real token of each row gives
    its next hidden state. `record` appends the chunk's real ids to the generated tokens."""
    backbone = nnx.merge(graphdef, state).model
    batch, m = ids.shape
    positions = s.positions[:, None] + jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    key_valid = jax.lax.dynamic_update_slice_in_dim(s.key_valid, mask, s.slot, 1)
    hidden, cache = backbone(ids, positions=positions, attention_mask=mask, cache=s.cache,
                             write_index=s.slot, key_valid=key_valid)
    count = mask.sum(-1).astype(jnp.int32)
    tokens, num_tokens, done = s.tokens, s.num_tokens, s.done
    if record:
        limit = tokens.shape[1]
        columns = jnp.where(mask, num_tokens[:, None] + jnp.cumsum(mask, axis=-1) - 1, limit)
        tokens = tokens.at[jnp.arange(batch)[:, None], columns].set(ids, mode="drop")
        num_tokens = num_tokens + count
        done = done | jnp.any(mask & jnp.isin(ids, eos_ids), axis=-1)
    return s.replace(cache=cache, key_valid=key_valid,
                     hidden=jnp.where((count > 0)[:, None], hidden[:, -1], s.hidden),
                     positions=s.positions + count, slot=s.slot + m, tokens=tokens,
                     num_tokens=num_tokens, done=done, needs_host=jnp.zeros_like(s.needs_host))


def _active(s: DecodeState, max_new_tokens: int) -> jax.Array:
    """Rows `[B]` still generating: no EOS yet and fewer than `max_new_tokens` tokens."""
    return ~s.done & (s.num_tokens < max_new_tokens)


def _choose(model, rule: OutputRule, s: DecodeState, max_new_tokens: int) -> DecodeState:
    """Every row's next token from its hidden state, held in `step_tokens` / `step_rows` until it
    is fed; active rows whose string is not one token are marked for the host."""
    key, step_key = jax.random.split(s.key)
    token, rows = rule(model, s.hidden, step_key)
    return s.replace(step_tokens=token,
                     step_rows=s.step_rows if rows is None else rows.astype(jnp.int32),
                     needs_host=_active(s, max_new_tokens) & (token < 0), key=key)


@functools.partial(jax.jit, static_argnames=("graphdef", "rule", "max_new_tokens"),
                   donate_argnames=("s",))
def _loop(graphdef, state, s: DecodeState, eos_ids, *, rule, max_new_tokens: int) -> DecodeState:
    """Generates on device until every row is done, the cache is full, or a row needs the host.

    Each step feeds the tokens chosen by the step before and then chooses the next ones, so the
    loop's condition (not a branch inside it) stops for the host, and the caches are updated in
    place rather than copied into and out of a conditional.
    """
    model = nnx.merge(graphdef, state)
    capacity = s.key_valid.shape[1]

    def cond(s: DecodeState):
        return jnp.any(_active(s, max_new_tokens)) & ~jnp.any(s.needs_host) & (s.slot < capacity)

    def body(s: DecodeState):
        s = _feed.__wrapped__(graphdef, state, s, s.step_tokens[:, None],
                              _active(s, max_new_tokens)[:, None], eos_ids, record=True)
        return _choose(model, rule, s, max_new_tokens)

    return jax.lax.while_loop(cond, body, _choose(model, rule, s, max_new_tokens))


def _host_chunk(s: DecodeState, max_new_tokens: int, spelling, tokenizer, pad_id: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """The next input ids of every row after a stop for the host: device-picked tokens as they
    are, out-of-vocabulary strings through the tokenizer (possibly several ids)."""
    if spelling is None:
        raise ValueError("a decoding rule emitted a string that is not one token; pass the "
                         "spelling table (and tokenizer) to generate() to map it to input ids.")
    tokens, rows = np.asarray(s.step_tokens), np.asarray(s.step_rows)
    active = np.asarray(_active(s, max_new_tokens))
    pending: list[list[int]] = []
    for row in range(len(tokens)):
        if not active[row]:
            pending.append([])
        elif tokens[row] >= 0:
            pending.append([int(tokens[row])])
        else:
            ids = spelling.ids_for_row(rows[row], tokenizer)
            if not ids:  # the symbol mask keeps PAD from coming first, so this is a bug
                raise RuntimeError(f"row {row} emitted an empty string: {rows[row].tolist()}")
            pending.append(ids)
    width = max(1, max(len(p) for p in pending))
    width = 1 << (width - 1).bit_length()  # power-of-two widths share compilations
    ids = np.full((len(pending), width), pad_id, np.int32)
    mask = np.zeros((len(pending), width), bool)
    for row, row_ids in enumerate(pending):
        if row_ids:
            ids[row, width - len(row_ids):] = row_ids
            mask[row, width - len(row_ids):] = True
    return ids, mask


def _grow(s: DecodeState, extra: int) -> DecodeState:
    """A copy of the state whose cache has `extra` more slots."""
    def pad(x, axis):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, extra)
        return jnp.pad(x, widths)

    cache = KVCache(pad(s.cache.keys, 3), pad(s.cache.values, 3))
    return s.replace(cache=cache, key_valid=pad(s.key_valid, 1))


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             rule: OutputRule | None = None, *, eos_ids: Sequence[int] = (), pad_id: int = 0,
             seed: int = 0, spelling=None, tokenizer=None, stats: dict | None = None
             ) -> list[list[int]]:
    """New token ids for each prompt (ending with the EOS id if one was produced).

    SpeLLM rules need `spelling` (the SpellingTable) and, for free decoding of strings that are
    not one token, the `tokenizer`. A `stats` dict receives `host_round_trips` (stops of the
    on-device loop for strings that are not one token) and `cache_growths`. For speed, pass
    `models.llama.fused_for_inference(model)`.
    """
    stats = {} if stats is None else stats
    stats.update(host_round_trips=0, cache_growths=0)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}; ask for at least one new token.")
    rule = rule or LMHeadRule()
    ids, mask = left_pad(prompts, pad_id)
    batch, prompt_len = ids.shape
    graphdef, state = nnx.split(model)
    config, dtype = model.config, model.options.dtype
    capacity = -(-(prompt_len + max_new_tokens + 1) // PROMPT_BUCKET) * PROMPT_BUCKET
    row_width = model.heads_config.k if isinstance(model, SpeLLM) else 1  # symbols per step
    s = DecodeState(
        cache=KVCache.zeros(config, batch, capacity, dtype=dtype),
        key_valid=jnp.zeros((batch, capacity), bool), hidden=jnp.zeros((batch, config.hidden_size),
                                                                       dtype),
        positions=jnp.zeros((batch,), jnp.int32), slot=jnp.asarray(0, jnp.int32),
        tokens=jnp.full((batch, max_new_tokens + row_width + 1), -1, jnp.int32),
        num_tokens=jnp.zeros((batch,), jnp.int32), done=jnp.zeros((batch,), bool),
        step_tokens=jnp.zeros((batch,), jnp.int32),
        step_rows=jnp.zeros((batch, row_width), jnp.int32),
        needs_host=jnp.zeros((batch,), bool), key=jax.random.key(seed))
    eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
    s = _feed(graphdef, state, s, jnp.asarray(ids), jnp.asarray(mask), eos, record=False)
    while True:
        s = _loop(graphdef, state, s, eos, rule=rule, max_new_tokens=max_new_tokens)
        if not bool(jnp.any(s.needs_host)):
            if not bool(jnp.any(_active(s, max_new_tokens))):
                break
            s = _grow(s, max_new_tokens)  # host chunks (padded to the widest row) filled the cache
            stats["cache_growths"] += 1
            continue
        stats["host_round_trips"] += 1
        chunk_ids, chunk_mask = _host_chunk(s, max_new_tokens, spelling, tokenizer, pad_id)
        if int(s.slot) + chunk_ids.shape[1] + 1 > s.key_valid.shape[1]:
            s = _grow(s, max(chunk_ids.shape[1] + 1, max_new_tokens))
            stats["cache_growths"] += 1
        s = _feed(graphdef, state, s, jnp.asarray(chunk_ids), jnp.asarray(chunk_mask), eos,
                  record=True)
    tokens, counts = np.asarray(s.tokens), np.asarray(s.num_tokens)
    outputs = []
    for row in range(batch):
        new = tokens[row, :min(counts[row], max_new_tokens)].tolist()
        outputs.append(new)
    return outputs
