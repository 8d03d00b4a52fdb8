"""The paper's independent character heads: one einsum equals per-head references; adapters;
initialisation from the LM head; the symbol mask."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spellm_jax.models.char_decoders import MASKED_LOGIT, HeadsConfig
from spellm_jax.models.char_decoders.independent import IndependentHeads, head_cost
from spellm_jax.models.llama import RuntimeOptions, fused_for_inference
from spellm_jax.sharding import partition_specs

D, K, C = 32, 5, 11


def make_heads(adapter="none", use_bias=True, seed=0):
    heads = IndependentHeads(D, HeadsConfig(K, C, use_bias=use_bias, adapter=adapter, init="normal"),
                      RuntimeOptions(), nnx.Rngs(seed))
    # Give biases and the zero-initialised adapter outputs non-trivial values.
    rng = np.random.RandomState(seed)
    for _, variable in nnx.to_flat_state(nnx.state(heads, nnx.Param)):
        variable[...] = jnp.asarray(rng.normal(0, 0.1, variable[...].shape), jnp.float32)
    return heads


def test_einsum_heads_equal_per_head_reference():
    heads = make_heads()
    hidden = jnp.asarray(np.random.RandomState(1).normal(size=(2, 3, D)), jnp.float32)
    got = heads.logits(hidden)
    kernel, bias = np.asarray(heads.kernel[...]), np.asarray(heads.bias[...])
    for i in range(K):
        want = np.asarray(hidden) @ kernel[i] + bias[i]
        np.testing.assert_allclose(got[..., i, :], want, atol=1e-5)


def _mlp(x, up_k, up_b, down_k, down_b):
    return x + np.asarray(jax.nn.silu(x @ up_k + up_b)) @ down_k + down_b


def test_shared_adapter_equals_reference():
    heads = make_heads("shared")
    hidden = np.random.RandomState(2).normal(size=(4, D)).astype(np.float32)
    a = heads.adapter
    adapted = _mlp(hidden, a.up.kernel[...], a.up.bias[...], a.down.kernel[...], a.down.bias[...])
    want = np.einsum("nd,kdc->nkc", adapted, np.asarray(heads.kernel[...])) + heads.bias[...]
    np.testing.assert_allclose(heads.logits(jnp.asarray(hidden)), want, atol=1e-4)


def test_per_head_vmap_adapter_equals_explicit_per_head_reference():
    heads = make_heads("per_head")
    hidden = np.random.RandomState(3).normal(size=(4, D)).astype(np.float32)
    got = np.asarray(heads.logits(jnp.asarray(hidden)))
    a = heads.adapter
    assert a.up.kernel[...].shape == (K, D, 4 * D)  # stacked, not k module references
    for i in range(K):
        adapted = _mlp(hidden, a.up.kernel[...][i], a.up.bias[...][i], a.down.kernel[...][i],
                       a.down.bias[...][i])
        want = adapted @ np.asarray(heads.kernel[...][i]) + np.asarray(heads.bias[...][i])
        np.testing.assert_allclose(got[:, i], want, atol=1e-4)
    specs = partition_specs(nnx.state(heads, nnx.Param))
    assert specs["adapter"]["up"]["kernel"] == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert specs["kernel"] == jax.sharding.PartitionSpec(None, "fsdp", None)


@pytest.mark.parametrize("adapter", ["none", "shared", "per_head"])
def test_fused_heads_compute_the_same_logits(adapter):
    heads = make_heads(adapter)
    fused = fused_for_inference(heads)
    hidden = jnp.asarray(np.random.RandomState(5).normal(size=(2, 3, D)), jnp.float32)
    np.testing.assert_allclose(fused.logits(hidden), heads.logits(hidden), atol=1e-5)
    if adapter == "per_head":  # each head has its own input: the [k, d, C] layout stays
        assert fused.kernel_dkc is None
        return
    assert fused.kernel is None and fused.kernel_dkc[...].shape == (D, K, C)
    assert (partition_specs(nnx.state(fused, nnx.Param))["kernel_dkc"]
            == jax.sharding.PartitionSpec("fsdp", None, None))  # the axis names moved along


@pytest.mark.parametrize("adapter", ["shared", "per_head"])
def test_adapters_start_as_identity(adapter):
    config = HeadsConfig(K, C, adapter=adapter, init="normal")
    with_adapter = IndependentHeads(D, config, RuntimeOptions(), nnx.Rngs(0))
    plain = IndependentHeads(D, HeadsConfig(K, C, init="normal"), RuntimeOptions(), nnx.Rngs(0))
    plain.kernel[...] = with_adapter.kernel[...]
    hidden = jnp.asarray(np.random.RandomState(4).normal(size=(3, D)), jnp.float32)
    np.testing.assert_allclose(with_adapter.logits(hidden), plain.logits(hidden), atol=1e-6)


def test_lm_head_mean_initialisation_and_symbol_mask():
    pad = C - 1
    table = np.array([[0, 1, pad, pad, pad], [0, 2, 3, pad, pad], [4, pad, pad, pad, pad],
                      [pad, pad, pad, pad, pad]])  # the last row is not a valid token
    valid = np.array([True, True, True, False])
    unembedding = np.random.RandomState(5).normal(size=(4, D)).astype(np.float32)
    heads = IndependentHeads(D, HeadsConfig(K, C), RuntimeOptions(), nnx.Rngs(0))
    spelling = types.SimpleNamespace(table=table, valid=valid, k=K, num_symbols=C)  # a toy alphabet
    heads.attach_spelling(spelling, unembedding)
    kernel = np.asarray(heads.kernel[...])
    np.testing.assert_allclose(kernel[0, :, 0], unembedding[:2].mean(0), atol=1e-6)
    np.testing.assert_allclose(kernel[1, :, pad], unembedding[2], atol=1e-6)
    np.testing.assert_allclose(kernel[2, :, pad], unembedding[[0, 2]].mean(0), atol=1e-6)
    mask = np.asarray(heads.symbol_mask[...])
    assert mask[0, pad] == MASKED_LOGIT  # only the invalid row starts with PAD: never first
    assert mask[0, 0] == 0 and mask[0, 4] == 0 and mask[0, 1] == MASKED_LOGIT
    assert mask[1, 1] == 0 and mask[1, 2] == 0 and mask[1, 0] == MASKED_LOGIT
    bias = np.asarray(heads.bias[...])
    assert bias[0, 0] == pytest.approx(np.log(2)) and bias[0, 4] == pytest.approx(0.0)
    logits = heads.logits(jnp.zeros((1, D)))
    assert int(jnp.argmax(logits[0, 0])) == 0  # two tokens start with symbol 0, one with 4

    prior = np.array([0.1, 0.6, 0.3, 0.0])
    heads.attach_spelling(spelling, unembedding, token_prior=prior)
    np.testing.assert_allclose(np.asarray(heads.kernel[...])[0, :, 0],
                               (0.1 * unembedding[0] + 0.6 * unembedding[1]) / 0.7, atol=1e-6)
    assert np.asarray(heads.bias[...])[0, 4] == pytest.approx(np.log(0.3))


def test_head_cost_against_lm_head():
    cost = head_cost(576, 49152, HeadsConfig(16, 274))
    assert cost["heads_params"] == 16 * 576 * 274 + 16 * 274
    assert cost["lm_head_params"] == 576 * 49152
    assert cost["ratio"] == pytest.approx((16 * 576 * 274 + 16 * 274) / (576 * 49152))
    shared = head_cost(576, 49152, HeadsConfig(16, 274, adapter="shared"))
    assert shared["heads_params"] == cost["heads_params"] + 2 * 576 * 2304 + 2304 + 576
