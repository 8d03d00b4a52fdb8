"""The distillation loss: soft targets from the decoder, hard cross-entropy on the spelled teacher
argmax, computed a chunk of positions at a time."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from spellm_jax.models.char_decoders import CharDecoder
from spellm_jax.spelling import DeviceSpelling


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Distillation targets: soft KL to the decoder's targets, hard CE on the spelled teacher argmax."""

    soft_weight: float = 1.0
    hard_weight: float = 0.0
    temperature: float = 1.0
    chunk_size: int = 128  # sequence positions whose [B, chunk, V] teacher logits exist at once
    # Keep each chunk's targets and the decoder's logits (2 x paths x k x C floats per position)
    # for the backward pass rather than recomputing the teacher's logits, the targets and the
    # decoder's products there: faster, at that much activation memory.
    save_targets: bool = True
    # Spellings per position the soft loss follows: the teacher's `paths` most likely tokens,
    # each weighted by its share of their mass (1: the argmax only). More paths teach the chain
    # decoder the conditionals beam search visits off the argmax's spelling.
    paths: int = 1

    def __post_init__(self) -> None:
        if self.soft_weight < 0 or self.hard_weight < 0 or self.soft_weight + self.hard_weight == 0:
            raise ValueError(f"loss weights soft={self.soft_weight}, hard={self.hard_weight}: both "
                             "must be >= 0 and at least one > 0.")
        if self.temperature <= 0 or self.chunk_size < 1:
            raise ValueError("loss temperature must be > 0 and chunk_size >= 1.")
        if self.paths < 1:
            raise ValueError(f"loss paths={self.paths}: must be >= 1.")


# What a chunk's backward pass reads from its forward pass when `save_targets` is set.
# The paths' weights too: the soft loss's gradient is scaled by them, and without their own name
# the backward pass would recompute the teacher's logits to get them. The decoder's logits along
# the paths spare the backward pass its `W_i h` product.
# The word rows' targets (a chain decoder's shortlist) likewise.
TEACHER_RESIDUALS = ("target_rows", "path_weights", "soft_targets", "loss_weights",
                     "decoder_logits", "word_targets", "word_labels")
WORD_METRICS = ("word_kl", "word_ce", "word_acc")
SCALAR_METRICS = ("loss", "soft_kl", "hard_ce", "exact_token_acc", "truncated_share",
                  *WORD_METRICS)
PER_HEAD_METRICS = ("soft_kl_per_head", "head_acc")


def _per_path(x: jax.Array, path_rows: jax.Array) -> jax.Array:
    """`[..., P, k, C]` from a decoder's output for rows `[..., P, k]`: kinds blind to the rows
    answer `[..., k, C]`, the same for every path."""
    if x.ndim < path_rows.ndim + 1:
        x = x[..., None, :, :]
    return jnp.broadcast_to(x, (*path_rows.shape, x.shape[-1]))


def position_losses(decoder: CharDecoder, hidden: jax.Array, teacher_logits: jax.Array,
                    spelling: DeviceSpelling, config: LossConfig) -> dict[str, jax.Array]:
    """Per-position losses and metrics (`SCALAR_METRICS` `[...]`, `PER_HEAD_METRICS` `[..., k]`)
    of the decoder on hidden states `[..., d]` against the teacher's logits `[..., V]`. The
    spelled targets follow the tokens the decoder spells; tokens with their own rows (a chain
    decoder's shortlist) are scored by `word_losses`."""
    every = jnp.where(spelling.valid[...],
                      teacher_logits.astype(jnp.float32) / config.temperature, -jnp.inf)
    scaled = decoder.spelled_logits(every)
    if config.paths == 1:
        path_tokens = jnp.argmax(scaled, axis=-1)[..., None]
        path_logits = jnp.take_along_axis(scaled, path_tokens, axis=-1)
    else:
        path_logits, path_tokens = jax.lax.top_k(scaled, config.paths)  # [..., P], argmax first
    path_weights = checkpoint_name(jax.nn.softmax(path_logits, axis=-1),  # 1.0 for one path
                                   "path_weights")
    # Proportional to the teacher's probabilities: the targets normalise, so no pass divides.
    top = jnp.max(scaled, axis=-1, keepdims=True)
    token_weights = jnp.exp(scaled - jnp.where(jnp.isfinite(top), top, 0.0))
    path_rows = checkpoint_name(spelling.rows_of(path_tokens), "target_rows")  # [..., P, k]
    targets = checkpoint_name(_per_path(decoder.soft_targets(token_weights, path_rows, spelling),
                                        path_rows), "soft_targets")  # [..., P, k, C]
    weights = checkpoint_name(decoder.loss_weights(path_rows, spelling), "loss_weights")
    char_logits = _per_path(checkpoint_name(decoder.logits(hidden, path_rows), "decoder_logits"),
                            path_rows)
    student_log_probs = jax.nn.log_softmax(char_logits / config.temperature, axis=-1)
    soft_per_path = jnp.sum(
        jnp.where(targets > 0, targets * (jnp.log(jnp.maximum(targets, 1e-30)) - student_log_probs),
                  0.0), axis=-1) * config.temperature**2 * weights  # [..., P, k]
    soft_per_head = jnp.einsum("...p,...pk->...k", path_weights, soft_per_path)
    # The hard loss and the accuracies follow the argmax's spelling alone.
    target_rows, char_logits, weights = path_rows[..., 0, :], char_logits[..., 0, :, :], weights[..., 0, :]
    log_probs = jax.nn.log_softmax(char_logits, axis=-1)
    hard_per_head = -jnp.take_along_axis(log_probs, target_rows[..., None], axis=-1)[..., 0] * weights
    head_correct = jnp.argmax(char_logits, axis=-1) == target_rows
    # With word rows, the KL over tokens is the word rows' KL over their R + 1 classes plus the
    # teacher's rest mass times the spelled KL over the tokens outside: the spelled losses weigh
    # by that mass (the hard one too, as the argmax is outside with about that probability).
    words = decoder.word_losses(hidden, every)
    spelled_share = 1.0 if words is None else words.pop("rest_mass")
    if words is None:
        words = dict.fromkeys(WORD_METRICS, jnp.zeros(hidden.shape[:-1]))
    words["word_kl"] = words["word_kl"] * config.temperature**2
    loss = (config.soft_weight * (spelled_share * soft_per_head.sum(-1) + words["word_kl"])
            + config.hard_weight * (spelled_share * hard_per_head.sum(-1) + words["word_ce"]))
    return words | {
        "loss": loss,
        "soft_kl": soft_per_head.sum(-1),
        "hard_ce": hard_per_head.sum(-1),
        "soft_kl_per_head": soft_per_head,
        "head_acc": head_correct.astype(jnp.float32),
        # Heads that carry no loss (the chain's, past the row's end) do not change the token.
        "exact_token_acc": jnp.all(head_correct | (weights == 0), axis=-1).astype(jnp.float32),
        "truncated_share": (spelling.lengths[...][jnp.argmax(every, axis=-1)]
                            > spelling.k).astype(jnp.float32),
    }


def chunked_distillation_loss(student_hidden: jax.Array, teacher_hidden: jax.Array,
                              decoder: CharDecoder, teacher_head: Callable[[jax.Array], jax.Array],
                              spelling: DeviceSpelling, mask: jax.Array, config: LossConfig
                              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean loss over masked positions, computed `chunk_size` positions at a time.

    `teacher_head(h) -> [..., V]` maps final hidden states `[B, T, d]` to the teacher's logits;
    each chunk is rematerialised in the backward pass, so only one chunk's `[B, chunk, V]` teacher
    logits exist at any time; with `config.save_targets` the backward pass reads the chunk's
    targets (`TEACHER_RESIDUALS`) instead of recomputing the teacher's logits. Returns the loss
    and summed metrics.
    """
    batch, length, _ = student_hidden.shape
    chunk = min(config.chunk_size, length)
    if length % chunk:
        raise ValueError(f"sequence length {length} is not a multiple of loss chunk_size {chunk}.")
    num_chunks = length // chunk

    def split(x):
        return x.reshape(batch, num_chunks, chunk, *x.shape[2:]).swapaxes(0, 1)

    policy = (jax.checkpoint_policies.save_only_these_names(*TEACHER_RESIDUALS)
              if config.save_targets else None)

    @functools.partial(jax.checkpoint, policy=policy)
    def chunk_sums(carry, xs):
        h_student, h_teacher, m = xs
        per_position = position_losses(decoder, h_student,
                                       jax.lax.stop_gradient(teacher_head(h_teacher)), spelling,
                                       config)
        m = m.astype(jnp.float32)
        sums = {name: jnp.einsum("bt,bt...->...", m, value) for name, value in per_position.items()}
        return jax.tree.map(jnp.add, carry, sums), None

    zeros = dict.fromkeys(SCALAR_METRICS, jnp.zeros(()))
    zeros |= dict.fromkeys(PER_HEAD_METRICS, jnp.zeros((spelling.k,)))
    sums, _ = jax.lax.scan(chunk_sums, zeros,
                           (split(student_hidden), split(teacher_hidden), split(mask)))
    sums["tokens"] = mask.astype(jnp.float32).sum()
    return sums["loss"] / jnp.maximum(sums["tokens"], 1.0), sums
