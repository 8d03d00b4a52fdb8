"""SpeLLM: the Llama-family backbone, its original LM head (the teacher) and the character heads."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spellm_jax import spelling_lookup
from spellm_jax.losses import spelled_log_probs
from spellm_jax.models.char_heads import CharHeads, HeadsConfig
from spellm_jax.models.config import ModelConfig
from spellm_jax.models.llama import LlamaForCausalLM, RuntimeOptions

if TYPE_CHECKING:
    from spellm_jax.charset import SpellingTable


class SpellingConstant(nnx.Variable):
    """Arrays derived from the spelling table that decoding needs on device; not trained and
    not checkpointed (the table is rebuilt from the tokenizer and checked by its hash)."""


class SpeLLM(LlamaForCausalLM):
    """One backbone pass gives character logits `[B, T, k, C]` and, on request, teacher logits."""

    def __init__(self, config: ModelConfig, heads: HeadsConfig,
                 options: RuntimeOptions | None = None, *, rngs: nnx.Rngs):
        super().__init__(config, options, rngs=rngs)
        self.heads_config = heads
        self.char_heads = CharHeads(config.hidden_size, heads, self.options, rngs)
        v, k = config.vocab_size, heads.k
        self.spelling_table = SpellingConstant(jnp.full((v, k), heads.num_symbols - 1, jnp.int32))
        self.token_valid = SpellingConstant(jnp.zeros((v,), bool))
        self.token_lengths = SpellingConstant(jnp.zeros((v,), jnp.int32))
        self.lookup_hashes = SpellingConstant(jnp.zeros((v,), jnp.uint32))
        self.lookup_ids = SpellingConstant(jnp.full((v,), -1, jnp.int32))

    @property
    def pad_symbol(self) -> int:
        return self.heads_config.num_symbols - 1

    def unembedding(self) -> jax.Array:
        """The LM head as `[V, d]` rows (the embedding when tied)."""
        if self.lm_head is None:
            return self.model.embed_tokens[...]
        return self.lm_head.kernel[...].T

    def attach_spelling(self, spelling: SpellingTable, init_heads: bool = True,
                        token_prior: np.ndarray | None = None) -> None:
        """Loads the decoding constants and the symbol mask; initialises the heads if asked
        (`token_prior` `[V]` weights the LM-head rows, see `CharHeads.set_spelling`)."""
        heads = self.heads_config
        if (spelling.k, spelling.num_symbols) != (heads.k, heads.num_symbols):
            raise ValueError(f"spelling table has k={spelling.k}, C={spelling.num_symbols} but the "
                             f"heads were built for k={heads.k}, C={heads.num_symbols}.")
        if spelling.vocab_size != self.config.vocab_size:
            raise ValueError(f"spelling table covers {spelling.vocab_size} tokens, the model "
                             f"{self.config.vocab_size}; build it with vocab_size=the model's.")
        table = np.asarray(spelling.table, np.int32)
        hashes, ids = spelling_lookup.build_lookup(table, np.asarray(spelling.canonical))
        self.spelling_table.set_value(jnp.asarray(table))
        self.token_valid.set_value(jnp.asarray(spelling.valid))
        self.token_lengths.set_value(jnp.asarray(spelling.lengths, jnp.int32))
        self.lookup_hashes.set_value(jnp.asarray(hashes))
        self.lookup_ids.set_value(jnp.asarray(ids))
        unembedding = np.asarray(self.unembedding()) if init_heads else None
        self.char_heads.set_spelling(table, np.asarray(spelling.valid), unembedding, token_prior,
                                     initialise=init_heads)

    def char_logits(self, hidden: jax.Array) -> jax.Array:
        return self.char_heads(hidden)

    def vocab_log_scores(self, char_logits: jax.Array) -> jax.Array:
        """`Σ_i log q_i(spell(v)_i)` for every token v `[..., V]` (a gather, no `d x V` matmul);
        tokens that are not spellable get -inf."""
        scores = spelled_log_probs(jax.nn.log_softmax(char_logits, axis=-1),
                                   self.spelling_table[...])
        return jnp.where(self.token_valid[...], scores, -jnp.inf)

    def lookup_tokens(self, rows: jax.Array) -> jax.Array:
        """Token ids of spelled rows `[..., k]` (-1 where the string is not one token)."""
        rows = spelling_lookup.canonical_rows(rows, self.pad_symbol)
        return spelling_lookup.lookup(rows, self.spelling_table[...], self.lookup_hashes[...],
                                      self.lookup_ids[...])

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 with_teacher: bool = False):
        """Character logits `[B, T, k, C]`, plus the teacher's `[B, T, V]` if `with_teacher`."""
        hidden, _ = self.model(input_ids, attention_mask=attention_mask)
        if with_teacher:
            return self.char_logits(hidden), self.lm_logits(hidden)
        return self.char_logits(hidden)
