"""The spelling table on device: its arrays, the symbol sums and gathers over them, and the map
from a spelled row of k symbols to the vocabulary token with that spelling.

Rows are hashed (FNV-1a over symbols, uint32); the canonical tokens' hashes are sorted once, and a
query is a `searchsorted` plus an exact comparison with at most `HASH_WINDOW` candidate rows, so
hash collisions never produce a wrong token and in-vocabulary strings never leave the device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spellm_jax.spelling.pieces import NUM_BYTE_SYMBOLS
from spellm_jax.spelling.table import SpellingTable
from spellm_jax.spelling.trie import PrefixTrie

HASH_WINDOW = 4  # most rows sharing one hash value that a query can tell apart
_EMPTY = np.uint32(0xFFFFFFFF)


class SpellingConstant(nnx.Variable):
    """An array derived from the spelling table; not trained and not checkpointed (the table is
    rebuilt from its file and checked by its hash)."""


def canonical_rows(symbols: jax.Array, pad: int) -> jax.Array:
    """Sets every symbol after the first PAD to PAD (the form rows of the spelling table have)."""
    after_pad = jnp.cumsum(symbols == pad, axis=-1) > 0
    return jnp.where(after_pad, pad, symbols)


def row_hashes(rows: jax.Array) -> jax.Array:
    """uint32 FNV-1a hash of each row of symbols `[..., k]`."""
    rows = jnp.asarray(rows).astype(jnp.uint32)
    h = jnp.full(rows.shape[:-1], 2166136261, jnp.uint32)
    for i in range(rows.shape[-1]):
        h = (h ^ rows[..., i]) * jnp.uint32(16777619)
    return h


def sorted_row_hashes(table: np.ndarray, canonical: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted hashes `[V]` of the canonical rows and their token ids `[V]` (padding: hash
    0xFFFFFFFF, id -1)."""
    ids = np.flatnonzero(canonical).astype(np.int32)
    hashes = np.asarray(row_hashes(table[ids]))
    order = np.argsort(hashes, kind="stable")
    hashes, ids = hashes[order], ids[order]
    if len(hashes):
        _, run_lengths = np.unique(hashes, return_counts=True)
        if run_lengths.max() > HASH_WINDOW:
            raise ValueError(f"{run_lengths.max()} spellings share one hash; raise HASH_WINDOW.")
    pad = len(table) - len(ids)
    return (np.concatenate([hashes, np.full(pad, _EMPTY, np.uint32)]),
            np.concatenate([ids, np.full(pad, -1, np.int32)]))


class DeviceSpelling(nnx.Module):
    """`table` `[V, k]`, `valid` and `lengths` `[V]`, the sorted row hashes with their token ids,
    and the vocabulary's prefix trie (`spelling.trie.PrefixTrie`), built once from a
    SpellingTable and used by the model, the loss, decoding and evaluation."""

    def __init__(self, vocab_size: int, k: int, num_symbols: int):
        """Placeholder arrays of the right shapes (every row PAD, nothing valid); `of` fills them."""
        self.k, self.num_symbols, self.trie_count = k, num_symbols, 0
        self.table = SpellingConstant(jnp.full((vocab_size, k), num_symbols - 1, jnp.int32))
        self.valid = SpellingConstant(jnp.zeros((vocab_size,), bool))
        self.lengths = SpellingConstant(jnp.zeros((vocab_size,), jnp.int32))
        self.hashes = SpellingConstant(jnp.full((vocab_size,), _EMPTY, jnp.uint32))
        self.ids = SpellingConstant(jnp.full((vocab_size,), -1, jnp.int32))
        self.trie_rows = SpellingConstant(jnp.full((vocab_size, k), num_symbols, jnp.int32))
        self.trie_tokens = SpellingConstant(jnp.full((vocab_size,), -1, jnp.int32))
        self.trie_allowed_bits = SpellingConstant(
            jnp.zeros((k, vocab_size, (num_symbols + 7) // 8), jnp.uint8))
        self.trie_child_starts = SpellingConstant(jnp.zeros((k, vocab_size + 1), jnp.int32))

    @classmethod
    def of(cls, spelling: SpellingTable) -> DeviceSpelling:
        table = np.asarray(spelling.table, np.int32)
        hashes, ids = sorted_row_hashes(table, np.asarray(spelling.canonical))
        trie = PrefixTrie.of(spelling)
        device = cls(spelling.vocab_size, spelling.k, spelling.num_symbols)
        device.trie_count = trie.count
        for name, value in (("table", table), ("valid", spelling.valid),
                            ("lengths", np.asarray(spelling.lengths, np.int32)),
                            ("hashes", hashes), ("ids", ids), ("trie_rows", trie.rows),
                            ("trie_tokens", trie.tokens),
                            ("trie_allowed_bits", trie.allowed),
                            ("trie_child_starts", trie.child_starts)):
            getattr(device, name).set_value(jnp.asarray(value))
        return device

    @property
    def pad_symbol(self) -> int:
        return self.num_symbols - 1

    def rows_of(self, tokens: jax.Array) -> jax.Array:
        """The table rows `[..., k]` of token ids `[...]`."""
        return self.table[...][tokens]

    def lookup(self, rows: jax.Array) -> jax.Array:
        """Token id of each row `[..., k]` (read as cut at its first PAD), or -1 where no
        vocabulary token is spelled so."""
        rows = canonical_rows(rows, self.pad_symbol)
        table, sorted_hashes, sorted_ids = self.table[...], self.hashes[...], self.ids[...]
        hashes = row_hashes(rows)
        start = jnp.searchsorted(sorted_hashes, hashes)
        candidates = jnp.clip(start[..., None] + jnp.arange(HASH_WINDOW), 0, len(sorted_ids) - 1)
        ids = sorted_ids[candidates]
        same = (sorted_hashes[candidates] == hashes[..., None]) & (ids >= 0)
        same &= jnp.all(table[jnp.maximum(ids, 0)] == rows[..., None, :], axis=-1)
        return jnp.where(jnp.any(same, axis=-1),
                         jnp.take_along_axis(ids, jnp.argmax(same, axis=-1)[..., None], -1)[..., 0],
                         -1)

    def segment(self, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Input ids `[..., k + 1]` and their count `[...]` whose spellings concatenate to each
        row's bytes (those before its first PAD or special symbol), by greedy longest match over
        the tokens spelled in full; a byte that starts no token's spelling is dropped, and the
        special symbol that ended the bytes adds its token. The on-device twin of
        `Respeller.ids_for_row(row, respell="device")`: no host round trip for strings that are
        not one token."""
        k, pad = self.k, self.pad_symbol
        lead = rows.shape[:-1]
        rows = canonical_rows(rows, pad).reshape(-1, k)
        n = jnp.sum(jnp.cumprod(rows < NUM_BYTE_SYMBOLS, axis=-1), axis=-1)  # [N] bytes
        offsets = jnp.arange(k)
        prefix = offsets[None, :] <= offsets[:, None]  # [L, j]: symbol j in the prefix of L + 1

        def longest_match(_, carry):
            start, ids, count = carry
            window = jnp.take_along_axis(rows, jnp.minimum(start[:, None] + offsets, k - 1), -1)
            window = jnp.where(start[:, None] + offsets < n[:, None], window, pad)
            candidates = self.lookup(jnp.where(prefix, window[:, None, :], pad))  # [N, L]
            fits = ((candidates >= 0) & (offsets + 1 <= (n - start)[:, None])
                    & (self.lengths[...][jnp.maximum(candidates, 0)] == offsets + 1))
            longest = k - 1 - jnp.argmax(fits[:, ::-1], axis=-1)
            found, live = jnp.any(fits, axis=-1), start < n
            token = jnp.take_along_axis(candidates, longest[:, None], -1)[:, 0]
            write = live & found
            ids = ids.at[jnp.arange(len(ids)), jnp.where(write, count, k + 1)].set(
                token, mode="drop")
            return (jnp.where(live, start + jnp.where(found, longest + 1, 1), start), ids,
                    count + write)

        empty = jnp.full((len(rows), k + 1), -1, jnp.int32)
        zeros = jnp.zeros(len(rows), jnp.int32)
        _, ids, count = jax.lax.fori_loop(0, k, longest_match, (zeros, empty, zeros))
        ender = jnp.take_along_axis(rows, jnp.minimum(n, k - 1)[:, None], -1)[:, 0]
        special = self.lookup(jnp.full_like(rows, pad).at[:, 0].set(ender))
        ended = (n < k) & (ender != pad)
        ids = ids.at[jnp.arange(len(ids)), jnp.where(ended, count, k + 1)].set(special, mode="drop")
        count = count + ended
        return ids.reshape(*lead, k + 1), count.reshape(lead)

    def trie_allowed(self, depth: int | jax.Array, lo: jax.Array) -> jax.Array:
        """bool `[..., C]`: the symbols that can follow the prefix nodes starting at trie rows
        `lo` `[...]`, at position `depth`."""
        bits = self.trie_allowed_bits[...][depth][lo]  # [..., ceil(C / 8)]
        return jnp.unpackbits(bits, axis=-1, bitorder="little")[..., :self.num_symbols] > 0

    def trie_narrow(self, depth: int | jax.Array, lo: jax.Array, hi: jax.Array, symbol: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
        """The trie ranges `[lo, hi)` of the prefixes extended by `symbol` at `depth` (shapes
        broadcast together): a binary search within each range of the (there sorted) column."""
        return (self.trie_lower_bound(depth, lo, hi, symbol),
                self.trie_lower_bound(depth, lo, hi, symbol + 1))

    def trie_lower_bound(self, depth: int | jax.Array, lo: jax.Array, hi: jax.Array, value: jax.Array
                         ) -> jax.Array:
        """The first trie row in `[lo, hi)` whose symbol at `depth` is at least `value` (`hi` if
        none), for rows whose first `depth` symbols are shared (so that column is sorted)."""
        column = self.trie_rows[...][:, depth]
        shape = jnp.broadcast_shapes(lo.shape, hi.shape, jnp.shape(value))

        def halve(_, bounds):
            start, stop = bounds
            mid = (start + stop) // 2
            right = (start < stop) & (column[jnp.minimum(mid, len(column) - 1)] < value)
            return jnp.where(right, mid + 1, start), jnp.where(right | (start >= stop), stop, mid)

        iterations = max(1, int(np.ceil(np.log2(len(column) + 1))))
        bounds = (jnp.broadcast_to(lo, shape), jnp.broadcast_to(hi, shape))
        return jax.lax.fori_loop(0, iterations, halve, bounds)[0]

    def symbol_marginals(self, token_weights: jax.Array) -> jax.Array:
        """`q_i(c) = Σ_{v: spell(v)_i = c} p(v)` for token weights `[..., V]` proportional to
        `p`: a segment-sum over the table, normalised per head, giving `[..., k, C]`. Among
        factorized distributions `∏_i q_i`, these marginals minimise `KL(p ‖ ∏_i q_i)`."""
        table = self.table[...]
        lead = token_weights.shape[:-1]
        flat = token_weights.reshape(-1, token_weights.shape[-1]).T  # [V, N]
        per_head = [jax.ops.segment_sum(flat, table[:, i], num_segments=self.num_symbols)
                    for i in range(self.k)]  # k x [C, N]
        marginals = jnp.stack(per_head).transpose(2, 0, 1)
        marginals = marginals / jnp.maximum(marginals.sum(-1, keepdims=True), 1e-30)
        return marginals.reshape(*lead, self.k, self.num_symbols)

    def token_scores(self, symbol_scores: jax.Array) -> jax.Array:
        """`Σ_i s_i(spell(v)_i)` for every token v: `[..., k, C]` -> `[..., V]`, -inf for rows that
        spell no token. k gathers of V symbols (one per head) summed in place: one gather of
        `[V, k]` indices would materialise a `[..., V, k]` temporary (1.7 GB for 4 x 128
        positions of SmolLM2)."""
        table = self.table[...]
        scores = sum(jnp.take(symbol_scores[..., i, :], table[:, i], axis=-1) for i in range(self.k))
        return jnp.where(self.valid[...], scores, -jnp.inf)
