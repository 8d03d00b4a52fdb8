"""Log-likelihoods and greedy hits of (context, continuation) pairs, batched, on any backend.

A pair is tokenized as lm-evaluation-harness does it: spaces at the end of the context move to
the continuation, the context is encoded alone and the continuation is what encoding the whole
string adds after it (an empty context is replaced by the EOS token). One row per pair holds
context + continuation (minus its last token), truncated on the left to `max_length`; rows are
grouped by padded shape so a handful of shapes are compiled, and only the hidden states that
predict a continuation token reach the output layer.

A backend maps a batch to the per-token log-probability of each continuation token and, for each
of its greedy modes, whether that mode would have chosen the token. `JaxBackend` serves the
teacher (`teacher_scores`, its LM head) and the SpeLLM (`spellm_scores`, its character heads).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DEFAULT_BATCH = 16
# Rows and continuations are padded to powers of two at least this long: few compiled shapes.
MIN_ROW_BUCKET = 32
MIN_CONTINUATION_BUCKET = 8


@dataclasses.dataclass(frozen=True)
class Pair:
    """Token ids of one request."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


def encode_pair(tokenizer: Any, context: str, continuation: str) -> Pair:
    """The ids of a request, split where lm-evaluation-harness splits them."""
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    if not continuation:
        raise ValueError(f"empty continuation after context {context[-80:]!r}.")
    whole = tokenizer(stripped + continuation, add_special_tokens=False)["input_ids"]
    if not stripped:
        prefix = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
        return Pair((prefix,), tuple(whole))
    context_ids = tokenizer(stripped, add_special_tokens=False)["input_ids"]
    return Pair(tuple(context_ids), tuple(whole[len(context_ids):]))


@dataclasses.dataclass(frozen=True)
class Batch:
    """Rows `[B, T]` (right-padded), the row index `starts` `[B]` of the position predicting each
    continuation's first token, its tokens `targets` `[B, L]` and their mask."""

    ids: np.ndarray
    starts: np.ndarray
    targets: np.ndarray
    mask: np.ndarray


class Backend(Protocol):
    """Scores batches for one model; `modes` name its greedy choices ("lm_head", "vocab", ...)."""

    modes: tuple[str, ...]

    def score(self, batch: Batch) -> dict[str, np.ndarray]:
        """`log_probs` `[B, L]` of the targets and `hits/<mode>` `[B, L]` bools."""
        ...


@dataclasses.dataclass(frozen=True)
class Scores:
    """Per pair: the continuation's summed log-probability, its token count, and for each greedy
    mode whether every continuation token is that mode's choice."""

    log_prob: np.ndarray  # [N] float64
    num_tokens: np.ndarray  # [N]
    greedy: dict[str, np.ndarray]  # mode -> [N] bool


def _bucket(n: int, smallest: int) -> int:
    return max(smallest, 1 << (n - 1).bit_length())


def _row(pair: Pair, max_length: int) -> tuple[list[int], int]:
    """The row fed for a pair (at most `max_length` ids) and the index predicting its first
    continuation token."""
    whole = [*pair.context, *pair.continuation][-(max_length + 1):]
    if len(whole) <= len(pair.continuation):
        raise ValueError(f"a continuation of {len(pair.continuation)} tokens leaves no context "
                         f"within max_length={max_length}.")
    return whole[:-1], len(whole) - len(pair.continuation) - 1


def batches(pairs: Sequence[Pair], batch_size: int, max_length: int
            ) -> list[tuple[np.ndarray, Batch]]:
    """`(pair indices, batch)` covering every pair once; pairs of the same padded shape go
    together, a short last batch of a shape repeats its first pair (dropped when read back)."""
    groups: dict[tuple[int, int], list[int]] = {}
    rows = [_row(pair, max_length) for pair in pairs]
    for index, (pair, (row, _)) in enumerate(zip(pairs, rows, strict=True)):
        shape = (min(_bucket(len(row), MIN_ROW_BUCKET), max_length),
                 _bucket(len(pair.continuation), MIN_CONTINUATION_BUCKET))
        groups.setdefault(shape, []).append(index)
    out = []
    for (length, width), members in sorted(groups.items(), reverse=True):
        for start in range(0, len(members), batch_size):
            chosen = members[start:start + batch_size]
            chosen += chosen[:1] * (batch_size - len(chosen))
            ids = np.zeros((batch_size, length), np.int32)
            targets = np.zeros((batch_size, width), np.int32)
            mask = np.zeros((batch_size, width), bool)
            starts = np.zeros(batch_size, np.int32)
            for b, index in enumerate(chosen):
                row, starts[b] = rows[index]
                continuation = pairs[index].continuation
                ids[b, :len(row)] = row
                targets[b, :len(continuation)] = continuation
                mask[b, :len(continuation)] = True
            out.append((np.asarray(members[start:start + batch_size]),
                        Batch(ids, starts, targets, mask)))
    return out


def score_pairs(backend: Backend, pairs: Sequence[Pair], batch_size: int = DEFAULT_BATCH,
                max_length: int = 2048, progress: str | None = None) -> Scores:
    """Every pair scored by `backend`, with a progress bar labelled `progress` (None: silent)."""
    from tqdm import tqdm

    log_prob = np.zeros(len(pairs), np.float64)
    num_tokens = np.array([len(p.continuation) for p in pairs], np.int32)
    greedy = {mode: np.zeros(len(pairs), bool) for mode in backend.modes}
    work = batches(pairs, batch_size, max_length)
    for members, batch in tqdm(work, desc=progress, disable=progress is None, unit="batch",
                               leave=False):
        out = backend.score(batch)
        n = len(members)
        log_prob[members] = np.where(batch.mask, out["log_probs"], 0.0)[:n].sum(axis=1)
        for mode in backend.modes:
            greedy[mode][members] = (out[f"hits/{mode}"] | ~batch.mask)[:n].all(axis=1)
    return Scores(log_prob, num_tokens, greedy)


def spells_target(rows: jax.Array, spelling: Any, targets: jax.Array) -> jax.Array:
    """Whether the string of each symbol row `[..., k]` (up to its first PAD) is exactly the
    spelling of the target token `[...]`: equal up to and including the target row's PAD, and
    the token not longer than k."""
    length = spelling.lengths[...][targets]
    compared = jnp.arange(rows.shape[-1]) <= length[..., None]
    same = (rows == spelling.rows_of(targets)) | ~compared
    return jnp.all(same, axis=-1) & (length <= rows.shape[-1])


def _picked(log_probs: jax.Array, targets: jax.Array) -> jax.Array:
    return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def teacher_scores(model, hidden: jax.Array, targets: jax.Array, beam: int = 1
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The LM head's log-probability of each target `[..., ]` and whether it is its argmax."""
    del beam
    log_probs = jax.nn.log_softmax(model.lm_logits(hidden), axis=-1)
    return _picked(log_probs, targets), {"lm_head": jnp.argmax(log_probs, axis=-1) == targets}


def spellm_scores(model, hidden: jax.Array, targets: jax.Array, beam: int = 1
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The SpeLLM's log-probability of each target token (its decoder's `token_log_probs`: the
    distribution over the vocabulary whose bits per byte `evaluation` reports), and whether
    vocabulary-constrained and free decoding (with `beam` strings) would emit its spelling."""
    decoder, spelling = model.char_heads, model.spelling
    target_rows = spelling.rows_of(targets)
    log_probs = decoder.token_log_probs(hidden, target_rows, spelling)
    vocab = model.choose(hidden, constrained=True, beam=beam)
    free = model.choose(hidden, beam=beam)
    return log_probs, {"vocab": jnp.all(vocab == target_rows, axis=-1),
                       "free": spells_target(free, spelling, targets)}


HeadScores = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


@functools.partial(nnx.jit, static_argnames=("head", "beam"))
def _score(model, ids: jax.Array, starts: jax.Array, targets: jax.Array, head: HeadScores,
           beam: int) -> dict[str, jax.Array]:
    hidden, _ = model.model(ids)
    index = jnp.minimum(starts[:, None] + jnp.arange(targets.shape[1]), ids.shape[1] - 1)
    hidden = jnp.take_along_axis(hidden, index[..., None], axis=1)  # [B, L, d]
    log_probs, hits = head(model, hidden, targets, beam)
    return {"log_probs": log_probs} | {f"hits/{mode}": hit for mode, hit in hits.items()}


@dataclasses.dataclass(frozen=True)
class JaxBackend:
    """A spellm_jax model (pass `fused_for_inference(model)` for speed) and its output scoring;
    `beam`: the strings the SpeLLM's decoder searches for its greedy choices."""

    model: nnx.Module
    head: HeadScores = teacher_scores
    modes: tuple[str, ...] = ("lm_head",)
    beam: int = 1

    @classmethod
    def teacher(cls, model: nnx.Module) -> JaxBackend:
        return cls(model, teacher_scores, ("lm_head",))

    @classmethod
    def spellm(cls, model: nnx.Module, beam: int = 1) -> JaxBackend:
        return cls(model, spellm_scores, ("vocab", "free"), beam)

    def score(self, batch: Batch) -> dict[str, np.ndarray]:
        out = _score(self.model, jnp.asarray(batch.ids), jnp.asarray(batch.starts),
                     jnp.asarray(batch.targets), head=self.head, beam=self.beam)
        return jax.device_get(out)
