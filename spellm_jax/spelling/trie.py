"""The vocabulary as a prefix trie over table rows, for decoding symbol by symbol into exactly one
token: the canonical rows in lexicographic order (every prefix is a contiguous range of them) and,
per depth, the symbols that can follow each prefix. Plain numpy, so the PyTorch side shares it."""

from __future__ import annotations

import dataclasses

import numpy as np

from spellm_jax.spelling.table import SpellingTable


@dataclasses.dataclass(frozen=True)
class PrefixTrie:
    """`rows` `[V, k]`: the valid tokens' rows sorted lexicographically (PAD, the largest symbol,
    sorts last; tokens that share a row, truncated ones, side by side), then filler rows of C
    (past every symbol); `tokens` `[V]`: their ids (-1 for filler). A prefix of length i is the
    range `[lo, hi)` of rows that start with it, and `allowed` `[k, V, ceil(C / 8)]` (bits,
    little-endian) holds at `[i, lo]` the symbols that some row of that range has at position i.
    `child_starts` `[k, V + 1]` lists at `[i]` the first rows of the prefixes of length i + 1, in
    order, then `count` (so a prefix's children are a contiguous run of that list, and each ends
    where the next begins)."""

    rows: np.ndarray
    tokens: np.ndarray
    count: int  # rows that are tokens
    allowed: np.ndarray
    child_starts: np.ndarray
    num_symbols: int

    @classmethod
    def of(cls, spelling: SpellingTable) -> PrefixTrie:
        ids = np.flatnonzero(spelling.valid)
        table = spelling.table[ids]
        order = np.lexsort(table.T[::-1])  # column 0 most significant
        ids, table = ids[order], table[order]
        count, vocab_size, k, c = len(ids), spelling.vocab_size, spelling.k, spelling.num_symbols
        rows = np.full((vocab_size, k), c, np.int32)
        rows[:count] = table
        tokens = np.full(vocab_size, -1, np.int32)
        tokens[:count] = ids
        allowed = np.zeros((k, vocab_size, (c + 7) // 8), np.uint8)
        child_starts = np.full((k, vocab_size + 1), count, np.int32)
        index = np.arange(count)
        new_prefix = index == 0  # row j starts a new prefix of length i (length 0: only row 0)
        for i in range(k):
            node_start = np.maximum.accumulate(np.where(new_prefix, index, 0))
            bits = np.zeros((vocab_size, c), bool)
            bits[node_start, table[:, i]] = True
            allowed[i] = np.packbits(bits, axis=1, bitorder="little")
            if count:
                new_prefix = new_prefix | np.concatenate([[True], table[1:, i] != table[:-1, i]])
            starts = np.flatnonzero(new_prefix)
            child_starts[i, :len(starts)] = starts
        return cls(rows, tokens, count, allowed, child_starts, c)

    def allowed_symbols(self, depth: int, lo: int) -> np.ndarray:
        """bool `[C]`: the symbols that can follow the prefix node starting at row `lo`."""
        bits = np.unpackbits(self.allowed[depth, lo], bitorder="little")
        return bits[:self.num_symbols].astype(bool)

    def narrow(self, depth: int, lo: int, hi: int, symbol: int) -> tuple[int, int]:
        """The range of the prefix extended by `symbol` at `depth`."""
        column = self.rows[lo:hi, depth]
        return (lo + int(np.searchsorted(column, symbol, "left")),
                lo + int(np.searchsorted(column, symbol, "right")))
