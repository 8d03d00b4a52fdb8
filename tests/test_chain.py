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
from spellm_jax.models.char_decoders.chain import ChainHeads, chain_targets, up_to_first_pad
from spellm_jax.models.char_decoders.independent import IndependentHeads
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


def _string_log_prob(heads, hidden, row) -> float:
    logits = heads.logits(hidden[None], jnp.asarray(row)[None])[0]
    log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    total = 0.0
    for i, symbol in enumerate(row):
        total += log_probs[i, symbol]
        if symbol == PAD:
            break
    return total


@pytest.mark.parametrize("variant", VARIANTS)
def test_beam_one_is_greedy_and_wide_beams_find_better_strings(variant):
    heads, spelling = toy_chain(3, **VARIANTS[variant]), toy_spelling(toy_rows())
    hidden = jnp.asarray(np.random.default_rng(4).normal(size=(6, D)), jnp.float32)
    greedy = np.asarray(heads.choose(hidden, spelling))
    np.testing.assert_array_equal(np.asarray(heads.choose(hidden, spelling, beam=1)), greedy)
    for n in range(len(hidden)):  # greedy is the symbol-by-symbol argmax of the logits
        logits = np.asarray(heads.logits(hidden[n:n + 1], jnp.asarray(greedy[n:n + 1])))[0]
        done = False
        for i in range(K):
            assert greedy[n, i] == (PAD if done else logits[i].argmax())
            done |= greedy[n, i] == PAD
    wide = np.asarray(heads.choose(hidden, spelling, beam=4))
    for n in range(len(hidden)):
        assert _string_log_prob(heads, hidden[n], wide[n]) >= _string_log_prob(
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
    for n in range(len(hidden)):
        assert tuple(best[n]) == tuple(table[scores[n].argmax()])


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


def test_a_shortlist_of_every_token_gives_the_teachers_exact_conditionals():
    """With every token in the shortlist, its rows the teacher's LM head and the chain's own
    logits far below, the decoder's conditionals are the teacher's exact ones along any rows (up
    to their end)."""
    table = toy_rows(12)
    rng = np.random.default_rng(13)
    tokens = tuple(int(t) for t in rng.permutation(V))
    config = HeadsConfig(K, C, kind="chain", init="normal", recurrent_width=8,
                         shortlist_tokens=tokens)
    heads = ChainHeads(D, config, RuntimeOptions(), nnx.Rngs(0))
    unembedding = rng.normal(0, 1.0, (V, D)).astype(np.float32)
    heads.shortlist.attach_spelling(toy_table(table), unembedding)
    heads.bias[...] = heads.bias[...] - 1e4
    hidden = jnp.asarray(rng.normal(0, 1.0, (6, D)), jnp.float32)
    teacher_probs = jax.nn.softmax(hidden @ unembedding.T, axis=-1)
    rows = jnp.asarray(np.concatenate([table[np.asarray(jnp.argmax(teacher_probs, -1))[:3]],
                                       table[rng.integers(0, V, 3)]]))
    spelled = np.asarray(up_to_first_pad(rows, PAD), bool)  # symbols past the end are free
    np.testing.assert_allclose(
        np.asarray(jax.nn.softmax(heads.logits(hidden, rows), axis=-1))[spelled],
        np.asarray(chain_targets(teacher_probs, rows, toy_spelling(table)))[spelled], atol=1e-5)


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
