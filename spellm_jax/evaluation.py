"""How close a SpeLLM is to its teacher, measured on held-out data.

Three sets, all from the corpora's held-out documents: real text (teacher-forced rows), the
teacher's greedy continuations of held-out prompts, and a last-word completion task. At every
position one jitted pass gives the teacher's argmax and log-probabilities, the SpeLLM's free and
vocabulary-constrained choices and its renormalised log-probabilities, what heads holding the
teacher's exact symbol marginals would choose (the independence ceiling), and what a chain decoder
holding the teacher's exact conditionals would choose, greedily and with beams (the chain
ceiling); agreement is also broken down by the teacher's confidence, with the SpeLLM's misses
where the teacher is sure of its token.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spellm_jax import decoding, tokenizers
from spellm_jax.data.last_word import LastWordItem
from spellm_jax.metrics import continuation_rows, spelled_choices
from spellm_jax.models.char_decoders.chain import up_to_first_pad
from spellm_jax.models.char_decoders.search import search_rows
from spellm_jax.spelling import RESPELL_MODES, DeviceSpelling, Respeller, SpellingTable

CEILING_KS = (4, 6, 8, 12, 16, 24)
CHAIN_BEAMS = (1, 2, 4)  # beams of the chain ceiling
# Bins of the teacher's top-token probability for agreement by confidence (the last bin closed).
CONFIDENCE_EDGES = (0.0, 0.25, 0.5, 0.75, 1.0)
CONFIDENT = 0.75  # misses where the teacher's top token has at least this probability are listed
ROWS_PER_CALL = 32  # rows of one jitted call (one compilation per row length)


def independence_ceiling(teacher_logits: jax.Array, spelling: DeviceSpelling
                         ) -> tuple[jax.Array, jax.Array]:
    """Free and vocabulary-constrained choices `[T]` of heads that output the teacher's exact
    per-position symbol marginals (the best any independent heads can do)."""
    marginals = spelling.symbol_marginals(jax.nn.softmax(teacher_logits, axis=-1))
    free = spelling.lookup(jnp.argmax(marginals, axis=-1))
    return free, jnp.argmax(spelling.token_scores(jnp.log(marginals)), axis=-1)


def chain_ceiling(teacher_logits: jax.Array, spelling: DeviceSpelling, beam: int,
                  constrained: bool) -> jax.Array:
    """The choices `[T]` of a chain decoder that outputs the teacher's exact conditionals
    `q(c_i | c_<i)` (its string distribution is the teacher's), searched greedily or with `beam`
    hypotheses, free or within the vocabulary's prefix trie."""
    probs = jax.nn.softmax(teacher_logits, axis=-1)  # [T, V]
    table = spelling.table[...]
    length, vocab_size = probs.shape

    def step(in_prefix, previous, i):  # in_prefix [T, B, V]: tokens whose rows start so
        if previous is not None:
            in_prefix = in_prefix & (table[:, i - 1] == previous[..., None])
        flat = jnp.where(in_prefix, probs[:, None], 0.0).reshape(-1, vocab_size)
        mass = jax.ops.segment_sum(flat.T, table[:, i], num_segments=spelling.num_symbols).T
        return jnp.log(mass.reshape(length, beam, -1)), in_prefix

    rows = search_rows(step, jnp.ones((length, beam, vocab_size), bool), spelling.k,
                       spelling.pad_symbol, trie=spelling if constrained else None, beam=beam,
                       unroll=False)
    return spelling.lookup(rows)


def _following(ids: jax.Array) -> jax.Array:
    """The token after each position `[T]` (the first token at the last position)."""
    return jnp.concatenate([ids[1:], ids[:1]])


def _next_log_probs(log_probs: jax.Array, ids: jax.Array) -> jax.Array:
    """`log p(ids[t + 1])` at each position t `[T]` (0 at the last position)."""
    picked = jnp.take_along_axis(log_probs, _following(ids)[:, None], axis=-1)[:, 0]
    return picked.at[-1].set(0.0)


@functools.partial(nnx.jit, static_argnames=("full", "beam"))
def _row_outputs(spellm, teacher, ids: jax.Array, full: bool = True, beam: int = 1
                 ) -> dict[str, jax.Array]:
    """Per-position outputs of rows `[N, T]`, one row at a time: the choices of teacher and
    SpeLLM and, if `full`, log-probabilities of the next token, the target rows' teacher-forced
    symbol choices and the ceiling."""

    def one_row(row_ids):
        teacher_logits = teacher(row_ids[None])[0]
        hidden = spellm.model(row_ids[None])[0][0]
        outputs = spelled_choices(spellm, hidden, beam)
        outputs["teacher"] = jnp.argmax(teacher_logits, axis=-1)
        if full:
            outputs["teacher_top_prob"] = jnp.max(jax.nn.softmax(teacher_logits, axis=-1), -1)
            ceiling_free, ceiling_vocab = independence_ceiling(teacher_logits, spellm.spelling)
            target_rows = spellm.spelling.rows_of(outputs["teacher"])
            outputs["forced_rows"] = jnp.argmax(spellm.char_heads.logits(hidden, target_rows), -1)
            for width in CHAIN_BEAMS:
                for mode in ("free", "vocab"):
                    outputs[f"chain_{mode}_beam{width}"] = chain_ceiling(
                        teacher_logits, spellm.spelling, width, constrained=mode == "vocab")
            outputs |= {
                "spellm_logp": spellm.char_heads.token_log_probs(
                    hidden, spellm.spelling.rows_of(_following(row_ids)), spellm.spelling
                ).at[-1].set(0.0),
                "teacher_logp": _next_log_probs(jax.nn.log_softmax(teacher_logits, axis=-1),
                                                row_ids),
                "ceiling_free": ceiling_free, "ceiling_vocab": ceiling_vocab}
        return outputs

    return jax.lax.map(one_row, ids)


@nnx.jit
def _ceiling_rows(teacher, ids: jax.Array, spelling: DeviceSpelling
                  ) -> tuple[jax.Array, jax.Array]:
    return jax.lax.map(lambda row: independence_ceiling(teacher(row[None])[0], spelling), ids)


@nnx.jit
def _teacher_argmax(teacher, ids: jax.Array) -> jax.Array:
    return jax.lax.map(lambda row: jnp.argmax(teacher(row[None])[0], axis=-1), ids)


def _batched(rows: np.ndarray, fn: Callable[[jax.Array], Any], progress: str | None) -> Any:
    """`fn` over chunks of up to ROWS_PER_CALL rows (the last padded by repeating its first row),
    concatenated."""
    from tqdm import tqdm

    outputs = []
    size = min(ROWS_PER_CALL, len(rows))
    starts = range(0, len(rows), size)
    for start in tqdm(starts, desc=progress, disable=progress is None or len(starts) < 2,
                      leave=False):
        chunk = rows[start:start + size]
        padded = np.concatenate([chunk, np.repeat(chunk[:1], size - len(chunk), 0)])
        outputs.append(jax.device_get(fn(jnp.asarray(padded))))
    joined = jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)
    return jax.tree.map(lambda x: x[:len(rows)], joined)


def position_outputs(spellm, teacher, rows: np.ndarray, progress: str | None = None,
                     full: bool = True, beam: int = 1) -> dict[str, np.ndarray]:
    """`_row_outputs` for any number of rows `[N, T]`, as numpy."""
    return _batched(rows, lambda ids: _row_outputs(spellm, teacher, ids, full=full, beam=beam),
                    progress)


def emitted_strings(free_rows: np.ndarray, free_tokens: np.ndarray, respeller: Respeller,
                    respell: str = "device") -> dict[str, float]:
    """What free decoding would feed back for each emitted row: shares of rows that are one token,
    several input tokens (segmented by `respell`), or nothing usable; mean input ids per step;
    and the share of rows the two respell modes segment differently."""
    counts = np.where(free_tokens >= 0, 1, 0)
    differ = np.zeros(len(free_tokens), bool)
    for index in np.flatnonzero(free_tokens < 0):
        ids = {mode: respeller.ids_for_row(free_rows[index], mode) for mode in RESPELL_MODES}
        counts[index], differ[index] = len(ids[respell]), len(set(map(tuple, ids.values()))) > 1
    one = free_tokens >= 0
    return {"one_token_share": float(one.mean()),
            "several_tokens_share": float((~one & (counts > 0)).mean()),
            "unusable_share": float((counts == 0).mean()),
            "respell_modes_differ_share": float(differ.mean()),
            "mean_input_tokens_per_step": float(counts.mean())}


def agreement_by_confidence(top_prob: np.ndarray, hits: dict[str, np.ndarray],
                            edges: Sequence[float] = CONFIDENCE_EDGES) -> list[dict[str, Any]]:
    """Per bin of the teacher's top-token probability `[P]`: the bin, its share of the positions
    and the mean of each hit array `[P]` there (None for an empty bin). Where the teacher's top
    token has p > 0.5 even exact independent marginals pick it, so misses there are the
    decoder's, not the method's."""
    bins = np.clip(np.searchsorted(edges, top_prob, side="right") - 1, 0, len(edges) - 2)
    rows = []
    for index, (low, high) in enumerate(itertools.pairwise(edges)):
        inside = bins == index
        rows.append({"teacher_top_prob": [low, high], "share": float(inside.mean()),
                     **{name: float(hit[inside].mean()) if inside.any() else None
                        for name, hit in hits.items()}})
    return rows


def confident_misses(top_prob: np.ndarray, teacher: np.ndarray, free_rows: np.ndarray,
                     free_tokens: np.ndarray, spelling: SpellingTable, examples: int = 12
                     ) -> dict[str, Any]:
    """Free decoding's misses where the teacher's top token has p >= `CONFIDENT` (every exact
    decoder follows it there): how many, at which symbol each first departs from the teacher's
    spelling (`first_wrong_symbol[i]`: misses whose first wrong symbol is i), and the first
    `examples` as (p, teacher's string, SpeLLM's string)."""
    confident = top_prob >= CONFIDENT
    missed = np.flatnonzero(confident & (free_tokens != teacher))
    wrong = free_rows[missed] != spelling.table[teacher[missed]]
    first_wrong = np.bincount(np.argmax(wrong, axis=1)[wrong.any(axis=1)], minlength=spelling.k)

    def text(data: bytes) -> str:
        return data.decode("utf-8", errors="backslashreplace")

    return {"positions": int(confident.sum()), "misses": len(missed),
            "first_wrong_symbol": first_wrong.tolist(),
            "examples": [[round(float(top_prob[i]), 3), text(spelling.spellings[teacher[i]]),
                          text(spelling.unspell(free_rows[i])[0])] for i in missed[:examples]]}


def word_row_split(teacher: np.ndarray, free: np.ndarray, word_tokens: Sequence[int]
                   ) -> dict[str, float]:
    """For a decoder with word rows (a chain decoder's shortlist): how often the teacher's
    argmax is one of their tokens, and free agreement where it is and where it must be spelled."""
    if not len(word_tokens):
        return {}
    inside, hit = np.isin(teacher, np.asarray(word_tokens)), free == teacher
    return {"word_row_share": float(inside.mean()),
            "free_agreement_word_rows": float(hit[inside].mean()) if inside.any() else None,
            "free_agreement_spelled": float(hit[~inside].mean()) if (~inside).any() else None}


def agreement_metrics(outputs: dict[str, np.ndarray], mask: np.ndarray, ids: np.ndarray,
                      respeller: Respeller, respell: str = "device",
                      word_tokens: Sequence[int] = ()) -> dict[str, Any]:
    """Everything measured at the masked positions of teacher-forced rows `ids` `[N, T]` (a
    position predicts the next token; targets are the teacher's argmax there); `word_tokens`:
    the decoder's word rows, if it has any."""
    mask, spelling = mask.astype(bool), respeller.spelling
    teacher = outputs["teacher"][mask]
    forced = outputs["forced_rows"][mask]  # each symbol given the target's symbols before it
    target_rows = spelling.table[teacher]
    head_acc = (forced == target_rows).mean(axis=0)
    spelled = np.asarray(up_to_first_pad(target_rows, spelling.pad_symbol), bool)
    following = np.concatenate([ids[:, 1:], ids[:, :1]], axis=1)[mask]
    nats_to_bits = 1 / np.log(2)
    num_bytes = max(int(spelling.lengths[following].sum()), 1)
    metrics = {
        "positions": int(mask.sum()),
        "free_agreement": float((outputs["free"][mask] == teacher).mean()),
        "vocab_agreement": float((outputs["vocab"][mask] == teacher).mean()),
        "ceiling_free_agreement": float((outputs["ceiling_free"][mask] == teacher).mean()),
        "ceiling_vocab_agreement": float((outputs["ceiling_vocab"][mask] == teacher).mean()),
        "chain_ceiling": {name.removeprefix("chain_"): float((value[mask] == teacher).mean())
                          for name, value in outputs.items() if name.startswith("chain_")},
        # Symbols past the target's first PAD do not change the token decoding emits.
        "exact_token_accuracy": float(((forced == target_rows) | ~spelled).all(axis=1).mean()),
        # The teacher's token is the one token its table row names (spelled in full, canonical):
        # the most free decoding of any decoder with this table can agree.
        "representable_share": float((spelling.canonical[teacher]
                                      & (spelling.lengths[teacher] <= spelling.k)).mean()),
        "head_accuracy": [float(a) for a in head_acc],
        "spellm_bits_per_byte": float(-outputs["spellm_logp"][mask].sum() * nats_to_bits / num_bytes),
        "teacher_bits_per_byte": float(-outputs["teacher_logp"][mask].sum() * nats_to_bits
                                       / num_bytes),
        "by_teacher_confidence": agreement_by_confidence(outputs["teacher_top_prob"][mask], {
            "free_agreement": outputs["free"][mask] == teacher,
            "chain_ceiling_greedy": outputs["chain_free_beam1"][mask] == teacher,
            "independence_ceiling": outputs["ceiling_free"][mask] == teacher}),
        "confident_misses": confident_misses(outputs["teacher_top_prob"][mask], teacher,
                                             outputs["free_rows"][mask], outputs["free"][mask],
                                             spelling),
    }
    return (metrics | word_row_split(teacher, outputs["free"][mask], word_tokens)
            | emitted_strings(outputs["free_rows"][mask], outputs["free"][mask], respeller,
                              respell))


def ceiling_against_k(teacher, tokenizer, vocab_size: int, rows: np.ndarray, mask: np.ndarray,
                      ks: Sequence[int] = CEILING_KS) -> dict[int, dict[str, float]]:
    """The independence ceiling (free and vocabulary-constrained agreement) for each k."""
    from tqdm import tqdm

    targets = _batched(rows, lambda ids: _teacher_argmax(teacher, ids), None)
    results = {}
    for k in tqdm(ks, desc="ceiling against k", leave=False):
        spelling = DeviceSpelling.of(SpellingTable.from_tokenizer(tokenizer, k, vocab_size))
        free, vocab = _batched(rows, lambda ids, s=spelling: _ceiling_rows(teacher, ids, s), None)
        agree = {"free": free == targets, "vocab": vocab == targets}
        results[k] = {name: float(a[mask.astype(bool)].mean()) for name, a in agree.items()}
    return results


def matching_prefix(reference: Sequence[int], other: Sequence[int]) -> int:
    """Tokens before the first divergence of `other` from `reference`."""
    for index, (a, b) in enumerate(zip(reference, other, strict=False)):
        if a != b:
            return index
    return min(len(reference), len(other))


def greedy_continuations(spellm, teacher, prompts, new_tokens: int, respeller: Respeller,
                         eos_ids: Sequence[int], pad_id: int, beam: int = 1,
                         respell: str = "device") -> dict[str, list[list[int]]]:
    """Greedy continuations of `prompts` by the teacher (LM head) and by the SpeLLM (free, with
    strings that are not one token segmented by `respell`; vocab; the best of `beam` strings per
    step where the decoder searches)."""
    runs = {"teacher": (teacher, decoding.LMHeadRule()),
            "free": (spellm, decoding.FreeRule(respeller=respeller, beam=beam, respell=respell)),
            "vocab": (spellm, decoding.VocabRule(beam=beam))}
    return {name: decoding.generate(model, prompts, new_tokens, rule, eos_ids=eos_ids,
                                    pad_id=pad_id).tokens for name, (model, rule) in runs.items()}


def _starts_a_word(data: bytes) -> bool:
    return bool(data) and chr(data[0]).isalnum()


def last_word_accuracy(spellm, teacher, spelling: SpellingTable, items: Sequence[LastWordItem],
                       pad_id: int, progress: str | None = None, beam: int = 1
                       ) -> dict[str, float]:
    """Share of items whose target word greedy decoding reproduces, for the teacher (LM head) and
    the SpeLLM (free, vocab; the best of `beam` strings for the chain kind): the string chosen
    at each target position (teacher-forced) equals the target token's spelling, and the one
    after the word does not continue it. Same prompts, same code, for all three."""
    length = max(len(i.context_ids) + len(i.target_ids) for i in items)
    rows = np.full((len(items), length), pad_id, np.int32)
    for row, item in enumerate(items):
        rows[row, :len(item.context_ids) + len(item.target_ids)] = item.context_ids + item.target_ids
    outputs = position_outputs(spellm, teacher, rows, progress, full=False, beam=beam)

    def token_string(token: int) -> bytes:
        return spelling.spellings[token] if token >= 0 else b""

    choosers = {"teacher": lambda r, t: token_string(outputs["teacher"][r, t]),
                "vocab": lambda r, t: token_string(outputs["vocab"][r, t]),
                "free": lambda r, t: spelling.unspell(outputs["free_rows"][r, t])[0]}
    correct = dict.fromkeys(choosers, 0)
    for row, item in enumerate(items):
        first = len(item.context_ids) - 1  # the position that predicts the first target token
        targets = [spelling.spellings[t] for t in item.target_ids]
        for name, chosen in choosers.items():
            hits = all(chosen(row, first + j) == target for j, target in enumerate(targets))
            correct[name] += hits and not _starts_a_word(chosen(row, first + len(targets)))
    return {f"{name}_accuracy": count / len(items) for name, count in correct.items()}


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What `evaluate` measures on; every set comes from the corpora's held-out documents."""

    corpora: tuple[str, ...] = ("shakespeare", "wiki")
    real_text_rows: int = 16  # teacher-forced rows of real text, spread over the documents
    seq_len: int = 128
    prompts: int = 32  # prompts whose greedy continuations the teacher and the SpeLLM write
    prompt_tokens: int = 24
    new_tokens: int = 32
    last_word_items: int = 500
    last_word_context: int = 40  # context tokens before each target word
    ceiling_ks: tuple[int, ...] = CEILING_KS
    seed: int = 0
    beam: int = 1  # strings the SpeLLM's decoder searches per step (chain kind)
    respell: str = "device"  # free decoding's strings that are not one token: spelling.RESPELL_MODES


def _real_text_rows(documents: dict[str, str], tokenizer, settings: EvalSettings
                    ) -> tuple[np.ndarray, np.ndarray]:
    from spellm_jax.data import pack_documents

    packed = pack_documents(list(documents.values()), tokenizer, settings.seq_len)
    pick = np.unique(np.linspace(0, len(packed.tokens) - 1, settings.real_text_rows).astype(int))
    mask = np.zeros(packed.tokens[pick].shape, bool)
    mask[:, :-1] = packed.loss_mask[pick][:, 1:]  # position t predicts token t + 1
    return packed.tokens[pick], mask


def evaluate(spellm, teacher, respeller: Respeller, settings: EvalSettings) -> dict[str, Any]:
    """All metrics of a SpeLLM against its teacher (an LM-head model), as a JSON-ready dict;
    `respeller` holds the SpeLLM's spelling table and tokenizer."""
    from spellm_jax.data import evaluation_prompts
    from spellm_jax.data.last_word import last_word_items
    from spellm_jax.data.sources import read_documents

    spelling, tokenizer = respeller.spelling, respeller.tokenizer
    pad_id = tokenizers.pad_id(tokenizer)
    documents = read_documents(settings.corpora, "heldout")
    rows, mask = _real_text_rows(documents, tokenizer, settings)
    outputs = position_outputs(spellm, teacher, rows, "real text", beam=settings.beam)
    word_tokens = spellm.heads_config.shortlist_tokens
    real_text = agreement_metrics(outputs, mask, rows, respeller, settings.respell, word_tokens)

    prompts = evaluation_prompts(settings.corpora, tokenizer, settings.prompts,
                                 settings.prompt_tokens, settings.seed)
    generations = greedy_continuations(spellm, teacher, prompts, settings.new_tokens, respeller,
                                       list(spellm.config.eos_token_ids), pad_id, settings.beam,
                                       settings.respell)
    rows, mask = continuation_rows(prompts, generations["teacher"], pad_id)
    outputs = position_outputs(spellm, teacher, rows, "continuations", beam=settings.beam)
    continuations = agreement_metrics(outputs, mask, rows, respeller, settings.respell,
                                      word_tokens)
    for mode in ("free", "vocab"):
        prefixes = [matching_prefix(reference, other) for reference, other
                    in zip(generations["teacher"], generations[mode], strict=True)]
        continuations[f"{mode}_median_matching_prefix"] = float(np.median(prefixes))
    ceiling = ceiling_against_k(teacher, tokenizer, spellm.config.vocab_size, rows, mask,
                                settings.ceiling_ks)

    items = last_word_items(documents, tokenizer, settings.last_word_items,
                            settings.last_word_context)
    last_word = last_word_accuracy(spellm, teacher, spelling, items, pad_id, "last word",
                                   settings.beam)
    return {"k": spelling.k, "settings": dataclasses.asdict(settings), "real_text": real_text,
            "continuations": continuations,
            "ceiling_against_k": {str(k): v for k, v in ceiling.items()},
            "last_word": last_word | {"items": len(items)}}
