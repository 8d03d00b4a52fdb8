"""Oracle character decoders for tests: objects assigned to a SpeLLM's `char_heads`, choosing
rows with certainty by a rule (the teacher's greedy token, a fixed string)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spellm_jax.models.char_decoders import HeadsConfig
from spellm_jax.models.char_decoders.independent import IndependentHeads
from spellm_jax.models.llama import RuntimeOptions
from spellm_jax.models.spellm import SpeLLM


class OneHotDecoder(IndependentHeads):
    """Independent heads whose logits are 50 on the symbols `rows_for(hidden)` chooses and 0
    elsewhere: they decode (free or constrained) and score exactly as the paper's heads do."""

    def __init__(self, config: HeadsConfig):
        super().__init__(1, config, RuntimeOptions(), nnx.Rngs(0))

    def rows_for(self, hidden: jax.Array) -> jax.Array:
        raise NotImplementedError

    def logits(self, hidden, rows=None):
        return 50.0 * jax.nn.one_hot(self.rows_for(hidden), self.config.num_symbols)


class TeacherOracle(OneHotDecoder):
    """Spells the teacher's greedy token (its LM head is the tied embedding)."""

    def __init__(self, model: SpeLLM):
        super().__init__(model.heads_config)
        self.embedding = nnx.Variable(model.model.embed_tokens[...])
        self.table = nnx.Variable(model.spelling.table[...])

    def rows_for(self, hidden):
        return self.table[...][jnp.argmax(hidden @ self.embedding[...].T, axis=-1)]


class FixedString(OneHotDecoder):
    """Always spells the same row of symbols."""

    def __init__(self, config: HeadsConfig, row: np.ndarray):
        super().__init__(config)
        self.row = nnx.Variable(jnp.asarray(row, jnp.int32))

    def rows_for(self, hidden):
        return jnp.broadcast_to(self.row[...], (*hidden.shape[:-1], self.config.k))


def with_decoder(model: SpeLLM, decoder: nnx.Module) -> SpeLLM:
    """A copy of `model` whose character decoder is `decoder`."""
    other = nnx.merge(*nnx.split(model))
    other.char_heads = decoder
    return other
