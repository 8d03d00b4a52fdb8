"""The files that carry a SpeLLM's character heads beside a model directory.

An exported directory (`python -m spellm_jax.export`) holds `spellm_heads.safetensors`, the head
tensors under their flat names with `.` for `/` plus the fixed `symbol_mask`; `spellm_config.json`,
which describes them; and `spelling_table.json`, the hash-checked spelling table. A directory
converted back (`python -m spellm_jax.convert`) keeps the same tensors as an Orbax checkpoint in
`spellm_heads/`. This module imports no JAX, so the PyTorch side can share its names.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from spellm_jax.spelling.table import SPELLING_FILE, SpellingTable

HEADS_FILE = "spellm_heads.safetensors"
HEADS_ORBAX_DIR = "spellm_heads"
CONFIG_FILE = "spellm_config.json"
SYMBOL_MASK = "symbol_mask"  # the independent heads' fixed mask of impossible symbols
FORMAT_VERSION = 1


@dataclasses.dataclass
class SpellmParts:
    """What a SpeLLM adds to its backbone: the decoder's tensors (flat keys relative to the
    decoder module: its parameters, e.g. `kernel`, `adapter/up/kernel`, and the tensors the
    spelling table fixes, e.g. `symbol_mask`), their description and the table."""

    tensors: dict[str, Any]
    config: dict[str, Any]
    spelling: SpellingTable


def has_spellm_parts(path: Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def spellm_config(spelling: SpellingTable, heads: dict[str, Any], base_model: str,
                  **extra: Any) -> dict[str, Any]:
    """The `spellm_config.json` contents: the heads, their alphabet and where they came from."""
    return {
        "format_version": FORMAT_VERSION,
        "base_model": base_model,
        "k": spelling.k,
        "num_symbols": spelling.num_symbols,
        "alphabet": {"byte_symbols": 256, "special_token_ids": list(spelling.special_ids),
                     "pad_symbol": spelling.pad_symbol, "tokenizer_kind": spelling.kind},
        "spelling_table_file": SPELLING_FILE,
        "spelling_table_hash": spelling.content_hash,
        "heads": heads,
        **extra,
    }


def write_description(path: Path, parts: SpellmParts) -> None:
    """`spellm_config.json` and `spelling_table.json` (the tensors are written by the caller)."""
    path = Path(path)
    parts.spelling.save(path / SPELLING_FILE)
    (path / CONFIG_FILE).write_text(json.dumps(parts.config, indent=2))


def read_description(path: Path) -> tuple[dict[str, Any], SpellingTable]:
    """The config and the spelling table of a SpeLLM directory, checked against each other."""
    path = Path(path)
    config = json.loads((path / CONFIG_FILE).read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path / CONFIG_FILE} has format_version={config.get('format_version')}; "
                         f"this spellm_jax reads version {FORMAT_VERSION}.")
    spelling = SpellingTable.load(path / SPELLING_FILE)
    spelling.check_hash(config["spelling_table_hash"], str(path / CONFIG_FILE))
    return config, spelling


def to_file_names(tensors: dict[str, Any]) -> dict[str, Any]:
    return {key.replace("/", "."): value for key, value in tensors.items()}


def from_file_names(tensors: dict[str, Any]) -> dict[str, Any]:
    return {key.replace(".", "/"): value for key, value in tensors.items()}


def write_exported(path: Path, parts: SpellmParts) -> None:
    """The safetensors form, beside an HF model directory."""
    from spellm_jax.conversion.hf_dir import write_safetensors

    write_safetensors(Path(path) / HEADS_FILE, to_file_names(
        {k: np.asarray(v) for k, v in parts.tensors.items()}))
    write_description(path, parts)


def read_spellm_parts(path: Path) -> SpellmParts:
    """The heads of an exported directory (safetensors) or of one converted back (Orbax)."""
    path = Path(path)
    config, spelling = read_description(path)
    if (path / HEADS_FILE).is_file():
        from spellm_jax.conversion.hf_dir import read_safetensors

        tensors = from_file_names(read_safetensors(path / HEADS_FILE))
    elif (path / HEADS_ORBAX_DIR).is_dir():
        from spellm_jax.checkpointing import restore_params

        tensors = {k: np.asarray(v) for k, v in restore_params(path / HEADS_ORBAX_DIR).items()}
    else:
        raise FileNotFoundError(f"{path} has {CONFIG_FILE} but neither {HEADS_FILE} nor "
                                f"{HEADS_ORBAX_DIR}/; the export is incomplete, export it again.")
    return SpellmParts(tensors, config, spelling)
