"""The `CharDecoder` interface: everything the rest of spellm_jax asks of a character decoder,
its config, and the registry of kinds.

A decoder maps the backbone's final hidden state `[..., d]` to the next token's spelling, k
symbols of an alphabet of C. Training, evaluation, decoding and export call only the methods of
`CharDecoder`; a new kind is one module that registers itself with `register_decoder`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, Literal, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spellm_jax.models.llama import RuntimeOptions
from spellm_jax.sampling import GREEDY, Sampling
from spellm_jax.spelling import DeviceSpelling, SpellingTable

AdapterKind = Literal["none", "shared", "per_head"]
HeadInit = Literal["lm_head_mean", "normal"]
ADAPTERS = ("none", "shared", "per_head")
INITS = ("lm_head_mean", "normal")
MASKED_LOGIT = -1e9


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
    """Shape and variant of a character decoder (recorded in runs and exports)."""

    k: int
    num_symbols: int
    kind: str = "independent"
    use_bias: bool = True
    adapter: AdapterKind = "none"
    adapter_multiplier: int = 4  # adapter hidden width = multiplier * d
    init: HeadInit = "lm_head_mean"
    recurrent_width: int = 128  # the chain kind's state over the symbols chosen so far
    hidden_every_step: bool = False  # chain: every recurrent step rereads the hidden state
    # chain: tokens scored by their own rows, beside a rest row for the tokens the chain spells
    # (`shortlist.py`); the trainer fills it with the `heads.shortlist` most frequent training
    # tokens
    shortlist_tokens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "shortlist_tokens", tuple(map(int, self.shortlist_tokens)))
        if self.kind not in DECODER_KINDS:
            raise ValueError(f"heads.kind={self.kind!r}; choose one of {', '.join(DECODER_KINDS)}.")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"heads.adapter={self.adapter!r}; choose one of {', '.join(ADAPTERS)}.")
        if self.init not in INITS:
            raise ValueError(f"heads.init={self.init!r}; choose one of {', '.join(INITS)}.")


class CharDecoder(Protocol):
    """An `nnx.Module` from hidden states to the next token's spelling."""

    config: HeadsConfig
    FRESH_PARAMETERS: ClassVar[tuple[str, ...]]  # parameters no LM head initialises
    # paths of parameters that keep their first values (never in the trainable set)
    FIXED_PARAMETERS: ClassVar[tuple[tuple[str, ...], ...]]

    def logits(self, hidden: jax.Array, rows: jax.Array | None = None) -> jax.Array:
        """Teacher-forced symbol logits `[..., k, C]` (fp32): symbol i given `rows[..., :i]`
        (`[..., k]`); for rows `[..., P, k]` (P paths per hidden state, the loss's
        `paths`), `[..., P, k, C]`, or `[..., k, C]` from kinds blind to the rows; with
        `rows=None`, given the decoder's own greedy choices."""
        ...

    def choose(self, hidden: jax.Array, spelling: DeviceSpelling, key: jax.Array | None = None,
               sampling: Sampling = GREEDY, constrained: bool = False, beam: int = 1,
               unembedding: jax.Array | None = None) -> jax.Array:
        """The rows `[..., k]` (int32) decoding emits: greedy (the best of `beam` hypotheses
        where the kind searches) or sampled per `sampling`; with `constrained`, always the row
        of a vocabulary token. Kinds with word rows check the tokens they spell against the LM
        head's rows `unembedding` `[V, d]` when given (`SpeLLM.choose` gives them)."""
        ...

    def token_log_probs(self, hidden: jax.Array, rows: jax.Array, spelling: DeviceSpelling
                        ) -> jax.Array:
        """`[...]`: the log-probability of the token each row `[..., k]` spells, under the
        decoder's distribution restricted to the vocabulary (bits per byte, benchmarks)."""
        ...

    def soft_targets(self, token_weights: jax.Array, rows: jax.Array, spelling: DeviceSpelling
                     ) -> jax.Array:
        """The distillation targets `[..., k, C]` (each head's a distribution) for token weights
        `[..., V]` proportional to the teacher's probabilities, along the target rows `[..., k]`
        (or `[..., P, k]`: shaped as `logits`)."""
        ...

    def spelled_logits(self, teacher_logits: jax.Array) -> jax.Array:
        """The teacher's logits `[..., V]` over the tokens the decoder spells (-inf on those
        scored by their own rows): what `soft_targets` and the spelled targets follow."""
        ...

    def word_losses(self, hidden: jax.Array, teacher_logits: jax.Array
                    ) -> dict[str, jax.Array] | None:
        """For kinds with word rows, `word_kl`, `word_ce` and `word_acc` `[...]` of those rows
        against the teacher's logits `[..., V]`, and `rest_mass`, the teacher's mass on the
        tokens the decoder spells; None otherwise."""
        ...

    def loss_weights(self, rows: jax.Array, spelling: DeviceSpelling) -> jax.Array:
        """Which heads `[..., k]` (0 or 1) carry loss for the target rows."""
        ...

    def attach_spelling(self, spelling: SpellingTable, unembedding: np.ndarray | None = None,
                        token_prior: np.ndarray | None = None) -> None:
        """Fixes what the spelling table determines (e.g. masks of impossible symbols) and, given
        the LM head's `unembedding` `[V, d]`, initialises the parameters from it (tokens weighted
        by `token_prior` `[V]`, else uniformly) as `config.init` says."""
        ...

    def fuse_projections(self) -> None:
        """Lays the weights out for inference (`models.llama.fused_for_inference`)."""
        ...


DecoderFactory = Callable[[int, HeadsConfig, RuntimeOptions, nnx.Rngs], nnx.Module]
DECODER_KINDS: dict[str, DecoderFactory] = {}


def register_decoder(kind: str) -> Callable[[DecoderFactory], DecoderFactory]:
    """Class decorator: `HeadsConfig(kind=kind)` builds this decoder, `cls(d, config, options,
    rngs)`."""

    def register(factory: DecoderFactory) -> DecoderFactory:
        DECODER_KINDS[kind] = factory
        return factory

    return register


def build_decoder(d: int, config: HeadsConfig, options: RuntimeOptions, rngs: nnx.Rngs
                  ) -> nnx.Module:
    """The decoder of `config.kind` on hidden states of width d."""
    return DECODER_KINDS[config.kind](d, config, options, rngs)


class SymbolMask(nnx.Variable):
    """Additive `[k, C]` logit mask (0 or MASKED_LOGIT), fixed by the spelling table; not trained."""


def symbol_presence(spelling: SpellingTable, spelled: np.ndarray) -> np.ndarray:
    """bool `[k, C]`: some token of those `spelled` (bool `[V]`) has symbol c at position i (so
    PAD never comes first)."""
    c = spelling.num_symbols
    binned = np.where(spelled[:, None], spelling.table, c)  # other rows: ignored bin c
    return np.stack([np.bincount(binned[:, i], minlength=c + 1)[:c] for i in range(spelling.k)]) > 0


def symbol_mask_of(spelling: SpellingTable, spelled: np.ndarray) -> jax.Array:
    """The `SymbolMask` values of `spelling` over the tokens `spelled` (bool `[V]`)."""
    return jnp.asarray(np.where(symbol_presence(spelling, spelled), 0.0, MASKED_LOGIT),
                       jnp.float32)


def fixed_tensors(decoder: nnx.Module) -> dict[str, Any]:
    """The decoder's symbol masks (fixed by the spelling table), by flat key: exported beside
    the parameters so the PyTorch twin needs no spelling arithmetic for them."""
    state = nnx.state(decoder, SymbolMask)
    return {"/".join(map(str, path)): np.asarray(variable.get_value())
            for path, variable in nnx.to_flat_state(state)}
