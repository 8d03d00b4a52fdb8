"""The paper's character decoder: k independent linear heads on the same hidden state.

One `(k, d, C)` weight applied with one einsum, an optional residual SiLU adapter in front (shared
by all heads, or one per head via `nnx.vmap`), and a fixed mask of symbols that no token has at a
position. Head i's target is the teacher's per-position symbol marginal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spellm_jax import sharding
from spellm_jax.models.char_decoders.base import (
    HeadsConfig,
    SymbolMask,
    register_decoder,
    symbol_mask_of,
    symbol_presence,
)
from spellm_jax.models.llama import Dense, RuntimeOptions
from spellm_jax.sampling import GREEDY, Sampling, sample
from spellm_jax.spelling import DeviceSpelling, SpellingTable


class ResidualMLP(nnx.Module):
    """`x + down(silu(up(x)))`, with `down` zero-initialised so it starts as the identity."""

    def __init__(self, d: int, hidden: int, options: RuntimeOptions, rngs: nnx.Rngs):
        self.up = Dense(d, hidden, ("embed", "mlp"), use_bias=True, options=options, rngs=rngs,
                        lora=False)
        self.down = Dense(hidden, d, ("mlp", "embed"), use_bias=True, options=options, rngs=rngs,
                          kernel_init=jax.nn.initializers.zeros, lora=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.down(jax.nn.silu(self.up(x)))


def lm_head_mean_init(spelling: SpellingTable, unembedding: np.ndarray,
                      token_prior: np.ndarray | None, spelled: np.ndarray
                      ) -> tuple[jax.Array, np.ndarray]:
    """Head i from the unembedding `[V, d]`: with token weights w (the `token_prior`, else
    uniform) and S the `spelled` tokens (bool `[V]`) whose i-th symbol is c, `W_i[:, c]` = the
    w-weighted mean of `u_v` over S and `b_i[c] = log Σ_S w_v`, a first-order estimate of the
    log marginal `log Σ_S exp(h·u_v)`. Returns the kernel `[k, d, C]` and the bias `[k, C]` (0
    where no such token has c at i)."""
    k, c, table = spelling.k, spelling.num_symbols, spelling.table
    weights = np.where(spelled, 1.0 if token_prior is None else token_prior, 0.0)
    binned = np.where(spelled[:, None], table, c)  # other rows fall into an ignored bin c
    mass = np.stack([np.bincount(binned[:, i], weights=weights, minlength=c + 1)[:c]
                     for i in range(k)])  # [k, C]
    weighted = jnp.asarray(unembedding, jnp.float32) * jnp.asarray(weights, jnp.float32)[:, None]
    sums = jnp.stack([jax.ops.segment_sum(weighted, jnp.asarray(table[:, i]), num_segments=c)
                      for i in range(k)])  # [k, C, d]
    means = sums / jnp.maximum(jnp.asarray(mass, jnp.float32), 1e-30)[..., None]
    log_mass = np.log(np.maximum(mass, 1e-30))
    bias = np.where(symbol_presence(spelling, spelled), log_mass, 0.0).astype(np.float32)
    return jnp.swapaxes(means, 1, 2), bias


@register_decoder("independent")
class IndependentHeads(nnx.Module):
    """Hidden states `[..., d]` -> symbol logits `[..., k, C]` (fp32), each head on its own."""

    FRESH_PARAMETERS: tuple[str, ...] = ()  # every parameter starts from the LM head
    FIXED_PARAMETERS: tuple[tuple[str, ...], ...] = ()

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

    # -- the CharDecoder interface -------------------------------------------------------------

    def logits(self, hidden: jax.Array, rows: jax.Array | None = None) -> jax.Array:
        """Symbol logits `[..., k, C]`; independent heads do not look at `rows`."""
        del rows
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

    def choose(self, hidden: jax.Array, spelling: DeviceSpelling, key: jax.Array | None = None,
               sampling: Sampling = GREEDY, constrained: bool = False, beam: int = 1,
               unembedding: jax.Array | None = None) -> jax.Array:
        """Each head picks its own symbol (that is the best string: no search needed); with
        `constrained`, the row of the token the heads score highest (`vocab_scores`). No word
        rows, so `unembedding` is not used."""
        del beam, unembedding
        if constrained:
            return spelling.rows_of(sample(self.vocab_scores(hidden, spelling), key, sampling))
        return sample(self.logits(hidden), key, sampling)

    def token_log_probs(self, hidden: jax.Array, rows: jax.Array, spelling: DeviceSpelling
                        ) -> jax.Array:
        """The heads' product of symbol probabilities, renormalised over the vocabulary."""
        log_probs = jax.nn.log_softmax(self.vocab_scores(hidden, spelling), axis=-1)
        tokens = spelling.lookup(rows)
        return jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]

    def vocab_scores(self, hidden: jax.Array, spelling: DeviceSpelling) -> jax.Array:
        """`Σ_i log q_i(spell(v)_i)` for every token v `[..., V]` (a gather, no `d x V` matmul)."""
        return spelling.token_scores(jax.nn.log_softmax(self.logits(hidden), axis=-1))

    def soft_targets(self, token_weights: jax.Array, rows: jax.Array, spelling: DeviceSpelling
                     ) -> jax.Array:
        """The teacher's per-position symbol marginals (the rows do not matter)."""
        del rows
        return spelling.symbol_marginals(token_weights)

    def spelled_logits(self, teacher_logits: jax.Array) -> jax.Array:
        """The heads spell every token."""
        return teacher_logits

    def spelled_tokens(self, spelling: SpellingTable) -> np.ndarray:
        """bool `[V]`: the tokens the heads spell (every valid one)."""
        return spelling.valid

    def word_losses(self, hidden: jax.Array, teacher_logits: jax.Array) -> None:
        """No token has its own row."""
        del hidden, teacher_logits

    def loss_weights(self, rows: jax.Array, spelling: DeviceSpelling) -> jax.Array:
        """Every head carries loss, PAD positions included (they predict the end of the token)."""
        del spelling
        return jnp.ones(rows.shape, jnp.float32)

    def attach_spelling(self, spelling: SpellingTable, unembedding: np.ndarray | None = None,
                        token_prior: np.ndarray | None = None) -> None:
        """Masks symbols that no token the heads spell has at a position (so PAD never comes
        first) and, given the unembedding and `init="lm_head_mean"`, sets the heads by
        `lm_head_mean_init`."""
        spelled = self.spelled_tokens(spelling)
        self.symbol_mask[...] = symbol_mask_of(spelling, spelled)
        if unembedding is None or self.config.init != "lm_head_mean":
            return
        kernel, bias = lm_head_mean_init(spelling, unembedding, token_prior, spelled)
        self.kernel[...] = kernel.astype(self.kernel[...].dtype)
        if self.bias is not None:
            self.bias[...] = jnp.asarray(bias, self.bias[...].dtype)

    def fuse_projections(self) -> None:
        """From now on the kernel is kept as `[d, k, C]`, so all heads are one plain matmul:
        XLA otherwise transposes the `[k, d, C]` kernel, a copy of every head weight, on each
        call (`fused_for_inference`). Per-head adapters feed each head its own input, which the
        `[k, d, C]` layout already serves, so they keep it."""
        if self.config.adapter == "per_head" or self.kernel_dkc is not None:
            return
        self.kernel_dkc = sharding.transposed(self.kernel, (1, 0, 2))
        self.kernel = None


def head_cost(d: int, vocab_size: int, config: HeadsConfig) -> dict[str, float]:
    """Parameters and multiply-adds per token of the heads, beside the LM head's."""
    heads = config.k * d * config.num_symbols + config.use_bias * config.k * config.num_symbols
    adapter = 2 * d * config.adapter_multiplier * d + (config.adapter_multiplier + 1) * d
    adapter *= {"none": 0, "shared": 1, "per_head": config.k}[config.adapter]
    # the chain kind's word rows and rest row
    shortlist = (len(config.shortlist_tokens) + 1) * d + 1 if config.shortlist_tokens else 0
    params = heads + adapter + shortlist
    return {"lm_head_params": d * vocab_size, "heads_params": params,
            "lm_head_macs": d * vocab_size, "heads_macs": params,
            "ratio": params / (d * vocab_size)}
