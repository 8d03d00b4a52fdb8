"""Spelling a vocabulary in the SpeLLM alphabet: the table (data, hash, files), how pieces become
bytes, coverage and the choice of k, strings back to ids, and the table's device-side arrays
(`DeviceSpelling`, imported on first use: the rest needs no JAX, so PyTorch users need none)."""

from spellm_jax.spelling.coverage import choose_k, coverage, coverage_report
from spellm_jax.spelling.pieces import NUM_BYTE_SYMBOLS, UnsupportedTokenizerError, tokenizer_kind
from spellm_jax.spelling.respell import RESPELL_MODES, Respeller
from spellm_jax.spelling.table import (
    MAX_K,
    SPELLING_FILE,
    SpellingTable,
    SpellingTableMismatchError,
)

__all__ = [
    "MAX_K", "NUM_BYTE_SYMBOLS", "RESPELL_MODES", "SPELLING_FILE", "DeviceSpelling", "Respeller",
    "SpellingTable", "SpellingTableMismatchError", "UnsupportedTokenizerError", "choose_k", "coverage",
    "coverage_report", "tokenizer_kind",
]


def __getattr__(name: str):
    if name == "DeviceSpelling":
        from spellm_jax.spelling.device import DeviceSpelling

        return DeviceSpelling
    raise AttributeError(name)
