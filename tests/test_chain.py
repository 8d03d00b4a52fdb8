"""The chain-rule decoder: exact conditional targets, search (greedy, beam, trie-constrained,
ancestral sampling) and its start as the independent heads."""

import itertools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spellm_jax.distill import make_optimizer
from spellm_jax.models.char_decoders import HeadsConfig
from spellm_jax.models.char_decoders.chain import ChainHeads, chain_targets
from spellm_jax.models.char_decoders.independent import IndependentHeads
from spellm_jax.models.char_decoders.search import forced_log_probs, search_rows
from spellm_jax.models.char_decoders.shortlist import most_frequent_tokens
from spellm_jax.models.llama import RuntimeOptions
from spellm_jax.sampling import Sampling
from spellm_jax.spelling import DeviceSpelling

V, K, C, D = 40, 4, 7, 16
PAD = C - 1


def toy_rows(seed: int = 0) -> np.ndarray:
    """V distinct rows over symbols 0..C-2, of lengths 1..K, PAD-filled: a toy vocabulary."""
    rng = np.random.default_rng(seed)
    rows: set[tuple[int, ...]] = set()
    while len(rows) < V:
        length = int(rng.integers(1, K + 1))
        rows.add(tuple(rng.integers(0, PAD, length)) + (PAD,) * (K - length))
    return np.array(sorted(rows, key=lambda r: rng.random()), np.int32)


def toy_table(table: np.ndarray) -> types.SimpleNamespace:
    """The parts of a `SpellingTable` the decoder and `DeviceSpelling` read."""
    valid = np.ones(V, bool)
    return types.SimpleNamespace(table=table, valid=valid, lengths=(table != PAD).sum(1),
                                 canonical=valid, k=K, num_symbols=C, vocab_size=V)


def toy_spelling(table: np.ndarray) -> DeviceSpelling:
    return DeviceSpelling.of(toy_table(table))


SHORTLIST = tuple(range(0, V, 3))  # a third of the toy tokens keep their own rows
VARIANTS = {"plain": {}, "reread": {"hidden_every_step": True}, "shortlist": {"shortlist": True}}


def toy_chain(seed: int = 0, readout_scale: float = 1.0, hidden_every_step: bool = False,
              shortlist: bool = False, table: np.ndarray | None = None) -> ChainHeads:
    """A chain decoder with random parameters; with `shortlist`, `SHORTLIST` spelled by `table`
    (`toy_rows()` by default)."""
    config = HeadsConfig(K, C, kind="chain", init="normal", recurrent_width=8,
                         hidden_every_step=hidden_every_step,
                         shortlist_tokens=SHORTLIST if shortlist else ())
    heads = ChainHeads(D, config, RuntimeOptions(), nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for _, variable in nnx.to_flat_state(nnx.state(heads, nnx.Param)):
        variable[...] = jnp.asarray(rng.normal(0, readout_scale, variable[...].shape), jnp.float32)
    if shortlist:
        heads.shortlist.attach_spelling(toy_table(toy_rows() if table is None else table), None)
    return heads


def test_conditional_targets_equal_brute_force():
    table = toy_rows()
    spelling = toy_spelling(table)
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.full(V, 0.5), size=3).astype(np.float32)
    paths = table[np.argsort(-probs, axis=-1)[:, :3]]  # [3, P, K]: the top-3 tokens' spellings
    got = np.asarray(chain_targets(jnp.asarray(probs), jnp.asarray(paths), spelling))
    np.testing.assert_array_equal(  # one path without the path axis: the same targets
        np.asarray(chain_targets(jnp.asarray(probs), jnp.asarray(paths[:, 0]), spelling)),
        got[:, 0])
    for n, p, i in itertools.product(range(3), range(3), range(K)):
        prefix = [v for v in range(V) if tuple(table[v, :i]) == tuple(paths[n, p, :i])]
        want = np.zeros(C)
        for v in prefix:
            want[table[v, i]] += probs[n, v]
        np.testing.assert_allclose(got[n, p, i], want / want.sum(), atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_paths_share_the_hidden_state_and_follow_their_own_rows(variant):
    heads, table = toy_chain(8, **VARIANTS[variant]), toy_rows()
    hidden = jnp.asarray(np.random.default_rng(9).normal(size=(4, D)), jnp.float32)
    paths = jnp.asarray(table[:12].reshape(4, 3, K))
    got = np.asarray(heads.logits(hidden, paths))  # [4, 3, K, C]
    for p in range(3):
        np.testing.assert_allclose(got[:, p], np.asarray(heads.logits(hidden, paths[:, p])),
                                   atol=1e-6)


@pytest.mark.parametrize("hidden_every_step", [False, True])
def test_the_chain_starts_as_the_independent_heads(hidden_every_step):
    config = HeadsConfig(K, C, kind="chain", init="normal", hidden_every_step=hidden_every_step)
    chain = ChainHeads(D, config, RuntimeOptions(), nnx.Rngs(0))
    independent = IndependentHeads(D, HeadsConfig(K, C, init="normal"), RuntimeOptions(),
                                   nnx.Rngs(0))
    independent.kernel[...], independent.bias[...] = chain.kernel[...], chain.bias[...]
    hidden = jnp.asarray(np.random.default_rng(2).normal(size=(5, D)), jnp.float32)
    rows = jnp.asarray(toy_rows()[:5])
    np.testing.assert_allclose(chain.logits(hidden, rows), independent.logits(hidden), atol=1e-6)


def _chain_log_prob(heads, hidden, row) -> float:
    """The chain's own log-probability of a row (one hidden state `[d]`), symbol by symbol."""
    logits = heads.logits(hidden[None], jnp.asarray(row)[None])[0]
    log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    total = 0.0
    for i, symbol in enumerate(row):
        total += log_probs[i, symbol]
        if symbol == PAD:
            break
    return total


def _branches(heads, hidden, row) -> tuple[float, float]:
    """`(log p_words(row), log p_rest + log chain(row))`, brute force; without a shortlist,
    `(-inf, log chain(row))`."""
    chain = _chain_log_prob(heads, hidden, row)
    if heads.shortlist is None:
        return -np.inf, chain
    log_probs = np.asarray(jax.nn.log_softmax(heads.shortlist.scores(hidden[None])[0]))
    spellings = np.asarray(heads.shortlist.spellings[...])
    same = [r for r in range(len(spellings)) if tuple(spellings[r]) == tuple(row)]
    words = np.logaddexp.reduce(log_probs[same]) if same else -np.inf
    return words, log_probs[-1] + chain


def _string_log_prob(heads, hidden, row) -> float:
    """The decoder's log-probability of a row: `p_words + p_rest · chain` with a shortlist."""
    return float(np.logaddexp(*_branches(heads, hidden, row)))


def _decision_log_prob(heads, hidden, row) -> float:
    """What decoding maximises: the better of the row's word and rest-row branches."""
    return float(max(_branches(heads, hidden, row)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_beam_one_is_greedy_and_wide_beams_find_better_strings(variant):
    heads, spelling = toy_chain(3, **VARIANTS[variant]), toy_spelling(toy_rows())
    hidden = jnp.asarray(np.random.default_rng(4).normal(size=(6, D)), jnp.float32)
    greedy = np.asarray(heads.choose(hidden, spelling))
    np.testing.assert_array_equal(np.asarray(heads.choose(hidden, spelling, beam=1)), greedy)
    for n in range(len(hidden)):  # the chain's greedy row: symbol by symbol, the argmax
        chain_row = np.full(K, PAD, np.int32)
        for i in range(K):
            logits = np.asarray(heads.logits(hidden[n:n + 1], jnp.asarray(chain_row[None])))[0]
            chain_row[i] = logits[i].argmax()
            if chain_row[i] == PAD:
                break
        want = chain_row
        if heads.shortlist is not None:  # the best word unless the rest row's string beats it
            scores = np.asarray(heads.shortlist.scores(hidden[n:n + 1]))[0]
            word = np.asarray(heads.shortlist.spellings[...])[scores[:-1].argmax()]
            if scores[-1] + _chain_log_prob(heads, hidden[n], chain_row) <= scores[:-1].max():
                want = word
        np.testing.assert_array_equal(greedy[n], want)
    wide = np.asarray(heads.choose(hidden, spelling, beam=4))
    for n in range(len(hidden)):
        assert _decision_log_prob(heads, hidden[n], wide[n]) >= _decision_log_prob(
            heads, hidden[n], greedy[n]) - 1e-5


@pytest.mark.parametrize("shortlist", [False, True])
def test_constrained_rows_are_always_vocabulary_tokens_and_the_best_of_them(shortlist):
    table = toy_rows(5)
    heads, spelling = toy_chain(6, shortlist=shortlist, table=table), toy_spelling(table)
    hidden = jnp.asarray(np.random.default_rng(7).normal(size=(32, D)), jnp.float32)
    rows = {tuple(r) for r in table}
    for beam in (1, 2, 4):
        chosen = np.asarray(heads.choose(hidden, spelling, constrained=True, beam=beam))
        assert all(tuple(r) in rows for r in chosen), beam
    best = np.asarray(heads.choose(hidden, spelling, constrained=True, beam=V))
    scores = np.asarray(heads.token_log_probs(
        jnp.repeat(hidden, V, 0), jnp.asarray(np.tile(table, (len(hidden), 1))), spelling))
    scores = scores.reshape(len(hidden), V)
    np.testing.assert_allclose(np.exp(scores).sum(1), 1.0, atol=1e-5)  # a distribution
    # The exhaustive search's choice: the best word or the rest row times the chain's best token
    # (its string probability renormalised over the trie: the chain's share of `token_log_probs`).
    chain_scores = np.asarray(forced_log_probs(
        *heads._stepper(jnp.repeat(hidden, V, 0), 1), jnp.asarray(np.tile(table, (len(hidden), 1))),
        PAD, trie=spelling)).reshape(len(hidden), V)
    for n in range(len(hidden)):
        decision = chain_scores[n]
        if shortlist:
            words = np.asarray(heads.shortlist.scores(hidden[n:n + 1]))[0]
            decision = decision + words[-1]
            decision[list(SHORTLIST)] = np.maximum(decision[list(SHORTLIST)], words[:-1])
        assert tuple(best[n]) == tuple(table[decision.argmax()])


@pytest.mark.parametrize("shortlist", [False, True])
def test_ancestral_sampling_follows_the_string_distribution(shortlist):
    heads = toy_chain(8, readout_scale=0.5, shortlist=shortlist)
    spelling = toy_spelling(toy_rows())
    hidden = jnp.asarray(np.random.default_rng(9).normal(size=(1, D)), jnp.float32)
    draws = 4000
    keys = jax.random.split(jax.random.key(0), draws)
    sampled = np.asarray(jax.jit(jax.vmap(
        lambda key: heads.choose(hidden, spelling, key, Sampling(1.0))[0]))(keys))
    counts: dict[tuple[int, ...], int] = {}
    for row in map(tuple, sampled):
        counts[row] = counts.get(row, 0) + 1
    for row, count in sorted(counts.items(), key=lambda item: -item[1])[:8]:
        expected = np.exp(_string_log_prob(heads, hidden[0], row))
        assert abs(count / draws - expected) <= 4 * np.sqrt(expected * (1 - expected) / draws) + 1e-3
    total = sum(np.exp(_string_log_prob(heads, hidden[0], row)) for row in counts)
    assert total > 0.5  # the rows seen carry most of the mass the decoder gives


def test_a_shortlist_of_every_token_is_the_teacher():
    """With every token in the shortlist and its rows the teacher's LM head, the rest row gets
    no mass: the decoder's token distribution is the teacher's and greedy picks its argmax."""
    table = toy_rows(12)
    rng = np.random.default_rng(13)
    tokens = tuple(int(t) for t in rng.permutation(V))
    config = HeadsConfig(K, C, kind="chain", init="normal", recurrent_width=8,
                         shortlist_tokens=tokens)
    heads = ChainHeads(D, config, RuntimeOptions(), nnx.Rngs(0))
    unembedding = rng.normal(0, 1.0, (V, D)).astype(np.float32)
    heads.attach_spelling(toy_table(table), unembedding)
    spelling = toy_spelling(table)
    hidden = jnp.asarray(rng.normal(0, 1.0, (6, D)), jnp.float32)
    teacher = np.asarray(jax.nn.log_softmax(hidden @ unembedding.T, axis=-1))
    got = np.asarray(heads.token_log_probs(jnp.repeat(hidden, V, 0),
                                           jnp.asarray(np.tile(table, (6, 1))), spelling))
    np.testing.assert_allclose(got.reshape(6, V), teacher, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(heads.choose(hidden, spelling)),
                                  table[teacher.argmax(-1)])


def test_word_rows_check_the_chains_tokens_against_the_lm_head():
    """Given the LM head's rows, greedy decoding with word rows takes the best-scored of the
    shortlist's tokens and the tokens the chain's strings spell: with a beam over every string,
    the LM head's own argmax, also where it is outside the shortlist; with a beam of 4, the best
    word unless one of the 4 strings' tokens outscores it."""
    table = toy_rows(20)
    rng = np.random.default_rng(21)
    config = HeadsConfig(K, C, kind="chain", init="normal", recurrent_width=8,
                         shortlist_tokens=tuple(int(t) for t in rng.permutation(V)[:V // 2]))
    heads = ChainHeads(D, config, RuntimeOptions(), nnx.Rngs(0))
    unembedding = rng.normal(0, 1.0, (V, D)).astype(np.float32)
    heads.attach_spelling(toy_table(table), unembedding)
    spelling = toy_spelling(table)
    hidden = jnp.asarray(rng.normal(0, 1.0, (12, D)), jnp.float32)
    logits = np.asarray(hidden) @ unembedding.T
    argmax = logits.argmax(-1)
    assert not np.isin(argmax, config.shortlist_tokens).all()  # some must come from the chain
    exhaustive = heads.choose(hidden, spelling, constrained=True, beam=V,
                              unembedding=jnp.asarray(unembedding))
    np.testing.assert_array_equal(np.asarray(exhaustive), table[argmax])
    words = np.asarray(config.shortlist_tokens)
    best_word = words[logits[:, words].argmax(-1)]
    step, state = heads._stepper(hidden, 4)
    rows, _ = search_rows(step, state, K, C - 1, trie=spelling, beam=4, every_row=True)
    candidates = np.asarray(spelling.lookup(rows))  # [12, 4]
    best_candidate = candidates[np.arange(12), logits[np.arange(12)[:, None], candidates].argmax(-1)]
    chain_wins = logits[np.arange(12), best_candidate] > logits[np.arange(12), best_word]
    assert chain_wins.any() and not chain_wins.all()
    checked = heads.choose(hidden, spelling, constrained=True, beam=4,
                           unembedding=jnp.asarray(unembedding))
    np.testing.assert_array_equal(np.asarray(spelling.lookup(checked)),
                                  np.where(chain_wins, best_candidate, best_word))


def test_the_rest_row_starts_at_the_teachers_average_share():
    """The rest row's first share of the mass is the teacher's average mass outside the
    shortlist (its token prior's), whatever the hidden state."""
    table = toy_rows(14)
    rng = np.random.default_rng(15)
    heads = toy_chain(2, shortlist=True, table=table)
    prior = rng.dirichlet(np.ones(V))
    heads.attach_spelling(toy_table(table), rng.normal(0, 1.0, (V, D)).astype(np.float32), prior)
    hidden = jnp.asarray(rng.normal(0, 1.0, (8, D)), jnp.float32)
    share = np.exp(np.asarray(jax.nn.log_softmax(heads.shortlist.scores(hidden), -1))[:, -1])
    np.testing.assert_allclose(share, np.delete(prior, SHORTLIST).sum(), rtol=1e-5)


def test_word_losses_follow_the_teacher_over_the_shortlist_and_the_rest():
    """The word rows' targets are the teacher's probabilities of the shortlist tokens and of
    everything else; the chain's targets follow only the tokens outside the shortlist."""
    heads = toy_chain(4, shortlist=True)
    rng = np.random.default_rng(16)
    hidden = jnp.asarray(rng.normal(size=(5, D)), jnp.float32)
    teacher = jnp.asarray(rng.normal(0, 2.0, (5, V)), jnp.float32)
    probs = np.asarray(jax.nn.softmax(teacher, -1))
    inside = np.asarray(SHORTLIST)
    target = np.concatenate([probs[:, inside], 1 - probs[:, inside].sum(-1, keepdims=True)], -1)
    student = np.asarray(jax.nn.log_softmax(heads.shortlist.scores(hidden), -1))
    want_kl = np.sum(target * (np.log(target) - student), -1)
    best = probs.argmax(-1)
    label = np.array([list(inside).index(b) if b in inside else len(inside) for b in best])
    got = heads.word_losses(hidden, teacher)
    np.testing.assert_allclose(got["word_kl"], want_kl, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["word_ce"], -student[np.arange(5), label], rtol=1e-5)
    np.testing.assert_array_equal(got["word_acc"], student.argmax(-1) == label)
    np.testing.assert_allclose(got["rest_mass"], target[:, -1], rtol=1e-5)
    spelled = np.asarray(heads.spelled_logits(teacher))
    assert np.all(np.isneginf(spelled[:, inside]))
    np.testing.assert_array_equal(np.delete(spelled, inside, 1), np.delete(teacher, inside, 1))


def test_the_shortlist_holds_the_most_frequent_spellable_tokens():
    spelling = types.SimpleNamespace(valid=np.array([True, True, False, True, True, True]))
    counts = np.array([5, 9, 100, 5, 0, 7])
    assert most_frequent_tokens(counts, spelling, 4) == (1, 5, 0, 3)  # ties: the lower id
    with pytest.raises(ValueError, match=r"heads\.shortlist=6 exceeds the 5 tokens"):
        most_frequent_tokens(counts, spelling, 6)


def test_trie_walk_matches_a_python_trie():
    table = toy_rows(11)
    spelling = toy_spelling(table)
    prefixes = {tuple(r[:i]) for r in table for i in range(K + 1)}
    for depth, prefix in itertools.product(range(K), sorted(prefixes)):
        if len(prefix) != depth:
            continue
        lo, hi = jnp.zeros((1,), jnp.int32), jnp.full((1,), spelling.trie_count, jnp.int32)
        for i, symbol in enumerate(prefix):
            lo, hi = spelling.trie_narrow(i, lo, hi, jnp.asarray([symbol]))
        allowed = np.asarray(spelling.trie_allowed(depth, lo))[0]
        want = {r[depth] for r in table if tuple(r[:depth]) == prefix}
        assert set(np.flatnonzero(allowed)) == want and int(hi[0] - lo[0]) == sum(
            tuple(r[:depth]) == prefix for r in table)


def test_the_recurrence_steps_further_by_fresh_lr_scale():
    ones = jnp.ones((3,))
    params = {"char_heads": {"readout": ones, "kernel": ones}, "model": {"readout": ones}}
    grads = jax.tree.map(lambda p: 0.5 * p, params)

    def second_update(scale):  # the first update has learning rate 0 (warmup from 0)
        tx = make_optimizer(1e-2, 1, 10, 0.0, 1.0, fresh=ChainHeads.FRESH_PARAMETERS,
                            fresh_lr_scale=scale)
        _, state = tx.update(grads, tx.init(params), params)
        return tx.update(grads, state, params)[0]

    base, fast = second_update(1.0), second_update(10.0)
    np.testing.assert_allclose(fast["char_heads"]["readout"], 10 * base["char_heads"]["readout"])
    assert float(jnp.abs(base["char_heads"]["readout"]).min()) > 0
    np.testing.assert_array_equal(fast["char_heads"]["kernel"], base["char_heads"]["kernel"])
    np.testing.assert_array_equal(fast["model"]["readout"], base["model"]["readout"])
