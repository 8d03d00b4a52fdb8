"""The SpeLLM alphabet and the `[V, k]` spelling table of a tokenizer's vocabulary.

Symbols `0..255` are byte values, `256..256+S-1` the special tokens (one symbol each, in token id
order) and the last symbol, `C - 1`, is PAD. A token's spelling is its byte string (byte-level BPE:
the GPT-2 byte alphabet undone; SentencePiece: `▁` as a space, `<0xNN>` as byte NN); a special token
is spelled as its one symbol. Rows of the table hold the first k symbols, PAD-filled.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

NUM_BYTE_SYMBOLS = 256
MAX_K = 64
KINDS = ("byte_level", "sentencepiece")
FILE_FORMAT = 1
_SPM_SPACE = "\u2581"  # ▁
_SPM_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SUPPORTED = ("byte-level BPE (GPT-2, Llama-3, Qwen2, SmolLM) and SentencePiece (Llama-2, Mistral) "
              "tokenizers")


class UnsupportedTokenizerError(ValueError):
    """A tokenizer whose vocabulary cannot be spelled in bytes."""


class SpellingTableMismatchError(ValueError):
    """A spelling table that differs from the one a checkpoint or file was made with."""


def gpt2_unicode_to_byte() -> dict[str, int]:
    """Inverse of the GPT-2 byte -> printable character map that byte-level BPE vocabularies use.

    Bytes that print as themselves (`!..~`, `¡..¬`, `®..ÿ`) keep their code point; the other 68
    bytes, in increasing order, become the characters U+0100, U+0101, ...
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {chr(byte): byte for byte in printable}
    others = sorted(set(range(NUM_BYTE_SYMBOLS)) - set(printable))
    mapping.update({chr(NUM_BYTE_SYMBOLS + n): byte for n, byte in enumerate(others)})
    return mapping


_UNICODE_TO_BYTE = gpt2_unicode_to_byte()


def _byte_level_bytes(piece: str) -> bytes:
    """Bytes of a byte-level BPE piece; a piece outside the byte alphabet (an added token) is its UTF-8,
    as `tokenizers`' ByteLevel decoder does."""
    try:
        return bytes(map(_UNICODE_TO_BYTE.__getitem__, piece))
    except KeyError:
        return piece.encode()


def _sentencepiece_bytes(piece: str) -> bytes:
    """Bytes of a SentencePiece piece: `<0xNN>` is byte NN, otherwise UTF-8 with `▁` as a space."""
    if match := _SPM_BYTE_PIECE.fullmatch(piece):
        return bytes([int(match[1], 16)])
    return piece.replace(_SPM_SPACE, " ").encode()


_PIECE_BYTES: dict[str, Callable[[str], bytes]] = {
    "byte_level": _byte_level_bytes, "sentencepiece": _sentencepiece_bytes}


def _decoder_parts(decoder: Any) -> list[dict]:
    """The `tokenizers` decoder as a flat list of its JSON parts (a Sequence is expanded)."""
    if decoder is None:
        return []
    stack, parts = [json.loads(decoder.__getstate__())], []
    while stack:
        part = stack.pop()
        if part.get("type") == "Sequence":
            stack.extend(reversed(part.get("decoders", [])))
        else:
            parts.append(part)
    return parts


def tokenizer_kind(tokenizer: Any) -> str:
    """`"byte_level"` or `"sentencepiece"`; raises UnsupportedTokenizerError for anything else."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        if getattr(tokenizer, "sp_model", None) is not None:
            return "sentencepiece"
        raise UnsupportedTokenizerError(
            f"{type(tokenizer).__name__} has neither a `tokenizers` backend nor a SentencePiece model; "
            f"spellm_jax spells {_SUPPORTED}.")
    parts = _decoder_parts(backend.decoder)
    types = {part.get("type") for part in parts}
    model = type(backend.model).__name__
    if "ByteLevel" in types:
        return "byte_level"
    replaces_spm_space = any(part.get("type") == "Replace" and part.get("pattern", {}).get("String")
                             == _SPM_SPACE for part in parts)
    if "ByteFallback" in types or "Metaspace" in types or replaces_spm_space:
        return "sentencepiece"
    if model in ("BPE", "Unigram") and any(_SPM_SPACE in piece for piece in backend.get_vocab()):
        return "sentencepiece"
    raise UnsupportedTokenizerError(
        f"{type(tokenizer).__name__} is a {model} tokenizer with decoder "
        f"{'+'.join(sorted(map(str, types))) or 'none'}, which is neither byte-level BPE nor "
        f"SentencePiece; spellm_jax spells {_SUPPORTED}.")


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= MAX_K:
        raise ValueError(f"k={k!r} is not allowed: k is the number of symbols spelled per token, at "
                         f"least 1 (a special token needs one symbol) and at most {MAX_K}.")


def _occurrence_shares(lengths: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """`shares[k]`: the share of occurrences whose token is spelled in at most k symbols."""
    lengths, counts = np.asarray(lengths), np.asarray(counts)
    if lengths.shape != counts.shape or lengths.ndim != 1:
        raise ValueError(f"lengths {lengths.shape} and counts {counts.shape} must be equal 1-D shapes.")
    if (counts < 0).any():
        raise ValueError("counts must not be negative.")
    cumulative = np.cumsum(np.bincount(lengths, weights=counts.astype(np.float64)))
    if cumulative.size == 0 or cumulative[-1] <= 0:
        raise ValueError("counts hold no occurrences: nothing to measure coverage on.")
    return cumulative / cumulative[-1]


def choose_k(lengths: np.ndarray, counts: np.ndarray, target: float = 0.999) -> int:
    """The smallest k (>= 1) that spells at least `target` of the occurrences in full.

    `lengths[v]`: full spelling length of token v; `counts[v]`: its occurrences in the data.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target={target} must be a share in (0, 1].")
    shares = _occurrence_shares(lengths, counts)
    return max(1, int(np.argmax(shares >= target - 1e-12)))


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
        piece_bytes = _PIECE_BYTES[kind]
        spellings = [b"" if piece is None else piece_bytes(piece) for piece in pieces]
        for i in special_ids:
            spellings[i] = b""
        spellings += [b""] * (vocab_size - num_rows)
        byte_fallback = ()
        if kind == "sentencepiece":
            byte_fallback = tuple(i for i, piece in enumerate(pieces) if piece is not None
                                  and i not in special and _SPM_BYTE_PIECE.fullmatch(piece))
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
    def _ids_by_spelling(self) -> dict[bytes, tuple[int, ...]]:
        """Non-special tokens by full spelling, each group in order of preference."""
        fallback = set(self.byte_fallback_ids)
        groups: dict[bytes, list[int]] = {}
        for token_id, spelling in enumerate(self.spellings):
            if spelling:
                groups.setdefault(spelling, []).append(token_id)
        return {spelling: tuple(sorted(ids, key=lambda i: (i in fallback, i)))
                for spelling, ids in groups.items()}

    @functools.cached_property
    def _longest_spelling(self) -> int:
        return int(self.lengths.max(initial=0))

    def ids_for_bytes(self, data: bytes, tokenizer: Any = None) -> list[int]:
        """Input ids whose spellings concatenate to exactly `data`.

        One token when `data` is a token's spelling; else the tokenizer's own ids for the text when
        they spell it exactly; else a greedy longest match over the spellings.
        """
        data = bytes(data)
        if not data:
            return []
        group = self._ids_by_spelling.get(data)
        if group and len(group) == 1:
            return [group[0]]
        encoded = _tokenizer_ids(tokenizer, data)
        if group:
            return encoded if len(encoded) == 1 and encoded[0] in group else [group[0]]
        if encoded and self._spells(encoded, data):
            return encoded
        return self._greedy_ids(data)

    def ids_for_bytes_lossy(self, data: bytes, tokenizer: Any = None) -> list[int]:
        """Like `ids_for_bytes`, but bytes that no sequence of tokens can spell are dropped
        (SmolLM2 has no token for 21 byte values) instead of refused."""
        ids: list[int] = []
        while data:
            consumed = 1  # when no prefix can be spelled, the first byte is dropped
            for end in range(len(data), 0, -1):
                try:
                    ids += self.ids_for_bytes(data[:end], tokenizer)
                except ValueError:
                    continue
                consumed = end
                break
            data = data[consumed:]
        return ids

    @functools.cached_property
    def _token_by_row(self) -> dict[tuple[int, ...], int]:
        return {tuple(row): int(i) for i, row in zip(np.flatnonzero(self.canonical),
                                                    self.table[self.canonical].tolist(), strict=True)}

    def token_for_row(self, symbols: Iterable[int] | np.ndarray) -> int | None:
        """The token whose table row is `symbols` (everything after the first PAD read as PAD),
        or None when no token is spelled so; the host twin of `spelling_lookup.lookup`."""
        row = np.asarray(symbols).reshape(-1).tolist()
        if self.pad_symbol in row:
            first = row.index(self.pad_symbol)
            row[first:] = [self.pad_symbol] * (len(row) - first)
        return self._token_by_row.get(tuple(row))

    def ids_for_row(self, symbols: Iterable[int] | np.ndarray, tokenizer: Any = None) -> list[int]:
        """Input ids for an emitted row of symbols: its token when it spells one, else its bytes
        (lossily, see `ids_for_bytes_lossy`) followed by the special token that ended them."""
        if (token := self.token_for_row(symbols)) is not None:
            return [token]
        text, special = self.unspell(symbols)
        return self.ids_for_bytes_lossy(text, tokenizer) + ([] if special is None else [special])

    def _spells(self, ids: Sequence[int], data: bytes) -> bool:
        """Whether `ids` are non-special tokens of this table whose spellings concatenate to `data`."""
        if any(not 0 <= i < self.vocab_size or i in self._special_symbols for i in ids):
            return False
        return b"".join(self.spellings[i] for i in ids) == data

    def _greedy_ids(self, data: bytes) -> list[int]:
        index, ids, start = self._ids_by_spelling, [], 0
        while start < len(data):
            for end in range(min(len(data), start + self._longest_spelling), start, -1):
                if group := index.get(data[start:end]):
                    ids.append(group[0])
                    start = end
                    break
            else:
                raise ValueError(
                    f"byte 0x{data[start]:02x} (offset {start}) is not the start of any token's "
                    f"spelling in this {self.kind} vocabulary, so the text cannot be mapped to input ids.")
        return ids

    # -- coverage -----------------------------------------------------------------------------

    def coverage(self, ks: Sequence[int] = (8, 12, 16, 24),
                 counts: np.ndarray | None = None) -> list[dict]:
        """Per k: the share of valid token types spelled in full (`type_coverage`), how many are
        truncated, and with `counts` ([vocab_size] corpus occurrences) the same for occurrences."""
        lengths = self.lengths[self.valid]
        shares = None
        if counts is not None:
            counts = np.asarray(counts)
            if counts.shape != (self.vocab_size,):
                raise ValueError(f"counts has shape {counts.shape}; expected ({self.vocab_size},).")
            counts = counts[self.valid]
            shares = _occurrence_shares(lengths, counts)
        rows = []
        for k in ks:
            truncated = lengths > k
            row = {"k": int(k), "type_coverage": float(1.0 - truncated.mean()),
                   "truncated_types": int(truncated.sum()), "occurrence_coverage": None,
                   "truncated_occurrences": None}
            if shares is not None:
                row["occurrence_coverage"] = float(shares[min(k, shares.size - 1)])
                row["truncated_occurrences"] = int(counts[truncated].sum())
            rows.append(row)
        return rows

    def coverage_report(self, ks: Sequence[int] = (8, 12, 16, 24),
                        counts: np.ndarray | None = None) -> str:
        """A markdown table of `coverage(ks, counts)` under a one-line summary of the vocabulary."""
        lines = [
            f"{self.kind} vocabulary: {self.vocab_size} rows, {int(self.valid.sum())} spellable, "
            f"{len(self.special_ids)} special, longest spelling {self._longest_spelling} symbols, "
            f"C = {self.num_symbols}, table k = {self.k}",
            "",
            "| k | token types spelled in full | truncated types | occurrences spelled in full |",
            "|---:|---:|---:|---:|",
        ]
        for row in self.coverage(ks, counts):
            occurrences = ("n/a" if row["occurrence_coverage"] is None
                           else f"{100 * row['occurrence_coverage']:.3f}%")
            lines.append(f"| {row['k']} | {100 * row['type_coverage']:.3f}% | {row['truncated_types']} "
                         f"| {occurrences} |")
        return "\n".join(lines)

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
        path = _as_path(path)
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
        contents = json.loads(_as_path(path).read_text())
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


def _as_path(path: str | os.PathLike) -> Any:
    """Path objects pass through (pathlib or `epath`); strings become local paths."""
    return Path(path) if isinstance(path, str) else path


def _tokenizer_ids(tokenizer: Any, data: bytes) -> list[int]:
    """The tokenizer's ids for `data` as text (no special tokens added); [] without a tokenizer or
    when `data` is not UTF-8."""
    if tokenizer is None:
        return []
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return []
    return list(tokenizer.encode(text, add_special_tokens=False))
