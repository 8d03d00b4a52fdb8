"""From emitted strings back to input ids: the spelling table together with its tokenizer."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from spellm_jax.spelling.table import SpellingTable

# How an emitted string that is not one token becomes input ids: "device", greedy longest match
# over the tokens' spellings (on device while decoding, no host round trip), or "tokenizer", the
# tokenizer's own ids for the text where they spell it (a host round trip per such string).
RESPELL_MODES = ("device", "tokenizer")


class Respeller:
    """Maps byte strings and emitted rows of symbols to input ids of `spelling`'s vocabulary.

    A string that is one token's spelling becomes that token; otherwise (`respell="tokenizer"`)
    the tokenizer's own ids for it when they spell it exactly (`tokenizer` may be None), else a
    greedy longest match over the spellings, which is all `respell="device"` uses.
    """

    def __init__(self, spelling: SpellingTable, tokenizer: Any = None):
        self.spelling, self.tokenizer = spelling, tokenizer

    @functools.cached_property
    def _ids_by_spelling(self) -> dict[bytes, tuple[int, ...]]:
        """Non-special tokens by full spelling, each group in order of preference."""
        fallback = set(self.spelling.byte_fallback_ids)
        groups: dict[bytes, list[int]] = {}
        for token_id, spelled in enumerate(self.spelling.spellings):
            if spelled:
                groups.setdefault(spelled, []).append(token_id)
        return {spelled: tuple(sorted(ids, key=lambda i: (i in fallback, i)))
                for spelled, ids in groups.items()}

    def ids_for_bytes(self, data: bytes) -> list[int]:
        """Input ids whose spellings concatenate to exactly `data` (ValueError if none can)."""
        data = bytes(data)
        if not data:
            return []
        group = self._ids_by_spelling.get(data)
        if group and len(group) == 1:
            return [group[0]]
        encoded = self._tokenizer_ids(data)
        if group:
            return encoded if len(encoded) == 1 and encoded[0] in group else [group[0]]
        if encoded and self._spells(encoded, data):
            return encoded
        return self._greedy_ids(data)

    def ids_for_bytes_lossy(self, data: bytes) -> list[int]:
        """Like `ids_for_bytes`, but bytes that no sequence of tokens can spell are dropped
        (SmolLM2 has no token for 21 byte values) instead of refused."""
        ids: list[int] = []
        while data:
            consumed = 1  # when no prefix can be spelled, the first byte is dropped
            for end in range(len(data), 0, -1):
                try:
                    ids += self.ids_for_bytes(data[:end])
                except ValueError:
                    continue
                consumed = end
                break
            data = data[consumed:]
        return ids

    def ids_for_row(self, symbols: Iterable[int] | np.ndarray, respell: str = "tokenizer"
                    ) -> list[int]:
        """Input ids for an emitted row of symbols: its token when it spells one, else its bytes
        (lossily: bytes no token can spell are dropped) by the `respell` mode, followed by the
        special token that ended them. `"device"` is the host twin of `DeviceSpelling.segment`."""
        if respell not in RESPELL_MODES:
            raise ValueError(f"respell={respell!r}; choose one of {', '.join(RESPELL_MODES)}.")
        if (token := self.spelling.token_for_row(symbols)) is not None:
            return [token]
        text, special = self.spelling.unspell(symbols)
        ids = (self._greedy_ids(text, drop_unspellable=True) if respell == "device"
               else self.ids_for_bytes_lossy(text))
        return ids + ([] if special is None else [special])

    def _spells(self, ids: Sequence[int], data: bytes) -> bool:
        """Whether `ids` are non-special tokens whose spellings concatenate to `data`."""
        spelling = self.spelling
        if any(not 0 <= i < spelling.vocab_size or i in spelling.special_ids for i in ids):
            return False
        return b"".join(spelling.spellings[i] for i in ids) == data

    def _greedy_ids(self, data: bytes, drop_unspellable: bool = False) -> list[int]:
        """Greedy longest match of `data` over the spellings; a byte that starts none is an
        error, or dropped."""
        index, ids, start = self._ids_by_spelling, [], 0
        while start < len(data):
            for end in range(min(len(data), start + self.spelling.longest_spelling), start, -1):
                if group := index.get(data[start:end]):
                    ids.append(group[0])
                    start = end
                    break
            else:
                if drop_unspellable:
                    start += 1
                    continue
                raise ValueError(
                    f"byte 0x{data[start]:02x} (offset {start}) is not the start of any token's "
                    f"spelling in this {self.spelling.kind} vocabulary, so the text cannot be mapped "
                    "to input ids.")
        return ids

    def _tokenizer_ids(self, data: bytes) -> list[int]:
        """The tokenizer's ids for `data` as text (no special tokens added); [] without a
        tokenizer or when `data` is not UTF-8."""
        if self.tokenizer is None:
            return []
        try:
            text = data.decode()
        except UnicodeDecodeError:
            return []
        return list(self.tokenizer.encode(text, add_special_tokens=False))
