"""Token streams to fixed-length training rows: documents joined by EOS, cut into `[N, seq_len]`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from spellm_jax import tokenizers


class Packed(NamedTuple):
    """`tokens [N, seq_len]` int32 and `loss_mask [N, seq_len]` bool (False only on padding)."""

    tokens: np.ndarray
    loss_mask: np.ndarray


def tokenize_documents(texts: Sequence[str], tokenizer: Any) -> list[np.ndarray]:
    """Input ids of each text (no special tokens added), as int32 arrays."""
    if not texts:
        return []
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return [np.asarray(ids, np.int32) for ids in encoded]


def pack_ids(sequences: Sequence[Sequence[int] | np.ndarray], seq_len: int, separator: int | None,
             pad_id: int = 0) -> Packed:
    """Concatenates the id sequences, `separator` between consecutive ones (none after one that
    already ends with it; none at all for `separator=None`), and cuts the stream into rows of
    `seq_len`; the last row is padded with `pad_id` and masked out there."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len}; rows need at least one token.")
    arrays = [array for array in (np.asarray(seq, np.int64).reshape(-1) for seq in sequences)
              if array.size]
    if not arrays:
        raise ValueError("nothing to pack: every sequence is empty.")
    stream = np.concatenate(arrays)
    if separator is not None and len(arrays) > 1:
        ends = np.cumsum([array.size for array in arrays])[:-1]  # where each sequence but the last ends
        stream = np.insert(stream, ends[stream[ends - 1] != separator], separator)
    if stream.min() < 0 or stream.max() > np.iinfo(np.int32).max:
        raise ValueError("token ids must be non-negative int32 values.")
    num_rows = -(-stream.size // seq_len)
    tokens = np.full(num_rows * seq_len, pad_id, np.int32)
    tokens[:stream.size] = stream
    loss_mask = np.arange(num_rows * seq_len) < stream.size
    return Packed(tokens.reshape(num_rows, seq_len), loss_mask.reshape(num_rows, seq_len))


def pack_documents(texts: Sequence[str], tokenizer: Any, seq_len: int, eos_id: int | None = None,
                   pad_id: int | None = None) -> Packed:
    """Tokenizes `texts` and packs them with the EOS id between documents (see `pack_ids`).

    `eos_id` and `pad_id` default to the tokenizer's EOS and padding (`tokenizers.pad_id`) ids.
    """
    eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
    if eos_id is None:
        raise ValueError("the tokenizer has no EOS token; pass eos_id to separate documents.")
    pad_id = tokenizers.pad_id(tokenizer) if pad_id is None else pad_id
    return pack_ids(tokenize_documents(texts, tokenizer), seq_len, eos_id, pad_id)
