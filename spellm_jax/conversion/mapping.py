"""The one table between transformers state-dict names and ours, used in both directions.

Our layout mirrors transformers' module tree, so the table is derived from our parameters:
renames plus a transpose for every linear kernel (`[in, out]` here, `[out, in]` in PyTorch). Both
directions check every name and shape and fail loudly on anything missing or left over.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import numpy as np

from spellm_jax.models.config import ModelConfig
from spellm_jax.models.params import (
    ParamMismatchError,
    check_params,
    mismatch_report,
    param_shapes,
)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One tensor: our flat key, transformers' key, and whether the matrix is transposed."""

    ours: str
    hf: str
    transpose: bool


TIED_LM_HEAD = "lm_head.weight"  # present in a tied model's state_dict(), absent from its files
_EMBEDDING = Rule("model/embed_tokens", "model.embed_tokens.weight", False)


def _rule(ours: str) -> Rule:
    """transformers' name for one of our parameters: `/` becomes `.`, and a linear `kernel`
    (`[in, out]` here) is the transposed `weight`."""
    if ours == _EMBEDDING.ours:
        return _EMBEDDING
    if ours.endswith("/kernel"):
        return Rule(ours, ours.removesuffix("/kernel").replace("/", ".") + ".weight", True)
    return Rule(ours, ours.replace("/", "."), False)


@functools.cache
def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our flat key -> shape of every parameter of a model with this config (from the module
    tree itself, built abstractly: no memory is allocated)."""
    from flax import nnx

    from spellm_jax.models.llama import LlamaForCausalLM

    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    return {key: tuple(shape) for key, shape in param_shapes(model).items()}


def conversion_rules(config: ModelConfig) -> list[Rule]:
    """Every tensor of a model with this config, in canonical (one entry per layer) layout."""
    return [_rule(key) for key in expected_shapes(config)]


def check_hf_names(config: ModelConfig, hf_state: Mapping, source: str) -> None:
    rules = conversion_rules(config)
    names = {rule.hf for rule in rules}
    # Tied models may still carry a copy of the embedding as lm_head.weight: that is not a leftover.
    ignorable = {TIED_LM_HEAD} if config.tie_word_embeddings else set()
    missing = sorted(names - set(hf_state))
    unused = sorted(set(hf_state) - names - ignorable)
    if missing or unused:
        raise ParamMismatchError(mismatch_report(
            f"weights in {source} do not match a {config.model_type} model of this config:",
            {"missing": missing, "unused": unused}))


def from_hf(config: ModelConfig, hf_state: Mapping[str, np.ndarray], source: str = "the checkpoint"
            ) -> dict[str, np.ndarray]:
    """transformers state dict (numpy) -> our canonical flat params, checked against the config."""
    check_hf_names(config, hf_state, source)
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
