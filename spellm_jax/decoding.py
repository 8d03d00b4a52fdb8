"""Batched KV-cache decoding: one compiled prefill, one compiled on-device loop, pluggable output rule.

An output rule maps the final hidden state of each row to its next input token. The LM-head rule
is the baseline; the character-decoder rules of SpeLLM plug into the same loop.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from spellm_jax import sharding, tokenizers
from spellm_jax.models.llama import KVCache
from spellm_jax.sampling import GREEDY, Sampling, sample
from spellm_jax.spelling import RESPELL_MODES, Respeller

PROMPT_BUCKET = 16  # prompts are left-padded to a multiple of this, so lengths share compilations


class OutputRule:
    """Maps hidden states `[B, d]` to `(next token ids [B], spelled rows [B, row_width])`; a
    token id of -1 asks the host (`host_ids`) to turn that row's string into input ids. Rules
    are frozen dataclasses: they are static arguments of the compiled loop, compared by their
    settings only."""

    segments_on_device = False  # whether strings that are not one token become ids on device

    def row_width(self, model: nnx.Module) -> int:
        """Symbols per emitted row (1 for rules that emit no rows)."""
        del model
        return 1

    def __call__(self, model: nnx.Module, hidden: jax.Array, key: jax.Array
                 ) -> tuple[jax.Array, jax.Array | None]:
        raise NotImplementedError

    def host_ids(self, row: np.ndarray) -> list[int]:
        """Input ids for an emitted row that is not one token."""
        raise ValueError(f"{type(self).__name__} emitted a string that is not one token.")


@dataclasses.dataclass(frozen=True)
class LMHeadRule(OutputRule):
    """The ordinary output layer: logits over the vocabulary from `model.lm_logits`."""

    sampling: Sampling = GREEDY

    def __call__(self, model, hidden, key):
        return sample(model.lm_logits(hidden), key, self.sampling), None


class _SpelledRule(OutputRule):
    def row_width(self, model: nnx.Module) -> int:
        return model.heads_config.k


@dataclasses.dataclass(frozen=True)
class FreeRule(_SpelledRule):
    """SpeLLM free decoding: the decoder chooses a row of symbols (the best of `beam` strings
    where it searches); the string (cut at the first PAD) is looked up on device. A string that
    is not one token becomes several input ids by `respell` (`spelling.RESPELL_MODES`): on
    device ("device", fed one per step of the loop) or through the `respeller`'s tokenizer on
    the host ("tokenizer")."""

    sampling: Sampling = GREEDY
    respeller: Respeller | None = dataclasses.field(default=None, compare=False)
    beam: int = 1
    respell: str = "device"

    def __post_init__(self):
        if self.respell not in RESPELL_MODES:
            raise ValueError(f"respell={self.respell!r}; choose one of {', '.join(RESPELL_MODES)}.")

    @property
    def segments_on_device(self) -> bool:
        return self.respell == "device"

    def __call__(self, model, hidden, key):
        rows = model.choose(hidden, key, self.sampling, beam=self.beam)  # [B, k]
        return model.spelling.lookup(rows), rows

    def host_ids(self, row: np.ndarray) -> list[int]:
        if self.respeller is None:
            raise ValueError("free decoding emitted a string that is not one token; give FreeRule "
                             "a Respeller (spelling table and tokenizer) to map it to input ids.")
        return self.respeller.ids_for_row(row, self.respell)


@dataclasses.dataclass(frozen=True)
class VocabRule(_SpelledRule):
    """SpeLLM vocabulary-constrained decoding: the decoder's choice among the rows of vocabulary
    tokens only (the best-scored token, or the best of `beam` strings in the prefix trie)."""

    sampling: Sampling = GREEDY
    beam: int = 1

    def __call__(self, model, hidden, key):
        rows = model.choose(hidden, key, self.sampling, constrained=True, beam=self.beam)
        return model.spelling.lookup(rows), rows


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
    queue: jax.Array  # [B, k + 1] input ids of a string segmented on device, fed one per step
    queue_head: jax.Array  # [B] the next of them to feed
    queue_size: jax.Array  # [B]
    key: jax.Array


def _left_aligned(rows: Sequence[Sequence[int]], width: int, pad_id: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """`[B, width]` ids with each row's ids at the right end, and the mask of real ids."""
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for index, row in enumerate(rows):
        if len(row):
            ids[index, width - len(row):] = row
            mask[index, width - len(row):] = True
    return ids, mask


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, bucket: int = PROMPT_BUCKET
             ) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded `[B, P]` ids and mask, P rounded up to a multiple of `bucket`."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token; got an empty prompt.")
    return _left_aligned(prompts, -(-max(len(p) for p in prompts) // bucket) * bucket, pad_id)


def _feed(model, s: DecodeState, ids, mask, eos_ids, *, record: bool) -> DecodeState:
    """Writes a left-padded chunk `[B, m]` into the cache; the last real token of each row gives
    its next hidden state. `record` appends the chunk's real ids to the generated tokens."""
    batch, m = ids.shape
    positions = s.positions[:, None] + jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    key_valid = jax.lax.dynamic_update_slice_in_dim(s.key_valid, mask, s.slot, 1)
    hidden, cache = model.model(ids, positions=positions, attention_mask=mask, cache=s.cache,
                                write_index=s.slot, key_valid=key_valid)
    count = mask.sum(-1).astype(jnp.int32)
    tokens, num_tokens, done, queue_head = s.tokens, s.num_tokens, s.done, s.queue_head
    if record:
        queue_head = jnp.where((count > 0) & (queue_head < s.queue_size), queue_head + 1,
                               queue_head)
        limit = tokens.shape[1]
        columns = jnp.where(mask, num_tokens[:, None] + jnp.cumsum(mask, axis=-1) - 1, limit)
        tokens = tokens.at[jnp.arange(batch)[:, None], columns].set(ids, mode="drop")
        num_tokens = num_tokens + count
        done = done | jnp.any(mask & jnp.isin(ids, eos_ids), axis=-1)
    return s.replace(cache=cache, key_valid=key_valid,
                     hidden=jnp.where((count > 0)[:, None], hidden[:, -1], s.hidden),
                     positions=s.positions + count, slot=s.slot + m, tokens=tokens,
                     num_tokens=num_tokens, done=done, needs_host=jnp.zeros_like(s.needs_host),
                     queue_head=queue_head)


@functools.partial(jax.jit, static_argnames=("graphdef", "record"), donate_argnames=("s",))
def _feed_chunk(graphdef, state, s: DecodeState, ids, mask, eos_ids, *, record: bool
                ) -> DecodeState:
    """`_feed`, compiled: the prompts, and the ids the host made of strings."""
    return _feed(nnx.merge(graphdef, state), s, ids, mask, eos_ids, record=record)


def _active(s: DecodeState, max_new_tokens: int) -> jax.Array:
    """Rows `[B]` still generating: no EOS yet and fewer than `max_new_tokens` tokens."""
    return ~s.done & (s.num_tokens < max_new_tokens)


def _choose(model, rule: OutputRule, s: DecodeState, max_new_tokens: int) -> DecodeState:
    """Every row's next token, held in `step_tokens` / `step_rows` until it is fed: the next
    queued id of a string segmented on device, else the rule's choice from the row's hidden
    state. Active rows whose string is not one token are segmented on device where the rule
    does that (their queue starts), else (or when nothing of it can be spelled) marked for the
    host. Choosing again before feeding chooses the same."""
    key, step_key = jax.random.split(s.key)
    token, rows = rule(model, s.hidden, step_key)
    rows = s.step_rows if rows is None else rows.astype(jnp.int32)
    active = _active(s, max_new_tokens)
    queue, head, size = s.queue, s.queue_head, s.queue_size
    if rule.segments_on_device:
        fresh = active & (head >= size) & (token < 0)
        segmented, count = jax.lax.cond(
            jnp.any(fresh), model.spelling.segment,
            lambda r: (jnp.full(queue.shape, -1, jnp.int32), jnp.zeros_like(size)), rows)
        queue = jnp.where(fresh[:, None], segmented, queue)
        head, size = jnp.where(fresh, 0, head), jnp.where(fresh, count, size)
    queued = head < size
    token = jnp.where(queued, jnp.take_along_axis(queue, head[:, None], -1)[:, 0], token)
    return s.replace(step_tokens=token, step_rows=rows, needs_host=active & (token < 0),
                     queue=queue, queue_head=head, queue_size=size, key=key)


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
        return _step(model, rule, s, eos_ids, max_new_tokens)

    return jax.lax.while_loop(cond, body, _choose(model, rule, s, max_new_tokens))


def _step(model, rule: OutputRule, s: DecodeState, eos_ids, max_new_tokens: int) -> DecodeState:
    """One token of the loop: feed the tokens chosen before, then choose the next ones."""
    s = _feed(model, s, s.step_tokens[:, None], _active(s, max_new_tokens)[:, None], eos_ids,
              record=True)
    return _choose(model, rule, s, max_new_tokens)


def decode_step(graphdef, state, s: DecodeState, eos_ids, *, rule: OutputRule,
                max_new_tokens: int) -> DecodeState:
    """One step of the compiled loop as a function of its own (`jax.jit` it to cost one token,
    e.g. ahead of time for a TPU)."""
    return _step(nnx.merge(graphdef, state), rule, s, eos_ids, max_new_tokens)


def _host_chunk(s: DecodeState, max_new_tokens: int, rule: OutputRule, pad_id: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """The next input ids of every row after a stop for the host: device-picked tokens as they
    are, strings that are not one token through `rule.host_ids` (possibly several ids)."""
    tokens, rows = _to_host(s.step_tokens), _to_host(s.step_rows)
    active = _to_host(_active(s, max_new_tokens))
    pending: list[list[int]] = []
    for row in range(len(tokens)):
        if not active[row]:
            pending.append([])
        elif tokens[row] >= 0:
            pending.append([int(tokens[row])])
        else:
            ids = rule.host_ids(rows[row])
            if not ids:  # the symbol mask keeps PAD from coming first, so this is a bug
                raise RuntimeError(f"row {row} emitted an empty string: {rows[row].tolist()}")
            pending.append(ids)
    width = max(1, max(len(p) for p in pending))
    width = 1 << (width - 1).bit_length()  # power-of-two widths share compilations
    return _left_aligned(pending, width, pad_id)


def _grow(s: DecodeState, extra: int) -> DecodeState:
    """A copy of the state whose cache has `extra` more slots."""
    return s.replace(cache=s.cache.grow(extra), key_valid=jnp.pad(s.key_valid, ((0, 0), (0, extra))))


@dataclasses.dataclass(frozen=True)
class Generation:
    """What `generate` produced: the new token ids of each prompt (ending with the EOS id if one
    was produced), the stops of the on-device loop for strings that are not one token, and how
    often the cache had to grow."""

    tokens: list[list[int]]
    host_round_trips: int = 0
    cache_growths: int = 0


def initial_state(model: nnx.Module, rule: OutputRule, batch: int, capacity: int,
                  max_new_tokens: int, seed: int = 0) -> DecodeState:
    """An empty decode state: a cache of `capacity` slots, nothing generated yet."""
    config, dtype = model.config, model.options.dtype
    row_width = rule.row_width(model)
    return DecodeState(
        cache=KVCache.zeros(config, batch, capacity, dtype=dtype),
        key_valid=jnp.zeros((batch, capacity), bool), hidden=jnp.zeros((batch, config.hidden_size),
                                                                       dtype),
        positions=jnp.zeros((batch,), jnp.int32), slot=jnp.asarray(0, jnp.int32),
        tokens=jnp.full((batch, max_new_tokens + row_width + 1), -1, jnp.int32),
        num_tokens=jnp.zeros((batch,), jnp.int32), done=jnp.zeros((batch,), bool),
        step_tokens=jnp.zeros((batch,), jnp.int32),
        step_rows=jnp.zeros((batch, row_width), jnp.int32),
        needs_host=jnp.zeros((batch,), bool),
        queue=jnp.full((batch, row_width + 1), -1, jnp.int32),
        queue_head=jnp.zeros((batch,), jnp.int32), queue_size=jnp.zeros((batch,), jnp.int32),
        key=jax.random.key(seed))


def mesh_of(model: nnx.Module) -> Mesh | None:
    """The mesh a model's parameters are laid out on (None for a model on one device)."""
    leaf = jax.tree.leaves(nnx.state(model, nnx.Param))[0]
    layout = getattr(leaf, "sharding", None)
    return layout.mesh if isinstance(layout, NamedSharding) else None


def _row_axes(batch: int, mesh: Mesh) -> tuple[str | None, ...]:
    """The logical axes of a batch's rows: split over `batch` where it divides, else whole on
    every device (a batch of one prompt)."""
    return ("batch",) if batch % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0 else (None,)


def _batch_sharded_state(model: nnx.Module, rule: OutputRule, batch: int, capacity: int,
                         max_new_tokens: int, seed: int, mesh: Mesh) -> DecodeState:
    """`initial_state` made directly on `mesh`, every per-row array split over the rules'
    `batch` axes (the cache's second axis), the slot and the key replicated."""
    make = functools.partial(initial_state, model, rule, batch, capacity, max_new_tokens, seed)
    rows = sharding.logical_to_spec(_row_axes(batch, mesh))
    per_row = jax.tree.map(lambda _: NamedSharding(mesh, rows), jax.eval_shape(make))
    cache = NamedSharding(mesh, PartitionSpec(None, *rows))
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = per_row.replace(cache=KVCache(cache, cache), slot=replicated, key=replicated)
    return jax.jit(make, out_shardings=shardings)()


def on_mesh(rows: np.ndarray, mesh: Mesh | None, axes: tuple[str | None, ...] = ("batch",)
            ) -> jax.Array:
    """A host array (the same on every process) as one array on `mesh`, its leading
    dimensions laid out by the logical `axes` (none: replicated)."""
    if mesh is None:
        return jnp.asarray(rows)
    layout = NamedSharding(mesh, sharding.logical_to_spec(axes))
    return jax.make_array_from_callback(rows.shape, layout, lambda index: rows[index])


def _to_host(x: jax.Array) -> np.ndarray:
    """The whole of `x` on this host, gathered from the other processes where it is split."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             rule: OutputRule | None = None, *, eos_ids: Sequence[int] = (), pad_id: int = 0,
             seed: int = 0, mesh: Mesh | None = None) -> Generation:
    """New tokens for each prompt by `rule` (the LM head by default). For speed, pass
    `models.llama.fused_for_inference(model)`. With a `mesh` (the model's parameters already
    on it), the batch is split over its `batch` axes (where their size divides it), every
    process passes the same prompts and gets every continuation; the results equal those of
    one device."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}; ask for at least one new token.")
    rule = rule or LMHeadRule()
    ids, mask = left_pad(prompts, pad_id)
    batch, prompt_len = ids.shape
    rows = None if mesh is None else _row_axes(batch, mesh)
    graphdef, state = nnx.split(model)
    capacity = -(-(prompt_len + max_new_tokens + 1) // PROMPT_BUCKET) * PROMPT_BUCKET
    s = (initial_state(model, rule, batch, capacity, max_new_tokens, seed) if mesh is None else
         _batch_sharded_state(model, rule, batch, capacity, max_new_tokens, seed, mesh))
    eos = on_mesh(np.asarray(list(eos_ids) or [-1], np.int32), mesh, axes=())
    s = _feed_chunk(graphdef, state, s, on_mesh(ids, mesh, rows), on_mesh(mask, mesh, rows), eos,
                    record=False)
    host_round_trips = cache_growths = 0
    while True:
        s = _loop(graphdef, state, s, eos, rule=rule, max_new_tokens=max_new_tokens)
        if not bool(jnp.any(s.needs_host)):
            if not bool(jnp.any(_active(s, max_new_tokens))):
                break
            s = _grow(s, max_new_tokens)  # host chunks (padded to the widest row) filled the cache
            cache_growths += 1
            continue
        host_round_trips += 1
        chunk_ids, chunk_mask = _host_chunk(s, max_new_tokens, rule, pad_id)
        if int(s.slot) + chunk_ids.shape[1] + 1 > s.key_valid.shape[1]:
            s = _grow(s, max(chunk_ids.shape[1] + 1, max_new_tokens))
            cache_growths += 1
        s = _feed_chunk(graphdef, state, s, on_mesh(chunk_ids, mesh, rows),
                        on_mesh(chunk_mask, mesh, rows), eos, record=True)
    tokens, counts = _to_host(s.tokens), _to_host(s.num_tokens)
    return Generation([tokens[row, :min(counts[row], max_new_tokens)].tolist()
                       for row in range(batch)], host_round_trips, cache_growths)


def stop_ids(model: nnx.Module, tokenizer) -> list[int]:
    """The ids that end a generation: the model's EOS ids and the tokenizer's."""
    ids = set(model.config.eos_token_ids or ())
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def sampler(model: nnx.Module, tokenizer, rule: OutputRule, new_tokens: int,
            mesh: Mesh | None = None) -> Callable[[list[list[int]], int], list[list[int]]]:
    """`(prompts, seed) -> continuations` of `new_tokens` by `rule`, stopping at `stop_ids`: the
    teacher's self-generation as the data package asks for it (split over `mesh` if given)."""
    eos_ids, pad_id = stop_ids(model, tokenizer), tokenizers.pad_id(tokenizer)

    def continue_prompts(prompts: list[list[int]], seed: int) -> list[list[int]]:
        return generate(model, prompts, new_tokens, rule, eos_ids=eos_ids, pad_id=pad_id,
                        seed=seed, mesh=mesh).tokens

    return continue_prompts


MODES = ("lm_head", "free", "vocab")


def rule_for(mode: str, sampling: Sampling = GREEDY, respeller: Respeller | None = None,
             beam: int = 1, respell: str = "device") -> OutputRule:
    """The output rule of a decoding mode: `lm_head`, SpeLLM `free` (strings that are not one
    token become ids by `respell`: on device, or on the host by `respeller`'s tokenizer) or SpeLLM
    `vocab`; `beam` strings where the decoder searches."""
    if mode == "lm_head":
        return LMHeadRule(sampling)
    if mode == "free":
        return FreeRule(sampling, respeller, beam, respell)
    if mode == "vocab":
        return VocabRule(sampling, beam)
    raise ValueError(f"mode={mode!r}; choose one of {', '.join(MODES)}.")
