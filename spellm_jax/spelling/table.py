"""The SpeLLM alphabet and the `[V, k]` spelling table of a tokenizer's vocabulary: data, hash,
save and load.

Symbols `0..255` are byte values, `256..256+S-1` the special tokens (one symbol each, in token id
order) and the last symbol, `C - 1`, is PAD. A token's spelling is its byte string (see
`spelling.pieces`); a special token is spelled as its one symbol. Rows of the table hold the first
k symbols, PAD-filled.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from spellm_jax.paths import as_path
from spellm_jax.spelling.pieces import (
    KINDS,
    NUM_BYTE_SYMBOLS,
    PIECE_BYTES,
    SPM_BYTE_PIECE,
    tokenizer_kind,
)

MAX_K = 64
FILE_FORMAT = 1
SPELLING_FILE = "spelling_table.json"  # the table's file name in run and export directories


class SpellingTableMismatchError(ValueError):
    """A spelling table that differs from the one a checkpoint or file was made with."""



def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= MAX_K:
        raise ValueError(f"k={k!r} is not allowed: k is the number of symbols spelled per token, at "
                         f"least 1 (a special token needs one symbol) and at most {MAX_K}.")


@dataclasses.dataclass(frozen=True)
class SpellingTable:
    """Spellings of a vocabulary in the SpeLLM alphabet, and the `[vocab_size, k]` table of them."""

    kind: str  # "byte_level" | "sentencepiece"
    k: int
    vocab_size: int  # number of rows (the model's vocabulary size, >= the tokenizer's)
    spellings: tuple[bytes, ...] = dataclasses.field(repr=False)  # b"" for specials and invalid rows
    special_ids: tuple[int, ...] = dataclasses.field(repr=False)  # token ids with their own symbol
    # SentencePiece `<0xNN>` pieces: spelled like other tokens, but never the preferred id of a spelling.
    byte_fallback_ids: tuple[int, ...] = dataclasses.field(default=(), repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}; expected one of {KINDS}.")
        _check_k(self.k)
        if len(self.spellings) != self.vocab_size:
            raise ValueError(f"{len(self.spellings)} spellings for vocab_size={self.vocab_size}.")
        if list(self.special_ids) != sorted(set(self.special_ids)):
            raise ValueError("special_ids must be distinct and in increasing token id order.")
        for ids, what in ((self.special_ids, "special"), (self.byte_fallback_ids, "byte fallback")):
            if any(not 0 <= i < self.vocab_size for i in ids):
                raise ValueError(f"a {what} token id is outside the vocabulary of {self.vocab_size}.")
        if any(self.spellings[i] for i in self.special_ids):
            raise ValueError("special tokens are spelled by their symbol; their byte spelling must be b''.")
        if any(len(self.spellings[i]) != 1 for i in self.byte_fallback_ids):
            raise ValueError("a byte fallback token must be spelled as exactly one byte.")

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, k: int, vocab_size: int | None = None) -> SpellingTable:
        """Spell every token of a transformers tokenizer; rows past `len(tokenizer)` are not spellable.

        `vocab_size` (default `len(tokenizer)`) is the model's vocabulary size. It may be smaller
        than the tokenizer only by trailing added tokens, which such a model cannot emit.
        """
        _check_k(k)
        kind = tokenizer_kind(tokenizer)
        num_tokens = len(tokenizer)
        vocab_size = num_tokens if vocab_size is None else int(vocab_size)
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        if vocab_size < num_tokens and not set(range(vocab_size, num_tokens)) <= set(added):
            raise ValueError(
                f"vocab_size={vocab_size} is smaller than the tokenizer's {num_tokens} tokens; the model "
                "and the tokenizer do not belong together.")
        num_rows = min(num_tokens, vocab_size)
        special = {i for i, token in added.items() if token.special} | set(tokenizer.all_special_ids)
        special_ids = tuple(sorted(i for i in special if 0 <= i < num_rows))
        pieces = tokenizer.convert_ids_to_tokens(list(range(num_rows)))
        piece_bytes = PIECE_BYTES[kind]
        spellings = [b"" if piece is None else piece_bytes(piece) for piece in pieces]
        for i in special_ids:
            spellings[i] = b""
        spellings += [b""] * (vocab_size - num_rows)
        byte_fallback = ()
        if kind == "sentencepiece":
            byte_fallback = tuple(i for i, piece in enumerate(pieces) if piece is not None
                                  and i not in special and SPM_BYTE_PIECE.fullmatch(piece))
        return cls(kind=kind, k=int(k), vocab_size=vocab_size, spellings=tuple(spellings),
                   special_ids=special_ids, byte_fallback_ids=byte_fallback)

    # -- alphabet -----------------------------------------------------------------------------

    @property
    def num_symbols(self) -> int:
        """C: 256 bytes, one symbol per special token, PAD."""
        return NUM_BYTE_SYMBOLS + len(self.special_ids) + 1

    @property
    def pad_symbol(self) -> int:
        return self.num_symbols - 1

    @functools.cached_property
    def _special_symbols(self) -> dict[int, int]:
        return {token: NUM_BYTE_SYMBOLS + n for n, token in enumerate(self.special_ids)}

    @functools.cached_property
    def _special_array(self) -> np.ndarray:
        return np.asarray(self.special_ids, np.intp)

    def special_symbol(self, token_id: int) -> int:
        """The symbol of a special token."""
        if (symbol := self._special_symbols.get(int(token_id))) is None:
            raise ValueError(f"token {token_id} is not a special token of this spelling table.")
        return symbol

    # -- the table ----------------------------------------------------------------------------

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        """int32 `[vocab_size]`: full spelling length in symbols (specials 1, invalid rows 0)."""
        lengths = np.fromiter(map(len, self.spellings), np.int32, self.vocab_size)
        lengths[self._special_array] = 1
        return lengths

    @functools.cached_property
    def valid(self) -> np.ndarray:
        """bool `[vocab_size]`: the row spells a token (False for padding rows and empty pieces)."""
        return self.lengths > 0

    @functools.cached_property
    def table(self) -> np.ndarray:
        """int32 `[vocab_size, k]`: each token's first k symbols, then PAD."""
        table = np.full((self.vocab_size, self.k), self.pad_symbol, np.int32)
        kept = np.minimum(self.lengths, self.k)
        kept[self._special_array] = 0
        symbols = np.frombuffer(b"".join(s[: self.k] for s in self.spellings), np.uint8)
        rows = np.repeat(np.arange(self.vocab_size), kept)
        starts = np.cumsum(kept) - kept
        table[rows, np.arange(rows.size) - np.repeat(starts, kept)] = symbols
        table[self._special_array, 0] = NUM_BYTE_SYMBOLS + np.arange(len(self.special_ids))
        return table

    @functools.cached_property
    def canonical(self) -> np.ndarray:
        """bool `[vocab_size]`: one token per distinct valid table row.

        Among tokens with the same row it prefers one spelled in full, then one that is not a
        SentencePiece `<0xNN>` piece, then the lowest id. Invalid rows are never canonical.
        """
        ids = np.flatnonzero(self.valid)
        truncated = self.lengths[ids] > self.k
        fallback = np.isin(ids, self.byte_fallback_ids)
        preferred = ids[np.lexsort((ids, fallback, truncated))]
        rows = self.table[preferred]
        # Sort by row (column 0 most significant), ties in order of preference.
        order = np.lexsort((np.arange(preferred.size), *rows.T[::-1]))
        rows = rows[order]
        first = np.ones(order.size, bool)
        first[1:] = (rows[1:] != rows[:-1]).any(axis=1)
        canonical = np.zeros(self.vocab_size, bool)
        canonical[preferred[order[first]]] = True
        return canonical

    # -- strings <-> symbols <-> ids -----------------------------------------------------------

    def spell(self, token_id: int) -> list[int]:
        """The full (untruncated) symbols of a token, without PAD."""
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token {token_id} is outside the vocabulary of {self.vocab_size}.")
        if token_id in self._special_symbols:
            return [self._special_symbols[token_id]]
        if not self.spellings[token_id]:
            raise ValueError(f"token {token_id} has no spelling (a padding row of the vocabulary).")
        return list(self.spellings[token_id])

    def unspell(self, symbols: Iterable[int] | np.ndarray) -> tuple[bytes, int | None]:
        """Bytes of the byte symbols before the first PAD or special symbol, and the special token
        that ended them (None if PAD or the end of `symbols` did)."""
        text = bytearray()
        for symbol in np.asarray(symbols).reshape(-1).tolist():
            if 0 <= symbol < NUM_BYTE_SYMBOLS:
                text.append(symbol)
            elif symbol == self.pad_symbol:
                return bytes(text), None
            elif NUM_BYTE_SYMBOLS <= symbol < self.pad_symbol:
                return bytes(text), self.special_ids[symbol - NUM_BYTE_SYMBOLS]
            else:
                raise ValueError(f"symbol {symbol} is outside the alphabet of {self.num_symbols}.")
        return bytes(text), None

    @functools.cached_property
    def longest_spelling(self) -> int:
        """Symbols in the longest full spelling."""
        return int(self.lengths.max(initial=0))

    @functools.cached_property
    def _token_by_row(self) -> dict[tuple[int, ...], int]:
        return {tuple(row): int(i) for i, row in zip(np.flatnonzero(self.canonical),
                                                    self.table[self.canonical].tolist(), strict=True)}

    def token_for_row(self, symbols: Iterable[int] | np.ndarray) -> int | None:
        """The token whose table row is `symbols` (everything after the first PAD read as PAD),
        or None when no token is spelled so; the host twin of `DeviceSpelling.lookup`."""
        row = np.asarray(symbols).reshape(-1).tolist()
        if self.pad_symbol in row:
            first = row.index(self.pad_symbol)
            row[first:] = [self.pad_symbol] * (len(row) - first)
        return self._token_by_row.get(tuple(row))

    # -- identity and files -------------------------------------------------------------------

    def _contents(self) -> dict:
        return {"format": FILE_FORMAT, "kind": self.kind, "k": self.k, "vocab_size": self.vocab_size,
                "spellings": [s.hex() for s in self.spellings], "special_ids": list(self.special_ids),
                "byte_fallback_ids": list(self.byte_fallback_ids)}

    @staticmethod
    def _hash(contents: dict) -> str:
        canonical = json.dumps(contents, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @functools.cached_property
    def content_hash(self) -> str:
        """SHA-256 of a canonical serialisation of everything that defines the table."""
        return self._hash(self._contents())

    def check_hash(self, expected: str, where: str) -> None:
        """Raise SpellingTableMismatchError unless this table's hash is `expected` (from `where`)."""
        if expected != self.content_hash:
            raise SpellingTableMismatchError(
                f"spelling table hash {self.content_hash} differs from the one recorded in {where} "
                f"({expected}): the tokenizer or k changed; rebuild with the same tokenizer and k, "
                "or retrain")

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        """Write the table as JSON (with its hash). An existing file holding another table is kept
        unless `overwrite`. `path` may be any pathlib-like object (e.g. an `epath.Path` on gs://)."""
        path = as_path(path)
        if path.exists() and not overwrite:
            try:
                same = SpellingTable.load(path).content_hash == self.content_hash
            except (ValueError, OSError):
                same = False
            if same:
                return
            raise FileExistsError(f"{path} already holds a different spelling table (or another file); "
                                  "pass overwrite=True or choose another path.")
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(path.name + ".tmp")
        staging.write_text(json.dumps(self._contents() | {"content_hash": self.content_hash}))
        staging.replace(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SpellingTable:
        """Read a table written by `save`, verifying its recorded hash."""
        contents = json.loads(as_path(path).read_text())
        recorded = contents.pop("content_hash", None)
        if contents.get("format") != FILE_FORMAT:
            raise ValueError(f"{path} is not a spelling table file of format {FILE_FORMAT}.")
        if recorded != (actual := cls._hash(contents)):
            raise SpellingTableMismatchError(
                f"{path} records spelling table hash {recorded} but its contents hash to {actual}: "
                "the file was edited or is corrupt; rebuild it with SpellingTable.from_tokenizer.")
        return cls(kind=contents["kind"], k=contents["k"], vocab_size=contents["vocab_size"],
                   spellings=tuple(bytes.fromhex(s) for s in contents["spellings"]),
                   special_ids=tuple(contents["special_ids"]),
                   byte_fallback_ids=tuple(contents["byte_fallback_ids"]))
