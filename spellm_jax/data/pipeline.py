"""The training data of a run, from its config: packed rows to train on and held-out prompts."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from spellm_jax import tokenizers
from spellm_jax.data import corpora
from spellm_jax.data.packing import pack_documents, pack_ids
from spellm_jax.data.self_generated import (
    Sampler,
    SelfGeneratedSpec,
    evaluation_prompts,
    load_self_generated,
)

SOURCES = ("self_generated", "corpus", "mixed")


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """`tokens`/`loss_mask` `[N, seq_len]` to train on; `heldout_prompts` (from the corpora's
    heldout split, never train) for evaluation."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    heldout_prompts: list[list[int]]


def self_generated_spec(config: Any, teacher_source: str) -> SelfGeneratedSpec:
    """The `SelfGeneratedSpec` described by `config.data` (and `config.seed`)."""
    data = config.data
    return SelfGeneratedSpec(
        teacher=teacher_source, corpora=tuple(data.corpora), split="train",
        num_samples=data.num_samples, prompt_tokens=data.prompt_tokens, new_tokens=data.new_tokens,
        temperature=data.temperature, top_k=data.get("top_k", 0), top_p=data.top_p,
        batch_size=data.generation_batch, seed=config.seed)


def training_data(config: Any, tokenizer: Any, teacher_source: str,
                  sampler: Callable[[], Sampler]) -> TrainingData:
    """Rows of `config.train.seq_len` from `config.data.source`: the teacher's generations
    (`self_generated`, cached and resumable; `sampler()` is called only if some are missing),
    the corpora's train split (`corpus`), or both (`mixed`)."""
    source = config.data.source
    if source not in SOURCES:
        raise ValueError(f"config.data.source={source!r}; choose one of {', '.join(SOURCES)}.")
    seq_len, eos_id, pad_id = config.train.seq_len, tokenizer.eos_token_id, tokenizers.pad_id(tokenizer)
    parts = []
    if source in ("corpus", "mixed"):
        documents = corpora.load_corpora(config.data.corpora, "train")
        parts.append(pack_documents(list(documents.values()), tokenizer, seq_len, eos_id, pad_id))
    if source in ("self_generated", "mixed"):
        spec = self_generated_spec(config, teacher_source)
        samples = load_self_generated(spec, tokenizer, sampler)
        parts.append(pack_ids([sample.ids for sample in samples], seq_len, eos_id, pad_id))
    prompts = evaluation_prompts(config.data.corpora, tokenizer, config.data.eval_prompts,
                                 config.data.prompt_tokens, config.seed)
    return TrainingData(np.concatenate([part.tokens for part in parts]),
                        np.concatenate([part.loss_mask for part in parts]), prompts)
