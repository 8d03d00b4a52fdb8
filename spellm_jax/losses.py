"""Per-position symbol marginals of the teacher, factorized log-probabilities, and the losses."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def symbol_marginals(teacher_probs: jax.Array, table: jax.Array, num_symbols: int) -> jax.Array:
    """`q_i(c) = Σ_{v: spell(v)_i = c} p(v)`: a segment-sum of `[..., V]` probabilities over the
    `[V, k]` spelling table, giving `[..., k, C]`. Among factorized distributions `∏_i q_i`,
    these marginals minimise `KL(p ‖ ∏_i q_i)`."""
    lead = teacher_probs.shape[:-1]
    flat = teacher_probs.reshape(-1, teacher_probs.shape[-1]).T  # [V, N]
    per_head = [jax.ops.segment_sum(flat, table[:, i], num_segments=num_symbols)
                for i in range(table.shape[1])]  # k x [C, N]
    return jnp.stack(per_head).transpose(2, 0, 1).reshape(*lead, table.shape[1], num_symbols)


def spelled_log_probs(symbol_log_probs: jax.Array, table: jax.Array) -> jax.Array:
    """`Σ_i log q_i(spell(v)_i)` for every token v: `[..., k, C]` -> `[..., V]`, as k gathers of
    V symbols (one per head) summed in place. One gather of `[V, k]` indices would materialise a
    `[..., V, k]` temporary (1.7 GB for 4 x 128 positions of SmolLM2)."""
    return sum(jnp.take(symbol_log_probs[..., i, :], table[:, i], axis=-1)
               for i in range(table.shape[1]))


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Distillation targets: soft per-head marginal KL, hard CE on the spelled teacher argmax."""

    soft_weight: float = 1.0
    hard_weight: float = 0.0
    temperature: float = 1.0
    chunk_size: int = 128  # sequence positions whose [B, chunk, V] teacher logits exist at once

    def __post_init__(self) -> None:
        if self.soft_weight < 0 or self.hard_weight < 0 or self.soft_weight + self.hard_weight == 0:
            raise ValueError(f"loss weights soft={self.soft_weight}, hard={self.hard_weight}: both "
                             "must be >= 0 and at least one > 0.")
        if self.temperature <= 0 or self.chunk_size < 1:
            raise ValueError("loss temperature must be > 0 and chunk_size >= 1.")




def position_losses(char_logits: jax.Array, teacher_logits: jax.Array, table: jax.Array,
                    lengths: jax.Array, valid: jax.Array, config: LossConfig
                    ) -> dict[str, jax.Array]:
    """Per-position losses and metrics for `[..., k, C]` student and `[..., V]` teacher logits."""
    k, num_symbols = char_logits.shape[-2:]
    teacher_logits = jnp.where(valid, teacher_logits.astype(jnp.float32), -jnp.inf)
    teacher_probs = jax.nn.softmax(teacher_logits / config.temperature, axis=-1)
    targets = symbol_marginals(teacher_probs, table, num_symbols)  # [..., k, C]
    student_log_probs = jax.nn.log_softmax(char_logits / config.temperature, axis=-1)
    soft_per_head = jnp.sum(
        jnp.where(targets > 0, targets * (jnp.log(jnp.maximum(targets, 1e-30)) - student_log_probs),
                  0.0), axis=-1) * config.temperature**2  # [..., k]
    teacher_token = jnp.argmax(teacher_logits, axis=-1)
    target_rows = table[teacher_token]  # [..., k]
    log_probs = jax.nn.log_softmax(char_logits, axis=-1)
    hard_per_head = -jnp.take_along_axis(log_probs, target_rows[..., None], axis=-1)[..., 0]
    head_correct = jnp.argmax(char_logits, axis=-1) == target_rows
    loss = (config.soft_weight * soft_per_head.sum(-1) + config.hard_weight * hard_per_head.sum(-1))
    return {
        "loss": loss,
        "soft_kl": soft_per_head.sum(-1),
        "hard_ce": hard_per_head.sum(-1),
        "soft_kl_per_head": soft_per_head,
        "head_acc": head_correct.astype(jnp.float32),
        "exact_token_acc": jnp.all(head_correct, axis=-1).astype(jnp.float32),
        "truncated_share": (lengths[teacher_token] > k).astype(jnp.float32),
    }


def chunked_distillation_loss(student_hidden: jax.Array, teacher_hidden: jax.Array,
                              student_head, teacher_head, table: jax.Array, lengths: jax.Array,
                              valid: jax.Array, mask: jax.Array, config: LossConfig
                              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean loss over masked positions, computed `chunk_size` positions at a time.

    `student_head(h) -> [..., k, C]` and `teacher_head(h) -> [..., V]` map final hidden states
    `[B, T, d]` to logits; each chunk is rematerialised in the backward pass, so only one chunk's
    `[B, chunk, V]` teacher logits exist at any time. Returns the loss and summed metrics.
    """
    batch, length, _ = student_hidden.shape
    chunk = min(config.chunk_size, length)
    if length % chunk:
        raise ValueError(f"sequence length {length} is not a multiple of loss chunk_size {chunk}.")
    num_chunks = length // chunk

    def split(x):
        return x.reshape(batch, num_chunks, chunk, *x.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint
    def chunk_sums(carry, xs):
        h_student, h_teacher, m = xs
        per_position = position_losses(student_head(h_student),
                                       jax.lax.stop_gradient(teacher_head(h_teacher)),
                                       table, lengths, valid, config)
        m = m.astype(jnp.float32)
        sums = {name: jnp.einsum("bt,bt...->...", m, value) for name, value in per_position.items()}
        return jax.tree.map(jnp.add, carry, sums), None

    k = table.shape[1]
    zeros = {name: jnp.zeros(()) for name in ("loss", "soft_kl", "hard_ce", "exact_token_acc",
                                             "truncated_share")}
    zeros |= {"soft_kl_per_head": jnp.zeros((k,)), "head_acc": jnp.zeros((k,))}
    sums, _ = jax.lax.scan(chunk_sums, zeros,
                           (split(student_hidden), split(teacher_hidden), split(mask)))
    sums["tokens"] = mask.astype(jnp.float32).sum()
    return sums["loss"] / jnp.maximum(sums["tokens"], 1.0), sums
