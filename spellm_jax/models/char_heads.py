"""The k character heads: one `(k, d, C)` weight applied with one einsum, an optional residual
SiLU adapter in front (shared by all heads, or one per head via `nnx.vmap`), and a fixed mask of
symbols that no token has at a position."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spellm_jax import sharding
from spellm_jax.models.llama import Dense, RuntimeOptions

AdapterKind = Literal["none", "shared", "per_head"]
HeadInit = Literal["lm_head_mean", "normal"]
MASKED_LOGIT = -1e9


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
    """Shape and variant of the character heads."""

    k: int
    num_symbols: int
    use_bias: bool = True
    adapter: AdapterKind = "none"
    adapter_multiplier: int = 4  # adapter hidden width = multiplier * d
    init: HeadInit = "lm_head_mean"

    def __post_init__(self) -> None:
        if self.adapter not in ("none", "shared", "per_head"):
            raise ValueError(f"adapter={self.adapter!r}; choose 'none', 'shared' or 'per_head'.")
        if self.init not in ("lm_head_mean", "normal"):
            raise ValueError(f"init={self.init!r}; choose 'lm_head_mean' or 'normal'.")


class SymbolMask(nnx.Variable):
    """Additive `[k, C]` logit mask (0 or MASKED_LOGIT), fixed by the spelling table; not trained."""


class ResidualMLP(nnx.Module):
    """`x + down(silu(up(x)))`, with `down` zero-initialised so it starts as the identity."""

    def __init__(self, d: int, hidden: int, options: RuntimeOptions, rngs: nnx.Rngs):
        self.up = Dense(d, hidden, ("embed", "mlp"), use_bias=True, options=options, rngs=rngs,
                        lora=False)
        self.down = Dense(hidden, d, ("mlp", "embed"), use_bias=True, options=options, rngs=rngs,
                          kernel_init=jax.nn.initializers.zeros, lora=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.down(jax.nn.silu(self.up(x)))


class CharHeads(nnx.Module):
    """Hidden states `[..., d]` -> symbol logits `[..., k, C]` (fp32)."""

    def __init__(self, d: int, config: HeadsConfig, options: RuntimeOptions, rngs: nnx.Rngs):
        self.config, self.dtype = config, options.dtype
        k, c = config.k, config.num_symbols
        self.kernel = sharding.param(rngs.params(), jax.nn.initializers.normal(0.02), (k, d, c),
                                     ("char_head", "embed", "char_vocab"), options.param_dtype)
        self.bias = (sharding.param(rngs.params(), jax.nn.initializers.zeros, (k, c),
                                    ("char_head", "char_vocab"), options.param_dtype)
                     if config.use_bias else None)
        self.symbol_mask = SymbolMask(jnp.zeros((k, c), jnp.float32))
        self.kernel_dkc: nnx.Param | None = nnx.data(None)  # the kernel as [d, k, C], once fused
        hidden = config.adapter_multiplier * d
        if config.adapter == "shared":
            self.adapter = ResidualMLP(d, hidden, options, rngs)
        elif config.adapter == "per_head":
            @nnx.split_rngs(splits=k)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata=sharding.STACKED_HEADS_METADATA)
            def per_head(rngs: nnx.Rngs) -> ResidualMLP:
                return ResidualMLP(d, hidden, options, rngs)

            self.adapter = per_head(rngs)
        else:
            self.adapter = None

    def fuse_projections(self) -> None:
        """From now on the kernel is kept as `[d, k, C]`, so all heads are one plain matmul:
        XLA otherwise transposes the `[k, d, C]` kernel, a copy of every head weight, on each
        call (`fused_for_inference`). Per-head adapters feed each head its own input, which the
        `[k, d, C]` layout already serves, so they keep it."""
        if self.config.adapter == "per_head" or self.kernel_dkc is not None:
            return
        self.kernel_dkc = sharding.transposed(self.kernel, (1, 0, 2))
        self.kernel = None

    def __call__(self, hidden: jax.Array) -> jax.Array:
        hidden = hidden.astype(self.dtype)
        if self.config.adapter == "per_head":
            @nnx.vmap(in_axes=(0, None), out_axes=-2,
                      transform_metadata=sharding.STACKED_HEADS_METADATA)
            def adapt(adapter: ResidualMLP, h: jax.Array) -> jax.Array:
                return adapter(h)

            logits = jnp.einsum("...kd,kdc->...kc", adapt(self.adapter, hidden),
                                self.kernel[...].astype(self.dtype),
                                preferred_element_type=jnp.float32)
        else:
            if self.adapter is not None:
                hidden = self.adapter(hidden)
            kernel, spec = ((self.kernel, "...d,kdc->...kc") if self.kernel_dkc is None
                            else (self.kernel_dkc, "...d,dkc->...kc"))
            logits = jnp.einsum(spec, hidden, kernel[...].astype(self.dtype),
                                preferred_element_type=jnp.float32)
        if self.bias is not None:
            logits = logits + self.bias[...].astype(jnp.float32)
        return logits + self.symbol_mask[...]

    def set_spelling(self, table: np.ndarray, valid: np.ndarray,
                     unembedding: np.ndarray | None = None,
                     token_prior: np.ndarray | None = None, initialise: bool = True) -> None:
        """Masks symbols that no valid token of `table` `[V, k]` has at a position (so PAD never
        comes first) and, if `initialise` and for `lm_head_mean`, initialises head i from the
        unembedding `[V, d]`.

        With token weights w (the `token_prior`, else uniform) and S the valid tokens whose i-th
        symbol is c: `W_i[:, c]` = the w-weighted mean of `u_v` over S and `b_i[c] = log Σ_S w_v`,
        a first-order estimate of the log marginal `log Σ_S exp(h·u_v)`.
        """
        k, c = self.config.k, self.config.num_symbols
        weights = np.where(valid, 1.0 if token_prior is None else token_prior, 0.0)
        binned = np.where(valid[:, None], table, c)  # invalid rows fall into an ignored bin c
        mass = np.stack([np.bincount(binned[:, i], weights=weights, minlength=c + 1)[:c]
                         for i in range(k)])  # [k, C]
        present = np.stack([np.bincount(binned[:, i], minlength=c + 1)[:c] for i in range(k)]) > 0
        self.symbol_mask[...] = jnp.asarray(np.where(present, 0.0, MASKED_LOGIT), jnp.float32)
        if not initialise or self.config.init != "lm_head_mean":
            return
        if unembedding is None:
            raise ValueError("init='lm_head_mean' needs the LM head's unembedding matrix.")
        weighted = jnp.asarray(unembedding, jnp.float32) * jnp.asarray(weights, jnp.float32)[:, None]
        sums = jnp.stack([jax.ops.segment_sum(weighted, jnp.asarray(table[:, i]), num_segments=c)
                          for i in range(k)])  # [k, C, d]
        means = sums / jnp.maximum(jnp.asarray(mass, jnp.float32), 1e-30)[..., None]
        self.kernel[...] = jnp.swapaxes(means, 1, 2).astype(self.kernel[...].dtype)
        if self.bias is not None:
            log_mass = np.log(np.maximum(mass, 1e-30)).astype(np.float32)
            self.bias[...] = jnp.asarray(np.where(present, log_mass, 0.0), self.bias[...].dtype)


def head_cost(d: int, vocab_size: int, config: HeadsConfig) -> dict[str, float]:
    """Parameters and multiply-adds per token of the heads, beside the LM head's."""
    heads = config.k * d * config.num_symbols + config.use_bias * config.k * config.num_symbols
    adapter = 2 * d * config.adapter_multiplier * d + (config.adapter_multiplier + 1) * d
    adapter *= {"none": 0, "shared": 1, "per_head": config.k}[config.adapter]
    params = heads + adapter
    return {"lm_head_params": d * vocab_size, "heads_params": params,
            "lm_head_macs": d * vocab_size, "heads_macs": params,
            "ratio": params / (d * vocab_size)}
