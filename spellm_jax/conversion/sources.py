"""Where pretrained weights come from: HF dirs, hub names, GGUF files, the bundled teacher, and
directories this package converted. Everything funnels into one `Pretrained` value."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from jax.sharding import Mesh

from spellm_jax import assets
from spellm_jax.checkpointing import (
    commit_output_dir,
    prepare_output_dir,
    restore_params,
    save_params,
)
from spellm_jax.conversion import gguf_file, hf_dir, mapping, sharded_read, spellm_files
from spellm_jax.conversion.errors import ConversionError
from spellm_jax.conversion.spellm_files import SpellmParts
from spellm_jax.models.config import ModelConfig
from spellm_jax.paths import as_path

BUNDLED_SOURCES = {"smollm2": assets.SMOLLM2}
CONVERTED_MARKER = "spellm_conversion.json"
MODEL_CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclasses.dataclass
class Pretrained:
    """A pretrained model in our terms: config, canonical flat params, tokenizer (None when the
    source ships none), and the character heads when the source is an exported SpeLLM."""

    config: ModelConfig
    params: dict[str, Any]
    tokenizer: Any
    source: str
    spellm: SpellmParts | None = None


def _spellm_parts_in(path: Path) -> SpellmParts | None:
    return spellm_files.read_spellm_parts(path) if spellm_files.has_spellm_parts(path) else None


def is_converted_dir(path: Path) -> bool:
    return (path / CONVERTED_MARKER).is_file() and (path / PARAMS_DIR).is_dir()


def _log(message: str) -> None:
    print(f"spellm_jax: {message}", file=sys.stderr, flush=True)


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def _local_copy(path) -> Path:
    """A local directory holding the small files (tokenizer, configs) of a remote directory."""
    if isinstance(path, Path):
        return path
    local = assets.cache_dir() / "remote_dirs" / hashlib.sha256(str(path).encode()).hexdigest()[:16]
    local.mkdir(parents=True, exist_ok=True)
    for file in path.iterdir():
        if file.is_file() and file.suffix not in _WEIGHT_SUFFIXES:
            (local / file.name).write_bytes(file.read_bytes())
    return local


def tokenizer_in(path: Path):
    """The tokenizer saved in a directory (local or remote), or None when it holds none
    (weights-only dirs)."""
    from transformers import AutoTokenizer

    if not any((path / name).exists() for name in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(str(_local_copy(path)))


def _read_hf(path: Path, source: str, mesh: Mesh | None = None) -> Pretrained:
    config = ModelConfig.from_hf(hf_dir.read_hf_config(path))
    params = (mapping.from_hf(config, hf_dir.read_hf_tensors(path), source=str(path))
              if mesh is None else sharded_read.read_hf_sharded(path, config, mesh))
    return Pretrained(config, params, tokenizer_in(path), source, _spellm_parts_in(path))


def _read_gguf(path: Path, source: str) -> Pretrained:
    hf_config = gguf_file.read_gguf_config(path)
    config = ModelConfig.from_hf(hf_config)
    tensors = gguf_file.read_gguf_tensors(path, hf_config, show_progress=True)
    params = mapping.from_hf(config, tensors, source=str(path))
    return Pretrained(config, params, gguf_file.read_gguf_tokenizer(path), source)


def _download_hub(name: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*",
                "special_tokens_map.json", "generation_config.json"]
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as error:
        raise ConversionError(
            f"{name!r} is neither a local path nor a bundled source ({', '.join(BUNDLED_SOURCES)}),"
            f" and downloading it from the Hugging Face hub failed: {type(error).__name__}: "
            f"{error}. Without network access, pass a local HF directory or a .gguf file.") from error


def read_source(source: str, mesh: Mesh | None = None) -> Pretrained:
    """Reads any supported source into memory (numpy params, not yet on device); with a `mesh`,
    HF safetensors and converted directories straight onto it instead, each host reading only
    the slices its devices hold (a GGUF file is always read whole)."""
    if source in BUNDLED_SOURCES:
        return _read_gguf(assets.fetch(BUNDLED_SOURCES[source]), source)
    path = as_path(source) if "://" in source else Path(source).expanduser()
    if path.suffix == ".gguf":
        if not isinstance(path, Path):
            raise ConversionError(f"{source}: GGUF files are read from a local disk; copy it "
                                  "there, or convert it once (`python -m spellm_jax.convert`) "
                                  "and point at the converted directory, local or remote.")
        if not path.is_file():
            raise ConversionError(f"GGUF file {path} does not exist.")
        return _read_gguf(path, source)
    if path.exists():
        if is_converted_dir(path):
            return read_converted(path, mesh)
        if hf_dir.is_hf_dir(path):
            return _read_hf(path, source, mesh)
        raise ConversionError(
            f"{path} is neither a Hugging Face model directory (config.json + weights) nor a "
            "directory written by `python -m spellm_jax.convert`.")
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return _read_hf(_download_hub(source), source, mesh)
    raise ConversionError(
        f"source {source!r} does not exist. Use a HF directory, a hub name (org/model), a "
        f".gguf file, a converted directory, or one of {', '.join(BUNDLED_SOURCES)}.")


def write_converted(pretrained: Pretrained, out: Path, overwrite: bool = False) -> Path:
    """Writes an Orbax params checkpoint, the model config and the tokenizer files to `out`."""
    out = Path(out)
    staging = prepare_output_dir(out, overwrite)
    save_params(staging / PARAMS_DIR, pretrained.params)
    pretrained.config.save(staging / MODEL_CONFIG_FILE)
    if pretrained.tokenizer is not None:
        pretrained.tokenizer.save_pretrained(str(staging))
    if pretrained.spellm is not None:
        save_params(staging / spellm_files.HEADS_ORBAX_DIR, pretrained.spellm.tensors)
        spellm_files.write_description(staging, pretrained.spellm)
    (staging / CONVERTED_MARKER).write_text(json.dumps(
        {"source": pretrained.source, "layout": "canonical", "format_version": 1}, indent=2))
    commit_output_dir(staging, out)
    return out


def read_converted(path: Path, mesh: Mesh | None = None) -> Pretrained:
    meta = json.loads((path / CONVERTED_MARKER).read_text())
    config = ModelConfig.load(path / MODEL_CONFIG_FILE)
    params = ({k: np.asarray(v) for k, v in restore_params(path / PARAMS_DIR).items()}
              if mesh is None else
              sharded_read.read_orbax_sharded(path / PARAMS_DIR, config, mesh, str(path)))
    return Pretrained(config, params, tokenizer_in(path), meta["source"], _spellm_parts_in(path))


def converted_path(source: str) -> Path:
    """A directory in our format for `source`: itself if already converted; bundled sources are
    converted once into the cache and reused."""
    path = Path(source).expanduser()
    if path.exists() and is_converted_dir(path):
        return path
    if source not in BUNDLED_SOURCES:
        raise ConversionError(f"{source!r} is not a converted directory.")
    cached = assets.cache_dir() / source / "converted"
    if not is_converted_dir(cached):
        start = time.time()
        _log(f"converting the bundled {source} teacher into {cached} (first use only)")
        write_converted(read_source(source), cached, overwrite=True)
        _log(f"converted in {time.time() - start:.1f}s")
    return cached


def load_source(source: str, mesh: Mesh | None = None) -> Pretrained:
    """Any source, using the converted cache for bundled ones (onto `mesh` if given, see
    `read_source`)."""
    if source in BUNDLED_SOURCES:
        return read_converted(converted_path(source), mesh)
    return read_source(source, mesh)
