"""Symbol marginals by segment-sum, their optimality among factorized distributions, and the
chunked distillation loss."""

import dataclasses
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spellm_jax.losses import LossConfig, chunked_distillation_loss
from spellm_jax.models.char_decoders import HeadsConfig
from spellm_jax.models.char_decoders.independent import IndependentHeads
from spellm_jax.models.llama import RuntimeOptions
from spellm_jax.spelling import DeviceSpelling

V, K, C = 40, 4, 7


def random_table(seed=0):
    return np.random.RandomState(seed).randint(0, C, size=(V, K)).astype(np.int32)


def toy_spelling(table, valid=None, lengths=None) -> DeviceSpelling:
    """The device arrays of a toy alphabet of C symbols (no real tokenizer has one)."""
    valid = np.ones(V, bool) if valid is None else np.asarray(valid)
    lengths = np.full(V, K) if lengths is None else np.asarray(lengths)
    return DeviceSpelling.of(types.SimpleNamespace(
        table=np.asarray(table), valid=valid, lengths=lengths, canonical=valid, k=K,
        num_symbols=C, vocab_size=V))


def test_marginals_equal_brute_force():
    table = random_table()
    probs = np.random.RandomState(1).dirichlet(np.ones(V), size=(2, 3)).astype(np.float32)
    got = np.asarray(toy_spelling(table).symbol_marginals(jnp.asarray(probs)))
    want = np.zeros((2, 3, K, C))
    for b in range(2):
        for t in range(3):
            for v in range(V):
                for i in range(K):
                    want[b, t, i, table[v, i]] += probs[b, t, v]
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


def kl_to_factorized(p, log_q, table):
    log_factorized = np.asarray(toy_spelling(table).token_scores(jnp.asarray(log_q)))
    return float(np.sum(p * (np.log(p) - log_factorized)))


def test_no_perturbed_factorized_distribution_beats_the_marginals():
    table = random_table(2)
    rng = np.random.RandomState(3)
    for trial in range(20):
        p = rng.dirichlet(np.full(V, 0.3 if trial % 2 else 3.0)).astype(np.float64) + 1e-12
        p /= p.sum()
        q = np.asarray(toy_spelling(table).symbol_marginals(jnp.asarray(p, jnp.float32)),
                       np.float64)
        best = kl_to_factorized(p, np.log(q + 1e-30), table)
        for _ in range(10):
            logits = np.log(q + 1e-9) + rng.normal(0, 0.05, q.shape)
            perturbed = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1), np.float64)
            assert kl_to_factorized(p, perturbed, table) >= best - 1e-6


def test_chunked_loss_equals_unchunked_loss_and_gradients():
    rng = np.random.RandomState(4)
    d, batch, length = 8, 2, 12
    spelling = toy_spelling(random_table(5), valid=np.arange(V) < V - 3,
                            lengths=rng.randint(1, 7, size=V))
    hidden = jnp.asarray(rng.normal(size=(batch, length, d)), jnp.float32)
    teacher_w = jnp.asarray(rng.normal(size=(d, V)), jnp.float32)
    heads = IndependentHeads(d, HeadsConfig(K, C, use_bias=False, init="normal"), RuntimeOptions(),
                             nnx.Rngs(0))
    heads.kernel[...] = jnp.asarray(rng.normal(0, 0.3, size=(K, d, C)), jnp.float32)
    graphdef, params, rest = nnx.split(heads, nnx.Param, ...)
    mask = jnp.asarray(rng.rand(batch, length) > 0.2)

    def loss(params, chunk):
        config = LossConfig(soft_weight=0.7, hard_weight=0.3, temperature=2.0, chunk_size=chunk)
        return chunked_distillation_loss(hidden, hidden, nnx.merge(graphdef, params, rest),
                                         lambda h: h @ teacher_w, spelling, mask, config)

    (whole, whole_metrics), whole_grad = jax.value_and_grad(loss, has_aux=True)(params, length)
    (chunked, chunk_metrics), chunk_grad = jax.value_and_grad(loss, has_aux=True)(params, 4)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(chunk_grad), jax.tree.leaves(whole_grad), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)
    for name, value in whole_metrics.items():
        np.testing.assert_allclose(chunk_metrics[name], value, rtol=1e-5, atol=1e-6)
    assert float(whole_metrics["tokens"]) == float(mask.sum())


def running_prefix_targets(token_weights, rows, spelling: DeviceSpelling, chain: bool):
    """The targets by their definition: head i's segment-sum of the teacher's probabilities over
    the tokens whose rows start with `rows[..., :i]` (chain) or over every token (independent)."""
    k, c = spelling.k, spelling.num_symbols
    table = spelling.table[...]
    probs = token_weights.reshape(-1, token_weights.shape[-1])
    probs = probs / probs.sum(-1, keepdims=True)
    rows = rows.reshape(-1, k)
    in_prefix = jnp.ones(probs.shape, bool)
    heads = []
    for i in range(k):
        mass = jax.vmap(lambda p, m, i=i: jax.ops.segment_sum(jnp.where(m, p, 0.0), table[:, i],
                                                              num_segments=c))(probs, in_prefix)
        heads.append(mass / mass.sum(-1, keepdims=True))
        if chain:
            in_prefix &= table[:, i][None] == rows[:, i:i + 1]
    return jnp.stack(heads, 1).reshape(*token_weights.shape[:-1], k, c)


class DefinitionTargets:
    """A decoder whose soft targets come from `running_prefix_targets`, all else its own."""

    def __init__(self, decoder, chain: bool):
        self.decoder, self.chain = decoder, chain

    def __getattr__(self, name):
        return getattr(self.decoder, name)

    def soft_targets(self, token_weights, rows, spelling):
        return running_prefix_targets(token_weights, rows, spelling, self.chain)


def _real_vocabulary_case(kind: str, d: int = 32, batch: int = 2, length: int = 16):
    """SmolLM2's spelling table, random hidden states, a random teacher head `[d, V]`, a
    randomly initialised decoder of `kind` (split) and a random position mask."""
    from spellm_jax.models.char_decoders import build_decoder
    from spellm_jax.spelling import SpellingTable
    from spellm_jax.tokenizers import load_tokenizer

    table = SpellingTable.from_tokenizer(load_tokenizer("smollm2"), 16)
    rng = np.random.RandomState(6)
    hidden = jnp.asarray(rng.normal(size=(batch, length, d)), jnp.float32)
    teacher_w = jnp.asarray(rng.normal(0, 0.6, size=(d, table.vocab_size)), jnp.float32)
    decoder = build_decoder(d, HeadsConfig(16, table.num_symbols, kind=kind, init="normal"),
                            RuntimeOptions(), nnx.Rngs(0))
    graphdef, params, rest = nnx.split(decoder, nnx.Param, ...)
    params = jax.tree.map(lambda p: jnp.asarray(rng.normal(0, 0.2, p.shape), p.dtype), params)
    mask = jnp.asarray(rng.rand(batch, length) > 0.2)
    return DeviceSpelling.of(table), hidden, teacher_w, (graphdef, params, rest), mask


@pytest.mark.parametrize("kind", ["independent", "chain"])
def test_the_loss_on_the_real_vocabulary_equals_its_definition_with_gradients(kind):
    """On SmolLM2's table (truncated and duplicate rows, invalid tokens): the trie's prefix sums
    (chain) and segment-sums (independent) give the loss and gradients of the targets' definition,
    whether the backward pass reads saved targets or recomputes the teacher."""
    spelling, hidden, teacher_w, (graphdef, params, rest), mask = _real_vocabulary_case(kind)

    def loss(params, save_targets: bool, definition: bool):
        config = LossConfig(soft_weight=0.7, hard_weight=0.3, chunk_size=8,
                            save_targets=save_targets)
        heads = nnx.merge(graphdef, params, rest)
        if definition:
            heads = DefinitionTargets(heads, chain=kind == "chain")
        return chunked_distillation_loss(hidden, hidden, heads, lambda h: h @ teacher_w,
                                         spelling, mask, config)[0]

    want, want_grad = jax.value_and_grad(loss)(params, False, True)
    for save_targets in (True, False):
        got, got_grad = jax.value_and_grad(loss)(params, save_targets, False)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()))


def test_the_soft_loss_over_paths_is_their_mass_weighted_sum():
    """`paths=3`: the soft KL at each position is the teacher-mass-weighted mean of the KLs along
    the spellings of its three most likely tokens (each with its own definition's targets and
    the decoder's logits along that spelling); the hard loss still follows the argmax."""
    spelling, hidden, teacher_w, (graphdef, params, rest), mask = _real_vocabulary_case("chain")
    heads = nnx.merge(graphdef, params, rest)
    logits = hidden @ teacher_w
    scaled = jnp.where(spelling.valid[...], logits, -jnp.inf)
    top_logits, top_tokens = jax.lax.top_k(scaled, 3)
    path_weights = jax.nn.softmax(top_logits, axis=-1)
    want = jnp.zeros(mask.shape)
    for p in range(3):
        rows = spelling.rows_of(top_tokens[..., p])
        targets = running_prefix_targets(jnp.exp(scaled - scaled.max(-1, keepdims=True)), rows,
                                         spelling, chain=True)
        log_q = jax.nn.log_softmax(heads.logits(hidden, rows), axis=-1)
        kl = jnp.sum(jnp.where(targets > 0, targets * (jnp.log(jnp.maximum(targets, 1e-30))
                                                       - log_q), 0.0), -1)
        want += path_weights[..., p] * (kl * heads.loss_weights(rows, spelling)).sum(-1)
    config = LossConfig(soft_weight=1.0, hard_weight=1.0, chunk_size=8, paths=3)
    _, sums = chunked_distillation_loss(hidden, hidden, heads, lambda h: h @ teacher_w, spelling,
                                        mask, config)
    np.testing.assert_allclose(sums["soft_kl"], (want * mask).sum(), rtol=1e-5)
    _, one_path = chunked_distillation_loss(hidden, hidden, heads, lambda h: h @ teacher_w,
                                            spelling, mask, dataclasses.replace(config, paths=1))
    np.testing.assert_allclose(sums["hard_ce"], one_path["hard_ce"], rtol=1e-6)


@pytest.mark.parametrize("paths", [1, 3])
def test_saved_targets_spare_the_backward_pass_the_teachers_logits(paths):
    """With `save_targets` the compiled loss and gradient compute the teacher's `[positions, V]` logits
    once (in the forward pass); without it, again in the backward pass. (Before the paths'
    weights were saved, their softmax made the backward pass recompute the logits anyway.)"""
    spelling, hidden, teacher_w, (graphdef, params, rest), mask = _real_vocabulary_case("chain")
    vocab_size = teacher_w.shape[1]

    def teacher_products(save_targets: bool) -> int:
        config = LossConfig(soft_weight=0.7, hard_weight=0.3, chunk_size=8, paths=paths,
                            save_targets=save_targets)

        def loss(params):
            return chunked_distillation_loss(hidden, hidden, nnx.merge(graphdef, params, rest),
                                             lambda h: h @ teacher_w, spelling, mask, config)[0]

        grad = jax.value_and_grad(loss)  # as the train step asks: the loss and its gradient
        text = jax.jit(grad).lower(params).compile().as_text()
        return len(re.findall(rf"= f32\[[\d,]*{vocab_size}\]\{{[\d,]*\}} dot\(", text))

    assert teacher_products(save_targets=True) == 1
    assert teacher_products(save_targets=False) == 2
