"""Symbol marginals by segment-sum, and their optimality among factorized distributions."""

import jax
import jax.numpy as jnp
import numpy as np

from spellm_jax.losses import spelled_log_probs, symbol_marginals

V, K, C = 40, 4, 7


def random_table(seed=0):
    return np.random.RandomState(seed).randint(0, C, size=(V, K)).astype(np.int32)


def test_marginals_equal_brute_force():
    table = random_table()
    probs = np.random.RandomState(1).dirichlet(np.ones(V), size=(2, 3)).astype(np.float32)
    got = np.asarray(symbol_marginals(jnp.asarray(probs), jnp.asarray(table), C))
    want = np.zeros((2, 3, K, C))
    for b in range(2):
        for t in range(3):
            for v in range(V):
                for i in range(K):
                    want[b, t, i, table[v, i]] += probs[b, t, v]
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


def kl_to_factorized(p, log_q, table):
    log_factorized = np.asarray(spelled_log_probs(jnp.asarray(log_q), jnp.asarray(table)))
    return float(np.sum(p * (np.log(p) - log_factorized)))


def test_no_perturbed_factorized_distribution_beats_the_marginals():
    table = random_table(2)
    rng = np.random.RandomState(3)
    for trial in range(20):
        p = rng.dirichlet(np.full(V, 0.3 if trial % 2 else 3.0)).astype(np.float64) + 1e-12
        p /= p.sum()
        q = np.asarray(symbol_marginals(jnp.asarray(p, jnp.float32), jnp.asarray(table), C),
                       np.float64)
        best = kl_to_factorized(p, np.log(q + 1e-30), table)
        for _ in range(10):
            logits = np.log(q + 1e-9) + rng.normal(0, 0.05, q.shape)
            perturbed = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1), np.float64)
            assert kl_to_factorized(p, perturbed, table) >= best - 1e-6


def test_chunked_loss_equals_unchunked_loss_and_gradients():
    from spellm_jax.losses import LossConfig, chunked_distillation_loss

    rng = np.random.RandomState(4)
    d, batch, length = 8, 2, 12
    table = jnp.asarray(random_table(5))
    lengths = jnp.asarray(rng.randint(1, 7, size=V))
    valid = jnp.asarray(np.arange(V) < V - 3)
    hidden = jnp.asarray(rng.normal(size=(batch, length, d)), jnp.float32)
    teacher_w = jnp.asarray(rng.normal(size=(d, V)), jnp.float32)
    student_w = jnp.asarray(rng.normal(0, 0.3, size=(K, d, C)), jnp.float32)
    mask = jnp.asarray(rng.rand(batch, length) > 0.2)

    def loss(w, chunk):
        config = LossConfig(soft_weight=0.7, hard_weight=0.3, temperature=2.0, chunk_size=chunk)
        return chunked_distillation_loss(
            hidden, hidden, lambda h: jnp.einsum("...d,kdc->...kc", h, w),
            lambda h: h @ teacher_w, table, lengths, valid, mask, config)

    (whole, whole_metrics), whole_grad = jax.value_and_grad(loss, has_aux=True)(student_w, length)
    (chunked, chunk_metrics), chunk_grad = jax.value_and_grad(loss, has_aux=True)(student_w, 4)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6)
    np.testing.assert_allclose(chunk_grad, whole_grad, atol=1e-6)
    for name, value in whole_metrics.items():
        np.testing.assert_allclose(chunk_metrics[name], value, rtol=1e-5, atol=1e-6)
    assert float(whole_metrics["tokens"]) == float(mask.sum())
