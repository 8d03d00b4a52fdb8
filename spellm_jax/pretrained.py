"""`load_pretrained(source)`: a ready model and its tokenizer from any supported source."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spellm_jax import decoding
from spellm_jax.conversion.sources import Pretrained, load_source
from spellm_jax.models.char_decoders import HeadsConfig, build_decoder, fixed_tensors
from spellm_jax.models.config import ModelConfig
from spellm_jax.models.llama import LlamaForCausalLM, RuntimeOptions
from spellm_jax.models.params import load_params
from spellm_jax.models.spellm import SpeLLM
from spellm_jax.sampling import Sampling
from spellm_jax.spelling import SpellingTable

NOT_IN_PRETRAINED = r"^char_heads/|/lora_[ab]$"  # parameters a pretrained source does not have


def build_model(config: ModelConfig, options: RuntimeOptions, params: Mapping[str, Any],
                source: str = "the given weights") -> LlamaForCausalLM:
    """A model holding `params` (canonical flat dict), without spending time on random init."""
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, options, rngs=nnx.Rngs(0)))
    load_params(model, params, source)
    return model


def load_pretrained(source: str, *, dtype=jnp.float32, param_dtype=jnp.float32,
                    scan_layers: bool = False) -> tuple[LlamaForCausalLM, Any]:
    """`(model, tokenizer)` for a HF dir, hub name, .gguf file, converted dir or `smollm2`.

    `model(input_ids)` returns logits `[B, T, V]`.
    """
    pretrained = load_source(source)
    options = RuntimeOptions(dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers)
    return build_model(pretrained.config, options, pretrained.params, source), pretrained.tokenizer


def teacher_token_prior(model: LlamaForCausalLM, start_ids: list[int], num_tokens: int = 64,
                        seed: int = 0) -> np.ndarray:
    """The teacher's next-token distribution averaged over a continuation it samples itself
    from `start_ids`: a data-free estimate of how often each token is predicted."""
    mesh = decoding.mesh_of(model)  # a teacher read onto a mesh (every host runs this)
    generated = decoding.generate(model, [start_ids], num_tokens,
                                  decoding.LMHeadRule(Sampling(temperature=1.0)),
                                  seed=seed, mesh=mesh).tokens[0]
    hidden, _ = model.model(decoding.on_mesh(np.asarray([start_ids + generated]), mesh, (None,)))
    return np.asarray(jax.nn.softmax(model.lm_logits(hidden)[0], axis=-1).mean(0))


def _init_lora(model: nnx.Module, seed: int) -> None:
    """Concrete LoRA factors (A random, B zero) in place of the abstract ones left by loading."""
    rngs = nnx.Rngs(seed + 1)
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = str(path[-1])
        if name not in ("lora_a", "lora_b"):
            continue
        shape, dtype = variable.get_value().shape, variable.get_value().dtype
        scale = 1 / shape[-2] ** 0.5
        value = (jax.random.normal(rngs.params(), shape, dtype) * scale if name == "lora_a"
                 else jnp.zeros(shape, dtype))
        variable.set_value(value)


def _spellm_on(pretrained: Pretrained, heads: HeadsConfig, options: RuntimeOptions,
               seed: int) -> SpeLLM:
    """A SpeLLM holding the pretrained backbone and LM head, with a freshly initialised decoder
    (and LoRA factors that start as the identity, when `options.lora_rank` asks for them)."""
    model = nnx.eval_shape(lambda: SpeLLM(pretrained.config, heads, options, rngs=nnx.Rngs(0)))
    load_params(model, pretrained.params, pretrained.source, exclude=NOT_IN_PRETRAINED)
    model.char_heads = build_decoder(pretrained.config.hidden_size, heads, options, nnx.Rngs(seed))
    if options.lora_rank:
        _init_lora(model, seed)
    return model


def build_spellm(pretrained: Pretrained, spelling: SpellingTable, heads: HeadsConfig,
                 options: RuntimeOptions | None = None, seed: int = 0,
                 prior_tokens: int = 64) -> SpeLLM:
    """A SpeLLM on the pretrained backbone and LM head, heads initialised per `heads.init`;
    `lm_head_mean` weights LM-head rows by the teacher's own token prior (`prior_tokens` sampled
    tokens; 0 for uniform weights)."""
    config = pretrained.config
    model = _spellm_on(pretrained, heads, options or RuntimeOptions(), seed)
    prior = None
    if heads.init == "lm_head_mean" and prior_tokens > 0:
        start = [config.bos_token_id if config.bos_token_id is not None else 0]
        prior = teacher_token_prior(model, start, prior_tokens, seed)
    model.attach_spelling(spelling, init_heads=True, token_prior=prior)
    return model


def load_exported(source: str, options: RuntimeOptions | None = None
                  ) -> tuple[SpeLLM, Any, SpellingTable]:
    """`(model, tokenizer, spelling)` of an exported SpeLLM directory (`python -m
    spellm_jax.export`) or of one converted back to Orbax."""
    pretrained = load_source(source)
    if pretrained.spellm is None:
        raise ValueError(f"{source} holds no character heads (no spellm_config.json); it is a "
                         "plain model: use load_pretrained or spellm_from_pretrained.")
    parts = pretrained.spellm
    embed = pretrained.params["model/embed_tokens"]
    options = options or RuntimeOptions(param_dtype=jnp.dtype(embed.dtype))
    model = _spellm_on(pretrained, HeadsConfig(**parts.config["heads"]), options, seed=0)
    fixed = fixed_tensors(model.char_heads)
    load_params(model.char_heads, {k: v for k, v in parts.tensors.items() if k not in fixed},
                f"{source}'s heads")
    model.attach_spelling(parts.spelling, init_heads=False)
    return model, pretrained.tokenizer, parts.spelling


def spellm_from_pretrained(source: str, *, k: int = 16, heads: HeadsConfig | None = None,
                           options: RuntimeOptions | None = None, seed: int = 0
                           ) -> tuple[SpeLLM, Any, SpellingTable]:
    """`(model, tokenizer, spelling)`: an untrained SpeLLM (heads from the LM head by default)."""
    pretrained = load_source(source)
    if pretrained.tokenizer is None:
        raise ValueError(f"{source} ships no tokenizer; a SpeLLM needs one to spell its vocabulary.")
    spelling = SpellingTable.from_tokenizer(pretrained.tokenizer, k,
                                            vocab_size=pretrained.config.vocab_size)
    heads = heads or HeadsConfig(k=k, num_symbols=spelling.num_symbols)
    return build_spellm(pretrained, spelling, heads, options, seed), pretrained.tokenizer, spelling
