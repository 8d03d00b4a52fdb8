"""`load_pretrained(source)`: a ready model and its tokenizer from any supported source."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from spellm_jax.conversion.sources import load_source
from spellm_jax.models.config import ModelConfig
from spellm_jax.models.llama import LlamaForCausalLM, RuntimeOptions
from spellm_jax.models.params import load_params


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
