"""SpeLLM decoding on the real bundled SmolLM2: the loop, the on-device lookup and the fallback."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spellm_jax import decoding
from spellm_jax.models.llama import fused_for_inference
from spellm_jax.models.spellm import SpeLLM
from spellm_jax.pretrained import spellm_from_pretrained

PROMPTS = ["Once upon a time, there was a little", "The capital of France is",
           "def fibonacci(n):\n    "]
HELD_OUT_TEXT = (
    "The river had risen overnight, and by morning the low fields along its banks were under "
    "water. Farmers moved their animals to higher ground while the town council met to decide "
    "whether the old bridge could still carry traffic. Engineers inspected the stone arches and "
    "reported that the foundations were sound, although the road surface needed repair. By the "
    "afternoon the rain had stopped, and children gathered on the hill to watch the brown water "
    "rush past the mill.")


class TeacherOracle(SpeLLM):
    """Heads that output exactly the one-hot spelling of the teacher's greedy token."""

    def char_logits(self, hidden):
        rows = self.spelling_table[...][jnp.argmax(self.lm_logits(hidden), axis=-1)]
        return 50.0 * jax.nn.one_hot(rows, self.heads_config.num_symbols)


class FixedString(SpeLLM):
    """Heads that always spell the same symbol row (set as `fixed_row`)."""

    def char_logits(self, hidden):
        row = jnp.asarray(self.fixed_row)
        logits = 50.0 * jax.nn.one_hot(row, self.heads_config.num_symbols)
        return jnp.broadcast_to(logits, (*hidden.shape[:-1], *logits.shape))


@pytest.fixture(scope="module")
def smollm2_spellm():
    return spellm_from_pretrained("smollm2", k=16)


def as_class(model, cls, **attributes):
    """The same parameters and constants behind another output rule of the heads."""
    graphdef, state = nnx.split(model)
    other = nnx.merge(graphdef, state)
    other.__class__ = cls
    for name, value in attributes.items():
        setattr(other, name, value)
    return other


def test_oracle_heads_reproduce_teacher_greedy_generation(smollm2_spellm):
    model, tokenizer, spelling = smollm2_spellm
    oracle = as_class(model, TeacherOracle)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    kwargs = dict(spelling=spelling, tokenizer=tokenizer)  # no EOS: all 32 tokens compared
    teacher = decoding.generate(oracle, prompts, 32, decoding.LMHeadRule(), **kwargs)
    assert all(len(t) == 32 for t in teacher)
    for rule in (decoding.FreeRule(), decoding.VocabRule()):
        assert decoding.generate(oracle, prompts, 32, rule, **kwargs) == teacher, type(rule).__name__


def test_out_of_vocabulary_strings_fall_back_to_the_tokenizer(smollm2_spellm):
    model, tokenizer, spelling = smollm2_spellm
    text = " the cat"
    expected = tokenizer(text)["input_ids"]
    assert len(expected) == 2 and spelling.ids_for_bytes(text.encode()) == expected
    row = np.full(spelling.k, spelling.pad_symbol)
    row[:len(text)] = list(text.encode())
    fixed = as_class(model, FixedString, fixed_row=tuple(row.tolist()))
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    got = decoding.generate(fixed, prompts, 7, decoding.FreeRule(), spelling=spelling,
                            tokenizer=tokenizer)
    assert got == [(expected * 4)[:7]] * 2
    # Bytes followed by a special symbol: the bytes' tokens, then the special token, then stop.
    eos = model.config.eos_token_ids[0]
    row = np.full(spelling.k, spelling.pad_symbol)
    row[:3] = [*b"ok", spelling.special_symbol(eos)]
    fixed = as_class(model, FixedString, fixed_row=tuple(row.tolist()))
    got = decoding.generate(fixed, prompts, 7, decoding.FreeRule(), eos_ids=[eos],
                            spelling=spelling, tokenizer=tokenizer)
    assert got == [[*tokenizer("ok")["input_ids"], eos]] * 2


def test_lm_head_mean_heads_agree_with_teacher_far_above_chance(smollm2_spellm):
    model, tokenizer, _ = smollm2_spellm
    ids = jnp.asarray([tokenizer(HELD_OUT_TEXT)["input_ids"]])

    @nnx.jit
    def agreement(model, ids):
        hidden, _ = model.model(ids)
        teacher = jnp.argmax(model.lm_logits(hidden), axis=-1)
        char_logits = model.char_logits(hidden)
        constrained = jnp.argmax(model.vocab_log_scores(char_logits), axis=-1)
        free = model.lookup_tokens(jnp.argmax(char_logits, axis=-1))
        return (constrained == teacher).mean(), (free == teacher).mean()

    constrained, free = (float(x) for x in agreement(model, ids))
    chance = 1 / model.config.vocab_size
    print(f"untrained lm_head_mean heads: vocab-constrained agreement {constrained:.1%}, "
          f"free {free:.1%} over {ids.shape[1]} positions (chance {chance:.4%})")
    assert constrained > 100 * chance


def test_batched_spellm_decoding_equals_single_rows(smollm2_spellm):
    model, tokenizer, spelling = smollm2_spellm
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    kwargs = dict(spelling=spelling, tokenizer=tokenizer)
    for rule in (decoding.FreeRule(), decoding.VocabRule()):
        together = decoding.generate(model, prompts, 8, rule, **kwargs)
        alone = [decoding.generate(model, [p], 8, rule, **kwargs)[0] for p in prompts]
        assert together == alone


def test_fused_projections_decode_smollm2_alike(smollm2_spellm):
    model, tokenizer, spelling = smollm2_spellm
    fused = fused_for_inference(model)
    ids = jnp.asarray([tokenizer(HELD_OUT_TEXT)["input_ids"][:48]])
    assert np.abs(np.asarray(fused.model(ids)[0]) - np.asarray(model.model(ids)[0])).max() <= 1e-4
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    kwargs = dict(spelling=spelling, tokenizer=tokenizer)
    for rule in (decoding.LMHeadRule(), decoding.FreeRule(), decoding.VocabRule()):
        assert (decoding.generate(fused, prompts, 16, rule, **kwargs)
                == decoding.generate(model, prompts, 16, rule, **kwargs))


def test_unspellable_bytes_are_dropped_not_fatal(smollm2_spellm):
    _, tokenizer, spelling = smollm2_spellm
    with pytest.raises(ValueError, match="0x04"):
        spelling.ids_for_bytes(b"a\x04b", tokenizer)
    ids = spelling.ids_for_bytes_lossy(b"a\x04b", tokenizer)
    assert b"".join(spelling.spellings[i] for i in ids) == b"ab"
