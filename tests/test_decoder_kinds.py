"""A character decoder kind is one module: a trivial kind written only in this file (with its
PyTorch twin) trains, decodes free and constrained and exports to PyTorch with no change anywhere
else. (`evaluate` through the interface is test_evaluate's oracle decoder, also written only in
the tests.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn

from spellm_jax import decoding, runs, trainer
from spellm_jax.export import export_spellm, parity_with_torch
from spellm_jax.models.char_decoders import HeadsConfig, register_decoder
from spellm_jax.models.llama import RuntimeOptions
from spellm_jax.spelling import DeviceSpelling, Respeller, SpellingTable
from spellm_jax.torch_spellm import TorchSpeLLM, register_torch_decoder, token_scores
from tests.test_distill import tiny_config

FIXED_SPELLING = b" the"


@register_decoder("fixed_token")
class FixedToken(nnx.Module):
    """Ignores its input: one trainable `[k, C]` table of logits, initialised to spell the token
    `FIXED_SPELLING` with certainty."""

    FRESH_PARAMETERS = ()
    FIXED_PARAMETERS = ()

    def __init__(self, d: int, config: HeadsConfig, options: RuntimeOptions, rngs: nnx.Rngs):
        self.config = config
        self.table_logits = nnx.Param(jnp.zeros((config.k, config.num_symbols)))

    def logits(self, hidden, rows=None):
        shape = (*hidden.shape[:-1], self.config.k, self.config.num_symbols)
        return jnp.broadcast_to(self.table_logits[...], shape)

    def choose(self, hidden, spelling, key=None, sampling=None, constrained=False, beam=1,
               unembedding=None):  # no word rows: the LM head's rows are not needed
        if constrained:  # the best-scored vocabulary token
            return spelling.rows_of(jnp.argmax(self._vocab_log_probs(hidden, spelling), axis=-1))
        return jnp.argmax(self.logits(hidden), axis=-1).astype(jnp.int32)

    def token_log_probs(self, hidden, rows, spelling: DeviceSpelling):
        log_probs = self._vocab_log_probs(hidden, spelling)
        return jnp.take_along_axis(log_probs, spelling.lookup(rows)[..., None], axis=-1)[..., 0]

    def _vocab_log_probs(self, hidden, spelling: DeviceSpelling):
        scores = spelling.token_scores(jax.nn.log_softmax(self.logits(hidden), axis=-1))
        return jax.nn.log_softmax(scores, axis=-1)

    def soft_targets(self, token_weights, rows, spelling: DeviceSpelling):
        return spelling.symbol_marginals(token_weights)

    def spelled_logits(self, teacher_logits):
        return teacher_logits

    def word_losses(self, hidden, teacher_logits):
        return None

    def loss_weights(self, rows, spelling):
        return jnp.ones(rows.shape, jnp.float32)

    def attach_spelling(self, spelling: SpellingTable, unembedding=None, token_prior=None):
        if unembedding is not None:
            row = spelling.table[spelling.spellings.index(FIXED_SPELLING)]
            self.table_logits[...] = 10.0 * jax.nn.one_hot(row, self.config.num_symbols)

    def fuse_projections(self):
        pass


@register_torch_decoder("fixed_token")
class TorchFixedToken(nn.Module):
    def __init__(self, tensors, heads, table, valid, spelling):
        super().__init__()
        self.table_logits = nn.Parameter(tensors["table_logits"].float(), requires_grad=False)
        self.register_buffer("table", table)
        self.register_buffer("valid", valid)

    def logits(self, hidden, rows=None):
        return self.table_logits.expand(*hidden.shape[:-1], *self.table_logits.shape)

    def choose(self, hidden, constrained=False, beam=1, unembedding=None):
        if constrained:
            scores = token_scores(torch.log_softmax(self.logits(hidden), dim=-1), self.table,
                                  self.valid)
            return self.table[scores.argmax(-1)]
        return self.logits(hidden).argmax(-1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("fixed_token")  # two steps: the first has learning rate 0
    config = tiny_config(**{"heads.kind": "fixed_token", "train.steps": 2, "train.log_every": 1,
                            "train.eval_every": 100})
    summary = trainer.run(config, root / "run")
    teacher = runs.load_teacher(config)
    model, tokenizer, spelling = runs.load_spellm(root / "run", teacher=teacher)
    return root, config, summary, teacher, model, Respeller(spelling, tokenizer)


def test_a_kind_trains_through_the_interface(trained):
    _, _, summary, _, model, respeller = trained
    assert summary["step"] == 2 and np.isfinite(summary["loss"]) and summary["loss"] > 0
    row = respeller.spelling.table[respeller.spelling.spellings.index(FIXED_SPELLING)]
    initial = 10.0 * np.eye(model.heads_config.num_symbols)[row]
    assert model.heads_config.kind == "fixed_token"
    assert not np.array_equal(np.asarray(model.char_heads.table_logits[...]), initial)  # it trained


def test_a_kind_decodes_free_and_constrained(trained):
    _, _, _, _, model, respeller = trained
    token = respeller.spelling.spellings.index(FIXED_SPELLING)
    prompts = [[1, 2, 3], [4, 5]]
    for rule in (decoding.FreeRule(respeller=respeller), decoding.VocabRule()):
        generation = decoding.generate(model, prompts, 4, rule)
        assert generation.tokens == [[token] * 4] * 2 and generation.host_round_trips == 0


def test_a_kind_exports_to_its_pytorch_twin(trained):
    root, config, _, _, model, respeller = trained
    out = export_spellm(model, respeller.tokenizer, respeller.spelling, root / "exported",
                        base_model=config.teacher)
    torch_spellm = TorchSpeLLM.from_pretrained(out)
    assert isinstance(torch_spellm.decoder, TorchFixedToken)
    parity = parity_with_torch(model, respeller, torch_spellm, [[1, 2, 3], [7, 8, 9, 10]], 6)
    assert parity["lm_max_diff"] <= 1e-5 and parity["chars_max_diff"] <= 1e-5, parity
    assert parity["same_masks"] and all(parity["identical"].values()), parity
