"""The chain-rule character decoder: head i sees the symbols chosen before it.

Linear heads on the final hidden state plus a small recurrence of width r fed the previous
symbol: `s_0 = tanh(P h)`, `s_i = silu(U s_{i-1} + E_i[c_{i-1}] (+ Q_i h))`, `logits_i = W_i h +
b_i + V_i s_i`; with `hidden_every_step` every step rereads the hidden state through its `Q_i`.
`V` (and `Q`) start at zero, so without a shortlist the decoder starts as the independent heads
(it takes their trained `kernel` and `bias` from an independent run either way). The string
distribution is the product of the conditionals, so its targets are the teacher's exact
conditionals along the target spelling: `q_i(c | prefix)`, the teacher's mass on tokens
continuing the prefix with c over its mass on the prefix. With a shortlist (`shortlist.py`)
frequent tokens have their own rows and a rest row takes the mass of all others: the chain then
spells only those, and its targets are the teacher's conditionals over them. Greedy decoding
then checks the chain's tokens against the LM head's rows (`ChainHeads._checked`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from spellm_jax import sharding
from spellm_jax.models.char_decoders.base import HeadsConfig, register_decoder
from spellm_jax.models.char_decoders.independent import IndependentHeads
from spellm_jax.models.char_decoders.search import forced_log_probs, search_rows
from spellm_jax.models.char_decoders.shortlist import Shortlist
from spellm_jax.models.llama import RuntimeOptions
from spellm_jax.sampling import GREEDY, Sampling, sample
from spellm_jax.spelling import DeviceSpelling, SpellingTable

PREFIX_SUM_BLOCK = 64


@dataclasses.dataclass(frozen=True)
class BlockPrefixSums:
    """Prefix sums of each row of `[N, V]` kept as sums within blocks of `PREFIX_SUM_BLOCK`
    (one matmul with a triangular matrix) and each block's offset: on CPU a fraction of the time
    of `jnp.cumsum`'s log-depth scan over V, and never a second `[N, V]` pass to add offsets."""

    within: jax.Array  # [N, V']: inclusive sums inside each block (V' = V padded to blocks)
    offsets: jax.Array  # [N, V' / block]: the sum of all earlier blocks

    @classmethod
    def of(cls, x: jax.Array) -> BlockPrefixSums:
        n, v = x.shape
        blocks = jnp.pad(x, ((0, 0), (0, -v % PREFIX_SUM_BLOCK))).reshape(n, -1, PREFIX_SUM_BLOCK)
        triangle = jnp.triu(jnp.ones((PREFIX_SUM_BLOCK, PREFIX_SUM_BLOCK), x.dtype))
        within = jnp.einsum("nbi,ij->nbj", blocks, triangle, precision=jax.lax.Precision.HIGHEST)
        totals = within[..., -1]
        return cls(within.reshape(n, -1), jnp.cumsum(totals, axis=-1) - totals)

    def before(self, index: jax.Array) -> jax.Array:
        """`Σ_{j < index} x[n, j]` for indices `[N, M]`."""
        last = jnp.maximum(index - 1, 0)
        total = (jnp.take_along_axis(self.within, last, -1)
                 + jnp.take_along_axis(self.offsets, last // PREFIX_SUM_BLOCK, -1))
        return jnp.where(index > 0, total, 0.0)


def chain_targets(token_weights: jax.Array, rows: jax.Array, spelling: DeviceSpelling
                  ) -> jax.Array:
    """`q_i(c | rows_<i)` `[..., (P,) k, C]`: the mass of the tokens whose rows continue
    `rows[..., :i]` with c, over the mass of the tokens whose rows start with it; PAD gets the mass
    of the tokens equal to the prefix. `token_weights` `[..., V]` need only be proportional to the
    teacher's probabilities; `rows` `[..., k]`, or `[..., P, k]` for P paths per position. In the
    trie's order every prefix is a contiguous range of tokens and its children a contiguous run of
    `trie_child_starts`, so each child's mass is a difference of prefix sums: O(V) per position
    for the sums (shared by the paths), then O(C) lookups per head and path (no `[..., V, k]`
    array, no per-head pass over the vocabulary)."""
    k, c = spelling.k, spelling.num_symbols
    lead, vocab_size = token_weights.shape[:-1], token_weights.shape[-1]
    path_shape = rows.shape[len(lead):-1]
    weights = token_weights.reshape(-1, vocab_size)  # [N, V]
    n = len(weights)
    rows = rows.reshape(n, -1, k)  # [N, P, k]
    paths = rows.shape[1]
    trie_tokens = spelling.trie_tokens[...]
    sums = BlockPrefixSums.of(jnp.where(trie_tokens >= 0, weights[:, trie_tokens], 0.0))
    lo = jnp.zeros((n, paths, 1), jnp.int32)
    hi = jnp.full((n, paths, 1), spelling.trie_count, jnp.int32)
    children = jnp.arange(c)
    positions, path = jnp.arange(n)[:, None, None], jnp.arange(paths)[None, :, None]
    targets = []
    for i in range(k):
        starts = spelling.trie_child_starts[...][i]  # [V + 1]
        first, stop = jnp.searchsorted(starts, lo), jnp.searchsorted(starts, hi)  # [N, P, 1]
        child = jnp.minimum(first + children, vocab_size - 1)  # [N, P, C]: the prefix's children
        present = first + children < stop
        begin, end = starts[child], starts[child + 1]
        mass = jnp.maximum(sums.before(end.reshape(n, -1)) - sums.before(begin.reshape(n, -1)),
                           0.0).reshape(n, paths, c)
        symbol = jnp.where(present, spelling.trie_rows[...][begin, i], c)  # c: dropped
        target = jnp.zeros((n, paths, c), weights.dtype).at[positions, path, symbol].add(
            mass, mode="drop")
        targets.append(target / jnp.maximum(target.sum(-1, keepdims=True), 1e-30))
        lo, hi = spelling.trie_narrow(i, lo, hi, rows[:, :, i:i + 1])
    return jnp.stack(targets, axis=2).reshape(*lead, *path_shape, k, c)


def up_to_first_pad(rows: jax.Array, pad: int) -> jax.Array:
    """1.0 for the symbols `[..., k]` up to and including the first PAD, else 0."""
    before = jnp.cumsum(rows == pad, axis=-1) - (rows == pad)
    return (before == 0).astype(jnp.float32)


@register_decoder("chain")
class ChainHeads(IndependentHeads):
    """The independent heads' `W_i h + b_i` (same parameters and names) plus the width-r
    recurrence over the symbols chosen so far, and the shortlist's word rows if it has one."""

    # `step_in` (Q) and the rest row's kernel are left out: they multiply h itself, unbounded, so
    # the fresh learning rate would move their scores by tens in one step.
    FRESH_PARAMETERS = ("state_in", "transition", "symbol_embed", "readout", "rest_bias")
    # The word rows stay the LM head's: trained, every row would drift with the optimizer's
    # steps, and the choice among the shortlist, exact at the start, would drift with them.
    FIXED_PARAMETERS = (("shortlist", "kernel"),)

    def __init__(self, d: int, config: HeadsConfig, options: RuntimeOptions, rngs: nnx.Rngs):
        super().__init__(d, config, options, rngs)
        k, c, r = config.k, config.num_symbols, config.recurrent_width

        def param(init, shape, axes):
            return sharding.param(rngs.params(), init, shape, axes, options.param_dtype)

        normal = jax.nn.initializers.normal
        self.state_in = param(normal(d ** -0.5), (d, r), ("embed", "char_state"))
        self.transition = param(normal(r ** -0.5), (r, r), ("char_state", "char_state"))
        self.symbol_embed = param(normal(1.0), (k, c, r), ("char_head", "char_vocab", "char_state"))
        self.readout = param(jax.nn.initializers.zeros, (k, r, c),
                             ("char_head", "char_state", "char_vocab"))
        if config.hidden_every_step:  # Q_i for the steps after the first; zero: s_i as without
            self.step_in = param(jax.nn.initializers.zeros, (d, k - 1, r),
                                 ("embed", "char_head", "char_state"))
        self.shortlist = (Shortlist(d, config.shortlist_tokens, k, options, rngs)
                          if config.shortlist_tokens else None)

    def attach_spelling(self, spelling: SpellingTable, unembedding: np.ndarray | None = None,
                        token_prior: np.ndarray | None = None) -> None:
        """The independent heads' masks and initialisation (over the tokens the chain spells),
        and the shortlist's spellings and (given the LM head) rows."""
        if self.shortlist is not None:
            self.shortlist.attach_spelling(spelling, unembedding, token_prior)
        super().attach_spelling(spelling, unembedding, token_prior)

    def spelled_tokens(self, spelling: SpellingTable) -> np.ndarray:
        """bool `[V]`: the valid tokens outside the shortlist (all valid ones without one)."""
        if self.shortlist is None:
            return spelling.valid
        return self.shortlist.outside(spelling.vocab_size, spelling.valid)

    def _stepper(self, hidden: jax.Array, beam: int):
        """`(step, initial state)` for `search`: hidden `[N, d]`, hypotheses `[N, beam]`."""
        base = super().logits(hidden)  # [N, k, C]: W_i h + b_i + the symbol mask
        s0 = jnp.tanh(hidden.astype(self.dtype) @ self.state_in[...].astype(self.dtype))
        s0 = jnp.broadcast_to(s0[:, None], (s0.shape[0], beam, s0.shape[-1]))
        reread = None
        if self.config.hidden_every_step:  # [N, k - 1, r]: one matmul for every step
            reread = jnp.einsum("nd,dkr->nkr", hidden.astype(self.dtype),
                                self.step_in[...].astype(self.dtype))

        def recurrent_step(s, previous, i):
            if previous is not None:
                drive = self.symbol_embed[...][i].astype(self.dtype)[previous]  # [N, B, r]
                if reread is not None:
                    drive = drive + reread[:, None, i - 1]
                s = jax.nn.silu(s @ self.transition[...].astype(self.dtype) + drive)
            correction = jnp.einsum("nbr,rc->nbc", s, self.readout[...][i].astype(self.dtype),
                                    preferred_element_type=jnp.float32)
            return base[:, None, i] + correction, s

        return recurrent_step, s0

    # -- the CharDecoder interface -------------------------------------------------------------

    def logits(self, hidden: jax.Array, rows: jax.Array | None = None) -> jax.Array:
        """Symbol i's logits `[..., (P,) k, C]` given `rows[..., (P,) :i]` (P paths per hidden
        state sharing its `W_i h`; the decoder's own greedy row when None)."""
        k, c = self.config.k, self.config.num_symbols
        flat = hidden.reshape(-1, hidden.shape[-1])
        if rows is None:
            rows = self.choose(flat, None).reshape(*hidden.shape[:-1], k)
        path_shape = rows.shape[hidden.ndim - 1:-1]
        rows = rows.reshape(len(flat), -1, k)  # [N, P, k]
        step, state = self._stepper(flat, rows.shape[1])
        out = []
        for i in range(k):
            logits, state = step(state, None if i == 0 else rows[:, :, i - 1], i)
            out.append(logits)
        return jnp.stack(out, axis=2).reshape(*hidden.shape[:-1], *path_shape, k, c)

    def choose(self, hidden: jax.Array, spelling: DeviceSpelling | None,
               key: jax.Array | None = None, sampling: Sampling = GREEDY,
               constrained: bool = False, beam: int = 1,
               unembedding: jax.Array | None = None) -> jax.Array:
        """Symbol by symbol: greedy, ancestral sampling or a beam of `beam` strings, within the
        vocabulary's prefix trie if `constrained`. With a shortlist, the best word against the
        rest row times the chain's best string (or a sample of the R + 1 rows, then of the
        chain's strings if it is the rest row); the chain runs only when the rest row can win.
        Given the LM head's rows `unembedding` `[V, d]`, greedy decoding checks the chain's
        strings against them (`_checked`): the best word stays unless one of the tokens spelled
        by the chain's `beam` strings has a higher logit `u_v·h`."""
        flat = hidden.reshape(-1, hidden.shape[-1])

        def spell(chain_key: jax.Array | None, **outputs):
            step, state = self._stepper(flat, beam)  # inside: skipped with the branch
            return search_rows(step, state, self.config.k, self.config.num_symbols - 1,
                               trie=spelling if constrained else None, beam=beam,
                               sampling=sampling, key=chain_key, **outputs)

        if self.shortlist is None:
            return spell(key).reshape(*hidden.shape[:-1], self.config.k)
        scores = self.shortlist.scores(flat)  # [N, R + 1]
        spellings = self.shortlist.spellings[...]
        if sampling.greedy:
            word = jnp.argmax(scores[:, :-1], axis=-1)
            word_score = jnp.max(scores[:, :-1], axis=-1)

            def spelled(_):
                if unembedding is not None:
                    rows, candidate_score = self._checked(flat, spell(None, every_row=True)[0],
                                                          unembedding, spelling)
                else:
                    rows, candidate_score = spell(None, with_score=True)
                    candidate_score = scores[:, -1] + candidate_score
                return jnp.where((candidate_score > word_score)[:, None], rows, spellings[word])

            can_win = jnp.any(scores[:, -1] > word_score)  # a string's probability is <= 1
        else:
            word_key, chain_key = jax.random.split(key)
            slot = sample(scores, word_key, sampling)  # [N]: a word or the rest row
            word = jnp.minimum(slot, len(spellings) - 1)

            def spelled(_):
                return jnp.where((slot == len(spellings))[:, None], spell(chain_key),
                                 spellings[word])

            can_win = jnp.any(slot == len(spellings))
        rows = jax.lax.cond(can_win, spelled, lambda _: spellings[word], None)
        return rows.reshape(*hidden.shape[:-1], self.config.k)

    def _checked(self, hidden: jax.Array, rows: jax.Array, unembedding: jax.Array,
                 spelling: DeviceSpelling) -> tuple[jax.Array, jax.Array]:
        """The chain's candidates checked against the LM head: of the search's rows `[N, B, k]`,
        the one whose token has the highest logit `u_v·h`, and that logit `[N]` (-inf when no
        row spells a token). The word rows are the LM head's own, so the two compare."""
        tokens = spelling.lookup(rows)  # [N, B]: -1 where a free row spells no token
        candidates = unembedding[jnp.maximum(tokens, 0)].astype(self.dtype)  # [N, B, d]
        logits = jnp.einsum("nd,nbd->nb", hidden.astype(self.dtype), candidates,
                            preferred_element_type=jnp.float32)
        logits = jnp.where(tokens >= 0, logits, -jnp.inf)
        best = jnp.argmax(logits, axis=-1)
        return (jnp.take_along_axis(rows, best[:, None, None], axis=1)[:, 0],
                jnp.take_along_axis(logits, best[:, None], axis=1)[:, 0])

    def token_log_probs(self, hidden: jax.Array, rows: jax.Array, spelling: DeviceSpelling
                        ) -> jax.Array:
        """The trie-renormalised string probability of each row `[...]`: a distribution over
        the vocabulary's distinct rows. With a shortlist, `p_words(v) + p_rest · chain(v)`."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        flat_rows = rows.reshape(-1, self.config.k)
        step, state = self._stepper(flat, 1)
        chain = forced_log_probs(step, state, flat_rows, spelling.pad_symbol, trie=spelling)
        if self.shortlist is not None:
            log_probs = jax.nn.log_softmax(self.shortlist.scores(flat), axis=-1)
            words = self.shortlist.word_log_probs(log_probs, spelling.lookup(flat_rows))
            chain = jnp.logaddexp(words,
                                  log_probs[:, -1] + chain)
        return chain.reshape(hidden.shape[:-1])

    def soft_targets(self, token_weights: jax.Array, rows: jax.Array, spelling: DeviceSpelling
                     ) -> jax.Array:
        return chain_targets(token_weights, rows, spelling)

    def spelled_logits(self, teacher_logits: jax.Array) -> jax.Array:
        """The teacher's logits `[..., V]` over the tokens the chain spells: -inf on the
        shortlist's, which have their own rows."""
        if self.shortlist is None:
            return teacher_logits
        outside = jnp.asarray(self.shortlist.outside(teacher_logits.shape[-1]))
        return jnp.where(outside, teacher_logits, -jnp.inf)

    def word_losses(self, hidden: jax.Array, teacher_logits: jax.Array
                    ) -> dict[str, jax.Array] | None:
        """The shortlist's rows against the teacher over the R + 1 classes (its tokens, then
        the rest): KL, cross-entropy on the argmax's class, whether the rows pick it, and the
        teacher's rest mass `[...]`; None without a shortlist."""
        if self.shortlist is None:
            return None
        lead = teacher_logits.shape[:-1]
        scores = self.shortlist.scores(hidden.reshape(-1, hidden.shape[-1]))
        student = jax.nn.log_softmax(scores, axis=-1).reshape(*lead, -1)
        target = checkpoint_name(self.shortlist.target_log_probs(
            jax.nn.log_softmax(teacher_logits, axis=-1)), "word_targets")
        label = checkpoint_name(self.shortlist.slot_of(jnp.argmax(teacher_logits, axis=-1)),
                                "word_labels")
        kl = jnp.sum(jnp.where(jnp.isfinite(target), jnp.exp(target) * (target - student), 0.0),
                     axis=-1)
        return {"word_kl": kl,
                "word_ce": -jnp.take_along_axis(student, label[..., None], axis=-1)[..., 0],
                "word_acc": (jnp.argmax(student, axis=-1) == label).astype(jnp.float32),
                "rest_mass": jnp.exp(target[..., -1])}

    def loss_weights(self, rows: jax.Array, spelling: DeviceSpelling) -> jax.Array:
        """Positions past the target's first PAD carry no loss (the row has ended)."""
        return up_to_first_pad(rows, spelling.pad_symbol)
