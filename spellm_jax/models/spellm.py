"""SpeLLM: the Llama-family backbone, its original LM head (the teacher), one character decoder
and the spelling table on device."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from spellm_jax.models.char_decoders import HeadsConfig, build_decoder
from spellm_jax.models.config import ModelConfig
from spellm_jax.models.llama import LlamaForCausalLM, RuntimeOptions
from spellm_jax.sampling import GREEDY, Sampling
from spellm_jax.spelling import DeviceSpelling, SpellingTable


class SpeLLM(LlamaForCausalLM):
    """The backbone's final hidden states feed the LM head (the teacher) and `char_heads`, a
    `CharDecoder`; `spelling` holds the table's device arrays every decoder needs."""

    def __init__(self, config: ModelConfig, heads: HeadsConfig,
                 options: RuntimeOptions | None = None, *, rngs: nnx.Rngs):
        super().__init__(config, options, rngs=rngs)
        self.heads_config = heads
        self.char_heads = build_decoder(config.hidden_size, heads, self.options, rngs)
        self.spelling = DeviceSpelling(config.vocab_size, heads.k, heads.num_symbols)

    def unembedding(self) -> jax.Array:
        """The LM head as `[V, d]` rows (the embedding when tied)."""
        if self.lm_head is None:
            return self.model.embed_tokens[...]
        return self.lm_head.kernel[...].T

    def attach_spelling(self, spelling: SpellingTable, init_heads: bool = True,
                        token_prior: np.ndarray | None = None) -> None:
        """Loads the table's device arrays and what the decoder fixes from them; initialises the
        decoder from the LM head if asked (`token_prior` `[V]` weights its rows)."""
        heads = self.heads_config
        if (spelling.k, spelling.num_symbols) != (heads.k, heads.num_symbols):
            raise ValueError(f"spelling table has k={spelling.k}, C={spelling.num_symbols} but the "
                             f"heads were built for k={heads.k}, C={heads.num_symbols}.")
        if spelling.vocab_size != self.config.vocab_size:
            raise ValueError(f"spelling table covers {spelling.vocab_size} tokens, the model "
                             f"{self.config.vocab_size}; build it with vocab_size=the model's.")
        self.spelling = DeviceSpelling.of(spelling)
        unembedding = np.asarray(self.unembedding()) if init_heads else None
        self.char_heads.attach_spelling(spelling, unembedding, token_prior)

    def choose(self, hidden: jax.Array, key: jax.Array | None = None,
               sampling: Sampling = GREEDY, constrained: bool = False, beam: int = 1
               ) -> jax.Array:
        """The rows `[..., k]` decoding emits from hidden states `[..., d]`
        (`CharDecoder.choose`); a decoder with word rows checks the tokens it spells against
        the LM head's rows."""
        return self.char_heads.choose(hidden, self.spelling, key, sampling, constrained, beam,
                                      unembedding=self.unembedding())

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 rows: jax.Array | None = None) -> jax.Array:
        """Character logits `[B, T, k, C]`, teacher-forced on `rows` `[B, T, k]` (see
        `CharDecoder.logits`)."""
        hidden, _ = self.model(input_ids, attention_mask=attention_mask)
        return self.char_heads.logits(hidden, rows)
