"""The one table between transformers state-dict names and ours, used in both directions.

Our layout mirrors transformers' module tree, so the table is renames plus a transpose for every
linear kernel (`[in, out]` here, `[out, in]` in PyTorch). Both directions check every name and
shape and fail loudly on anything missing or left over.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from spellm_jax.models.config import ModelConfig
from spellm_jax.models.params import ParamMismatchError, check_params


@dataclasses.dataclass(frozen=True)
class Rule:
    """One tensor: our flat key, transformers' key, and whether the matrix is transposed."""

    ours: str
    hf: str
    transpose: bool


TIED_LM_HEAD = "lm_head.weight"  # present in a tied model's state_dict(), absent from its files

# (our suffix, HF suffix, transpose) inside `model/layers/{i}/` and `model.layers.{i}.`.
_LAYER_TABLE = (
    ("input_layernorm/weight", "input_layernorm.weight", False),
    ("post_attention_layernorm/weight", "post_attention_layernorm.weight", False),
    ("self_attn/q_proj/kernel", "self_attn.q_proj.weight", True),
    ("self_attn/k_proj/kernel", "self_attn.k_proj.weight", True),
    ("self_attn/v_proj/kernel", "self_attn.v_proj.weight", True),
    ("self_attn/o_proj/kernel", "self_attn.o_proj.weight", True),
    ("mlp/gate_proj/kernel", "mlp.gate_proj.weight", True),
    ("mlp/up_proj/kernel", "mlp.up_proj.weight", True),
    ("mlp/down_proj/kernel", "mlp.down_proj.weight", True),
)
_QKV_BIAS = tuple((f"self_attn/{p}/bias", f"self_attn.{p}.bias", False)
                  for p in ("q_proj", "k_proj", "v_proj"))
_O_BIAS = (("self_attn/o_proj/bias", "self_attn.o_proj.bias", False),)
_MLP_BIAS = tuple((f"mlp/{p}/bias", f"mlp.{p}.bias", False)
                  for p in ("gate_proj", "up_proj", "down_proj"))


def conversion_rules(config: ModelConfig) -> list[Rule]:
    """Every tensor of a model with this config, in canonical (one entry per layer) layout."""
    layer_table = list(_LAYER_TABLE)
    layer_table += list(_QKV_BIAS) * config.qkv_bias + list(_O_BIAS) * config.o_bias
    layer_table += list(_MLP_BIAS) * config.mlp_bias
    rules = [Rule("model/embed_tokens", "model.embed_tokens.weight", False),
             Rule("model/norm/weight", "model.norm.weight", False)]
    for i in range(config.num_layers):
        rules += [Rule(f"model/layers/{i}/{ours}", f"model.layers.{i}.{hf}", transpose)
                  for ours, hf, transpose in layer_table]
    if not config.tie_word_embeddings:
        rules.append(Rule("lm_head/kernel", "lm_head.weight", True))
    return rules


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our flat key -> shape for this config, derived from the config alone."""
    d, f, v, hd = config.hidden_size, config.intermediate_size, config.vocab_size, config.head_dim
    q, kv = config.num_heads * hd, config.num_kv_heads * hd
    layer = {
        "input_layernorm/weight": (d,), "post_attention_layernorm/weight": (d,),
        "self_attn/q_proj/kernel": (d, q), "self_attn/k_proj/kernel": (d, kv),
        "self_attn/v_proj/kernel": (d, kv), "self_attn/o_proj/kernel": (q, d),
        "mlp/gate_proj/kernel": (d, f), "mlp/up_proj/kernel": (d, f),
        "mlp/down_proj/kernel": (f, d),
        "self_attn/q_proj/bias": (q,), "self_attn/k_proj/bias": (kv,),
        "self_attn/v_proj/bias": (kv,), "self_attn/o_proj/bias": (d,),
        "mlp/gate_proj/bias": (f,), "mlp/up_proj/bias": (f,), "mlp/down_proj/bias": (d,),
    }
    shapes = {"model/embed_tokens": (v, d), "model/norm/weight": (d,), "lm_head/kernel": (d, v)}
    for i in range(config.num_layers):
        shapes.update({f"model/layers/{i}/{k}": s for k, s in layer.items()})
    return {rule.ours: shapes[rule.ours] for rule in conversion_rules(config)}


def _check_hf_names(config: ModelConfig, hf_state: Mapping, source: str) -> None:
    rules = conversion_rules(config)
    names = {rule.hf for rule in rules}
    # Tied models may still carry a copy of the embedding as lm_head.weight: that is not a leftover.
    ignorable = {TIED_LM_HEAD} if config.tie_word_embeddings else set()
    missing = sorted(names - set(hf_state))
    unused = sorted(set(hf_state) - names - ignorable)
    if missing or unused:
        parts = [f"weights in {source} do not match a {config.model_type} model of this config:"]
        if missing:
            parts.append(f"  missing: {', '.join(missing[:8])}" + (" …" if len(missing) > 8 else ""))
        if unused:
            parts.append(f"  unused: {', '.join(unused[:8])}" + (" …" if len(unused) > 8 else ""))
        raise ParamMismatchError("\n".join(parts))


def from_hf(config: ModelConfig, hf_state: Mapping[str, np.ndarray], source: str = "the checkpoint"
            ) -> dict[str, np.ndarray]:
    """transformers state dict (numpy) -> our canonical flat params, checked against the config."""
    _check_hf_names(config, hf_state, source)
    ours = {}
    for rule in conversion_rules(config):
        value = np.asarray(hf_state[rule.hf])
        ours[rule.ours] = value.T if rule.transpose else value
    check_params(expected_shapes(config), ours, source)
    return ours


def to_hf(config: ModelConfig, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our canonical flat params -> transformers `state_dict()` (numpy, contiguous).

    As in transformers, a tied model's state dict also names the embedding as `lm_head.weight`.
    """
    check_params(expected_shapes(config), params, "the model")
    hf = {}
    for rule in conversion_rules(config):
        value = np.asarray(params[rule.ours])
        hf[rule.hf] = np.ascontiguousarray(value.T if rule.transpose else value)
    if config.tie_word_embeddings:
        hf[TIED_LM_HEAD] = hf["model.embed_tokens.weight"]
    return hf
