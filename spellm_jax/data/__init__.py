"""Data: sources from anywhere (built-in corpora, TFDS, files, gs://) streamed into per-host batches,
the teacher's own generations, packing."""

from spellm_jax.data.corpora import (
    CORPORA,
    SPLITS,
    CorpusBuilder,
    Shakespeare,
    WikiSample,
    corpus_builder,
    heldout_ids,
    load_corpora,
    load_documents,
    load_named_documents,
)
from spellm_jax.data.iterator import BatchIterator
from spellm_jax.data.packing import Packed, pack_documents, pack_ids, tokenize_documents
from spellm_jax.data.pipeline import (
    TrainingData,
    self_generated_spec,
    token_counts,
    training_data,
)
from spellm_jax.data.self_generated import (
    Prompt,
    Sample,
    SelfGenerated,
    SelfGeneratedSpec,
    evaluation_prompts,
    generate_shards,
    load_self_generated,
    read_samples,
    sample_prompts,
    shard_dir,
)
from spellm_jax.data.sources import SourceSpec, parse_source, read_documents
from spellm_jax.data.stream import StreamedBatches
from spellm_jax.data.wikitext import strip_wiki_markup, wiki_articles

__all__ = [
    "CORPORA", "SPLITS", "BatchIterator", "CorpusBuilder", "Packed", "Prompt", "Sample",
    "SelfGenerated", "SelfGeneratedSpec", "Shakespeare", "SourceSpec", "StreamedBatches",
    "TrainingData", "WikiSample",
    "corpus_builder", "evaluation_prompts", "generate_shards", "heldout_ids", "load_corpora",
    "load_documents", "load_named_documents", "load_self_generated", "pack_documents", "pack_ids",
    "parse_source", "read_documents",
    "read_samples", "sample_prompts", "self_generated_spec", "shard_dir", "strip_wiki_markup",
    "token_counts", "tokenize_documents", "training_data", "wiki_articles",
]
