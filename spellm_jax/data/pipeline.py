"""The training data of a run, from its config: packed rows to train on and held-out prompts."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from spellm_jax.data import corpora
from spellm_jax.data.packing import pack_documents, pack_ids
from spellm_jax.data.self_generated import SelfGeneratedSpec, evaluation_prompts, load_self_generated

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


def training_data(config: Any, teacher: Any) -> TrainingData:
    """Rows of `config.train.seq_len` from `config.data.source`: the teacher's generations
    (`self_generated`, cached and resumable), the corpora's train split (`corpus`), or both
    (`mixed`). `teacher` is a `Pretrained`; its model is built only if generations are missing."""
    source, tokenizer = config.data.source, teacher.tokenizer
    if source not in SOURCES:
        raise ValueError(f"config.data.source={source!r}; choose one of {', '.join(SOURCES)}.")
    seq_len, eos_id = config.train.seq_len, tokenizer.eos_token_id
    pad_id = eos_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    parts = []
    if source in ("corpus", "mixed"):
        documents = corpora.load_corpora(config.data.corpora, "train")
        parts.append(pack_documents(list(documents.values()), tokenizer, seq_len, eos_id, pad_id))
    if source in ("self_generated", "mixed"):
        def teacher_model() -> tuple[Any, Any]:
            from spellm_jax.models.llama import RuntimeOptions
            from spellm_jax.pretrained import build_model

            return build_model(teacher.config, RuntimeOptions(), teacher.params, teacher.source), tokenizer

        samples = load_self_generated(self_generated_spec(config, teacher.source), teacher_model)
        parts.append(pack_ids([sample.ids for sample in samples], seq_len, eos_id, pad_id))
    prompts = evaluation_prompts(config.data.corpora, tokenizer, config.data.eval_prompts,
                                 config.data.prompt_tokens, config.seed)
    return TrainingData(np.concatenate([part.tokens for part in parts]),
                        np.concatenate([part.loss_mask for part in parts]), prompts)
