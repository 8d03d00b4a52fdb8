"""The KV-cache decode loop equals full-sequence forwards; padding and sampling behave."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spellm_jax import decoding
from spellm_jax.models.config import ModelConfig
from spellm_jax.models.llama import LlamaForCausalLM, RuntimeOptions, fused_for_inference
from spellm_jax.sampling import Sampling, sample
from tests.hf_configs import TINY_CONFIGS


def tiny_model(scan_layers=False, name="llama_gqa2", lora_rank=0):
    config = ModelConfig.from_hf(TINY_CONFIGS[name].to_dict())
    options = RuntimeOptions(scan_layers=scan_layers, lora_rank=lora_rank)
    return LlamaForCausalLM(config, options, rngs=nnx.Rngs(3))


@nnx.jit
def full_forward(model, ids):
    return model(ids)


def greedy_by_full_forward(model, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        logits = full_forward(model, jnp.asarray([ids]))
        ids.append(int(jnp.argmax(logits[0, -1])))
    return ids[len(prompt):]


@pytest.mark.parametrize("scan_layers", [False, True], ids=["loop", "scan"])
def test_kv_cache_greedy_equals_full_forward(scan_layers):
    model = tiny_model(scan_layers)
    prompts = [[5, 17, 99, 3], [42, 7, 7, 8, 1, 2, 3, 60, 61, 62, 100, 11, 12, 13, 14, 15, 16, 17]]
    got = decoding.generate(model, prompts, 12).tokens
    for prompt, new in zip(prompts, got, strict=True):
        assert new == greedy_by_full_forward(model, prompt, 12)


def test_kv_cache_logits_equal_full_forward():
    model = tiny_model(name="qwen2_bias_tied")
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 128, (2, 10)))
    full = model(ids)
    cache = decoding.KVCache.zeros(model.config, 2, 16)
    key_valid = jnp.zeros((2, 16), bool).at[:, :6].set(True)
    hidden, cache = model.model(ids[:, :6], cache=cache, key_valid=key_valid)
    stepwise = [model.lm_logits(hidden)]
    for t in range(6, 10):
        key_valid = key_valid.at[:, t].set(True)
        hidden, cache = model.model(ids[:, t:t + 1], positions=jnp.full((2, 1), t), cache=cache,
                                    write_index=t, key_valid=key_valid)
        stepwise.append(model.lm_logits(hidden))
    assert np.abs(np.asarray(jnp.concatenate(stepwise, axis=1)) - np.asarray(full)).max() <= 1e-5


@pytest.mark.parametrize("variant", ["loop", "scan", "lora", "qkv_bias"])
def test_fused_projections_compute_the_same_function(variant):
    model = tiny_model(scan_layers=variant == "scan", lora_rank=4 if variant == "lora" else 0,
                       name="qwen2_bias_tied" if variant == "qkv_bias" else "llama_gqa2")
    if variant == "lora":  # non-zero B factors, so folding them in matters
        factors = [v for path, v in nnx.iter_graph(model) if path and path[-1] == "lora_b"]
        assert len(factors) == 7 * model.config.num_layers
        for i, factor in enumerate(factors):
            factor[...] = jax.random.normal(jax.random.key(i), factor.shape) * 0.1
    fused = fused_for_inference(fused_for_inference(model))  # fusing twice is fusing once
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 128, (2, 12)))
    assert np.abs(np.asarray(fused(ids)) - np.asarray(model(ids))).max() <= 1e-5
    prompts = [[5, 17, 99, 3], [42, 7, 7, 8, 1, 2, 3]]
    assert (decoding.generate(fused, prompts, 12).tokens
            == decoding.generate(model, prompts, 12).tokens)
    attention = fused.model.layers if variant == "scan" else fused.model.layers[0]
    assert attention.self_attn.q_proj is None and attention.mlp.gate_proj is None
    original = model.model.layers if variant == "scan" else model.model.layers[0]
    assert original.self_attn.q_proj is not None  # the original model is left as it was
    if variant != "lora":  # weights that are not fused are shared, not copied
        assert attention.self_attn.o_proj.kernel[...] is original.self_attn.o_proj.kernel[...]
        assert fused.model.embed_tokens[...] is model.model.embed_tokens[...]


def test_left_padded_batch_equals_each_example_alone():
    model = tiny_model()
    short, long = [9, 8, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    ids, mask = decoding.left_pad([short, long], pad_id=0, bucket=1)
    batch = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    alone = model(jnp.asarray([short]))
    assert np.abs(np.asarray(batch[0, -len(short):]) - np.asarray(alone[0])).max() <= 1e-5
    together = decoding.generate(model, [short, long], 10).tokens
    assert together[0] == decoding.generate(model, [short], 10).tokens[0]
    assert together[1] == decoding.generate(model, [long], 10).tokens[0]


def test_generation_stops_each_row_at_eos():
    model = tiny_model()
    free = decoding.generate(model, [[5, 6, 7], [1, 2]], 10).tokens
    eos = free[0][3]
    got = decoding.generate(model, [[5, 6, 7], [1, 2]], 10, eos_ids=[eos]).tokens
    assert got[0] == free[0][:free[0].index(eos) + 1]
    assert got[1] == (free[1][:free[1].index(eos) + 1] if eos in free[1] else free[1])


def test_sampling_respects_top_k_and_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)
    top2 = np.asarray(jax.vmap(lambda k: sample(logits, k, Sampling(1.0, 2)))(keys))
    assert set(np.unique(top2)) == {0, 1}
    nucleus = np.asarray(jax.vmap(lambda k: sample(logits, k,
                                                            Sampling(1.0, 0, 0.8)))(keys))
    assert set(np.unique(nucleus)) == {0, 1}
    full = np.asarray(jax.vmap(lambda k: sample(logits, k, Sampling(1.0)))(keys))
    assert set(np.unique(full)) == {0, 1, 2, 3}
    assert abs((full == 0).mean() - 0.5) < 0.1
    greedy = sample(logits, keys[0], Sampling())
    assert int(greedy[0]) == 0


def test_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="empty prompt"):
        decoding.generate(tiny_model(), [[1, 2], []], 4)
