"""How a tokenizer's pieces are spelled in bytes: byte-level BPE (the GPT-2 byte alphabet undone)
and SentencePiece (`▁` as a space, `<0xNN>` as byte NN)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

NUM_BYTE_SYMBOLS = 256
KINDS = ("byte_level", "sentencepiece")
SPM_SPACE = "\u2581"  # ▁
SPM_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SUPPORTED = ("byte-level BPE (GPT-2, Llama-3, Qwen2, SmolLM) and SentencePiece (Llama-2, Mistral) "
              "tokenizers")


class UnsupportedTokenizerError(ValueError):
    """A tokenizer whose vocabulary cannot be spelled in bytes."""


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
    if match := SPM_BYTE_PIECE.fullmatch(piece):
        return bytes([int(match[1], 16)])
    return piece.replace(SPM_SPACE, " ").encode()


PIECE_BYTES: dict[str, Callable[[str], bytes]] = {
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
                             == SPM_SPACE for part in parts)
    if "ByteFallback" in types or "Metaspace" in types or replaces_spm_space:
        return "sentencepiece"
    if model in ("BPE", "Unigram") and any(SPM_SPACE in piece for piece in backend.get_vocab()):
        return "sentencepiece"
    raise UnsupportedTokenizerError(
        f"{type(tokenizer).__name__} is a {model} tokenizer with decoder "
        f"{'+'.join(sorted(map(str, types))) or 'none'}, which is neither byte-level BPE nor "
        f"SentencePiece; spellm_jax spells {_SUPPORTED}.")
