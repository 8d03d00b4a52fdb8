"""The training data of a run, from its config: streamed batches to train on and held-out prompts."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from spellm_jax import tokenizers
from spellm_jax.data import sources
from spellm_jax.data.packing import pack_ids, tokenize_documents
from spellm_jax.data.self_generated import (
    Sampler,
    SelfGeneratedSpec,
    evaluation_prompts,
    load_self_generated,
)
from spellm_jax.data.stream import (
    DocumentSource,
    MemoryRows,
    PackedSource,
    SourceLanes,
    StreamedBatches,
)

SOURCES = ("self_generated", "corpus", "mixed")


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """This host's training batches (streamed, resumable) and the held-out prompts (from the
    sources' held-out documents, never train) for evaluation."""

    batches: StreamedBatches
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
                  sampler: Callable[[], Sampler], process_index: int = 0,
                  process_count: int = 1) -> TrainingData:
    """Batches of `config.train.seq_len` rows from `config.data.source`: the sources of
    `config.data.corpora` streamed (`corpus`), the teacher's generations (`self_generated`,
    cached and resumable; `sampler()` is called only if some are missing), or both (`mixed`:
    the generations are one more source, of weight 1)."""
    source = config.data.source
    if source not in SOURCES:
        raise ValueError(f"config.data.source={source!r}; choose one of {', '.join(SOURCES)}.")
    seq_len, seed, batch_size = config.train.seq_len, config.seed, config.train.batch_size
    num_lanes = batch_size * config.data.lanes
    row_sources: list[DocumentSource | PackedSource] = []
    if source in ("corpus", "mixed"):
        for index, entry in enumerate(config.data.corpora):
            spec = sources.parse_source(entry)
            row_sources.append(DocumentSource(entry, spec.weight,
                                              SourceLanes(spec, num_lanes, seed, index)))
    if source in ("self_generated", "mixed"):
        spec = self_generated_spec(config, teacher_source)
        samples = load_self_generated(spec, tokenizer, sampler, process_index=process_index,
                                      process_count=process_count)
        packed = pack_ids([sample.ids for sample in samples], seq_len, tokenizer.eos_token_id,
                          tokenizers.pad_id(tokenizer))
        row_sources.append(PackedSource(f"self_generated:{spec.cache_key()}", 1.0,
                                        MemoryRows(*packed, seed)))
    batches = StreamedBatches(row_sources, tokenizer, seq_len, batch_size, config.data.lanes,
                              seed, process_index, process_count)
    prompts = evaluation_prompts(config.data.corpora, tokenizer, config.data.eval_prompts,
                                 config.data.prompt_tokens, seed)
    return TrainingData(batches, prompts)


def token_counts(corpus_names: Sequence[str], tokenizer: Any, vocab_size: int) -> np.ndarray:
    """`[V]`: how often each token occurs in the `train` split of the corpora (each source
    beyond the built-ins read up to `sources.SAMPLE_CHARS`); the same on every host."""
    documents = sources.read_documents(corpus_names, "train")
    ids = tokenize_documents(list(documents.values()), tokenizer)
    flat = np.concatenate(ids) if ids else np.zeros(0, np.int32)
    return np.bincount(flat, minlength=vocab_size)[:vocab_size]
