"""A teacher's architecture and SpeLLM alphabet without its weights: what an ahead-of-time
compile needs to know about `config.teacher`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ml_collections

from spellm_jax.conversion import hf_dir
from spellm_jax.conversion.sources import MODEL_CONFIG_FILE, is_converted_dir, tokenizer_in
from spellm_jax.errors import ConfigError
from spellm_jax.models.config import ModelConfig
from spellm_jax.runs import TINY_TEACHER, tiny_model_config

# Public config.json fields of the presets' teachers, beside the presets.
ARCHITECTURES_FILE = Path(__file__).resolve().parents[2] / "configs" / "teacher_architectures.json"
SMOLLM2 = "smollm2"  # the tiny random teacher uses SmolLM2's tokenizer


@dataclasses.dataclass(frozen=True)
class TeacherArchitecture:
    """The teacher's `ModelConfig` and C, the number of symbols of its spelling alphabet."""

    config: ModelConfig
    num_symbols: int


def known_architectures() -> dict[str, dict]:
    """The architectures in `configs/teacher_architectures.json`, by teacher source name."""
    entries = json.loads(ARCHITECTURES_FILE.read_text())
    return {name: entry for name, entry in entries.items() if not name.startswith("_")}


def teacher_architecture(config: ml_collections.ConfigDict) -> TeacherArchitecture:
    """`config.teacher`'s architecture: from the table of known teachers (the presets'), or from
    a local HF or converted directory's config (its tokenizer gives C); no weights are read."""
    if config.teacher == TINY_TEACHER:
        smollm2 = architecture_named(SMOLLM2)
        model = tiny_model_config(config, smollm2.config.vocab_size, smollm2.config.eos_token_ids)
        return TeacherArchitecture(model, smollm2.num_symbols)
    return architecture_named(config.teacher)


def architecture_named(teacher: str) -> TeacherArchitecture:
    """A teacher source's architecture: a known teacher's, or a local directory's."""
    known = known_architectures()
    if teacher in known:
        return _from_entry(known[teacher])
    path = Path(teacher).expanduser()
    if path.is_dir() and (hf_dir.is_hf_dir(path) or is_converted_dir(path)):
        return _from_directory(path)
    raise ConfigError(
        f"teacher={teacher!r}: an ahead-of-time compile reads no weights, so it needs the "
        f"teacher's architecture: one of {', '.join(sorted(known))} ({ARCHITECTURES_FILE.name}), "
        "a local Hugging Face directory with config.json, or a converted directory; or add the "
        f"teacher's config.json fields (and its spelling_symbols) to {ARCHITECTURES_FILE}.")


def _from_entry(entry: dict) -> TeacherArchitecture:
    fields = {key: value for key, value in entry.items() if key != "spelling_symbols"}
    return TeacherArchitecture(ModelConfig.from_hf(fields), int(entry["spelling_symbols"]))


def _from_directory(path: Path) -> TeacherArchitecture:
    from spellm_jax.spelling import SpellingTable

    if is_converted_dir(path):
        model = ModelConfig.load(path / MODEL_CONFIG_FILE)
    else:
        model = ModelConfig.from_hf(hf_dir.read_hf_config(path))
    tokenizer = tokenizer_in(path)
    if tokenizer is None:
        raise ConfigError(f"{path} has no tokenizer; the SpeLLM's alphabet comes from it.")
    table = SpellingTable.from_tokenizer(tokenizer, 1, vocab_size=model.vocab_size)
    return TeacherArchitecture(model, table.num_symbols)
