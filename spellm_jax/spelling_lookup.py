"""On-device map from a spelled row of k symbols to the vocabulary token with that spelling.

Rows are hashed (FNV-1a over symbols, uint32); the canonical tokens' hashes are sorted once, and a
query is a `searchsorted` plus an exact comparison with at most `HASH_WINDOW` candidate rows, so
hash collisions never produce a wrong token and in-vocabulary strings never leave the device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

HASH_WINDOW = 4  # most rows sharing one hash value that a query can tell apart
_EMPTY = np.uint32(0xFFFFFFFF)


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


def build_lookup(table: np.ndarray, canonical: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted hashes `[V]` and their token ids `[V]` (padding: hash 0xFFFFFFFF, id -1)."""
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


def lookup(rows: jax.Array, table: jax.Array, sorted_hashes: jax.Array, sorted_ids: jax.Array
           ) -> jax.Array:
    """Token id of each canonical row `[..., k]`, or -1 where no vocabulary token spells it."""
    hashes = row_hashes(rows)
    start = jnp.searchsorted(sorted_hashes, hashes)
    candidates = jnp.clip(start[..., None] + jnp.arange(HASH_WINDOW), 0, len(sorted_ids) - 1)
    ids = sorted_ids[candidates]
    same = (sorted_hashes[candidates] == hashes[..., None]) & (ids >= 0)
    same &= jnp.all(table[jnp.maximum(ids, 0)] == rows[..., None, :], axis=-1)
    return jnp.where(jnp.any(same, axis=-1),
                     jnp.take_along_axis(ids, jnp.argmax(same, axis=-1)[..., None], -1)[..., 0],
                     -1)
