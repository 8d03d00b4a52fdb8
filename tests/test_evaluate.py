"""`python -m spellm_jax.evaluate`: every metric present and in range on a tiny run, the
last-word task built from held-out text, and the independence ceiling on known distributions."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from spellm_jax import runs
from spellm_jax.data import load_corpora
from spellm_jax.data.last_word import last_word_items
from spellm_jax.evaluation import (
    EvalSettings,
    agreement_by_confidence,
    chain_ceiling,
    confident_misses,
    evaluate,
    independence_ceiling,
    matching_prefix,
)
from spellm_jax.models.char_decoders import HeadsConfig
from spellm_jax.models.llama import RuntimeOptions
from spellm_jax.pretrained import build_model, build_spellm
from spellm_jax.spelling import DeviceSpelling, Respeller, SpellingTable
from spellm_jax.tokenizers import load_tokenizer
from tests.oracles import TeacherOracle, with_decoder

SHARES = ("free_agreement", "vocab_agreement", "ceiling_free_agreement", "ceiling_vocab_agreement",
          "exact_token_accuracy", "one_token_share", "several_tokens_share", "unusable_share")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2")


def test_evaluate_reports_every_metric_in_range(tiny_chain_run):
    _, workdir = tiny_chain_run
    command = [sys.executable, "-m", "spellm_jax.evaluate", f"--workdir={workdir}",
               "--prompts=4", "--new_tokens=8", "--real_text_rows=4", "--last_word_items=64",
               "--ceiling_ks=4,8"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    out = workdir / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("real_text", "continuations"):
        group = metrics[name]
        for key in SHARES:
            assert 0 <= group[key] <= 1, (name, key)
        assert group["one_token_share"] + group["several_tokens_share"] + group[
            "unusable_share"] == pytest.approx(1)
        assert 0 < group["spellm_bits_per_byte"] < 64 and 0 < group["teacher_bits_per_byte"] < 64
        assert len(group["head_accuracy"]) == metrics["k"]
        assert all(0 <= a <= 1 for a in group["head_accuracy"])
        assert group["mean_input_tokens_per_step"] >= group["one_token_share"]
        assert group["positions"] > 0
    assert metrics["real_text"]["positions"] > 400
    for mode in ("free", "vocab"):
        assert 0 <= metrics["continuations"][f"{mode}_median_matching_prefix"] <= 8
    assert set(metrics["ceiling_against_k"]) == {"4", "8"}
    assert metrics["last_word"]["items"] == 64
    assert all(0 <= metrics["last_word"][f"{m}_accuracy"] <= 1 for m in ("teacher", "free", "vocab"))
    for name in ("real_text", "continuations"):
        bins = metrics[name]["by_teacher_confidence"]
        assert sum(b["share"] for b in bins) == pytest.approx(1)
        assert all(b[key] is None or 0 <= b[key] <= 1 for b in bins for key in
                   ("free_agreement", "chain_ceiling_greedy", "independence_ceiling"))
        weighted = sum(b["share"] * b["free_agreement"] for b in bins if b["share"])
        assert weighted == pytest.approx(metrics[name]["free_agreement"])
        misses = metrics[name]["confident_misses"]
        assert sum(misses["first_wrong_symbol"]) <= misses["misses"] <= misses["positions"]
        assert len(misses["examples"]) == min(misses["misses"], 12)
    summary = (out / "summary.md").read_text()
    assert "independence ceiling" in summary and "Last-word completion (64 items" in summary
    assert "Agreement by the teacher's confidence" in summary
    assert "Misses where the teacher gives its token p >= 0.75" in summary
    for plot in ("head_accuracy.png", "agreement_vs_k.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_oracle_decoder_scores_perfectly(tiny_chain_run):
    """A decoder that spells the teacher's greedy token agrees with the teacher wherever the
    table can spell that token as one token, and every symbol it writes is the target's."""
    config, _ = tiny_chain_run
    teacher = runs.load_teacher(config)
    spelling = SpellingTable.from_tokenizer(teacher.tokenizer, 16, teacher.config.vocab_size)
    model = build_spellm(teacher, spelling, HeadsConfig(16, spelling.num_symbols), prior_tokens=0)
    oracle, tokenizer = with_decoder(model, TeacherOracle(model)), teacher.tokenizer  # the teacher's backbone
    teacher_model = build_model(teacher.config, RuntimeOptions(), teacher.params, teacher.source)
    settings = EvalSettings(corpora=("shakespeare",), real_text_rows=4, prompts=4, new_tokens=8,
                            last_word_items=32, ceiling_ks=(8,))
    metrics = evaluate(oracle, teacher_model, Respeller(spelling, tokenizer), settings)
    for name in ("real_text", "continuations"):
        group = metrics[name]
        assert group["exact_token_accuracy"] == 1.0 and group["head_accuracy"] == [1.0] * spelling.k
        assert group["free_agreement"] == group["representable_share"] > 0.9, name
        assert group["vocab_agreement"] <= group["free_agreement"] <= group["one_token_share"]
        assert group["confident_misses"]["misses"] == 0


def test_last_word_task_is_deterministic_held_out_and_large_enough(tokenizer):
    heldout = load_corpora(("shakespeare", "wiki"), "heldout")
    items = last_word_items(heldout, tokenizer, 500)
    assert items == last_word_items(heldout, tokenizer, 500)
    assert len(items) == 500 and len({i.context_ids + i.target_ids for i in items}) == 500
    assert {i.document for i in items} <= set(heldout)
    assert {i.document.split("/")[0] for i in items} == {"shakespeare", "wiki"}
    for item in items:
        assert tokenizer.decode(item.target_ids) == " " + item.word and len(item.word) >= 3
        assert 0 < len(item.context_ids) <= 40
    with pytest.raises(ValueError, match="fewer than"):
        last_word_items({"d": "Only one sentence here ends well."}, tokenizer, 2)


def test_ceiling_recovers_a_certain_teacher(tokenizer):
    """Exact marginals of a teacher that is sure of its token spell exactly that token."""
    spelling = SpellingTable.from_tokenizer(tokenizer, 16)
    fully_spelled = np.flatnonzero(spelling.canonical & (spelling.lengths <= 16))
    tokens = np.random.default_rng(0).choice(fully_spelled, 64, replace=False)
    logits = np.zeros((64, spelling.vocab_size), np.float32)
    logits[np.arange(64), tokens] = 40.0
    free, vocab = independence_ceiling(jnp.asarray(logits), DeviceSpelling.of(spelling))
    np.testing.assert_array_equal(np.asarray(free), tokens)
    np.testing.assert_array_equal(np.asarray(vocab), tokens)


def test_exact_decoders_follow_a_teacher_above_one_half_and_can_miss_below(tokenizer):
    """The confidence bins' reading: a teacher whose top token has p > 0.5 is followed by exact
    conditionals decoded greedily and by exact marginals, however the rest of its mass lies; at
    p = 0.4, with 0.6 on two tokens that share another first symbol, both choose that symbol."""
    spelling = SpellingTable.from_tokenizer(tokenizer, 16)
    spelled = spelling.canonical & (spelling.lengths <= 16) & (spelling.lengths >= 2)
    first = spelling.table[:, 0]
    rng = np.random.default_rng(0)
    targets, rivals = [], []
    while len(targets) < 16:
        target, other = rng.choice(np.flatnonzero(spelled), 2, replace=False)
        same_first = np.flatnonzero(spelled & (first == first[other]))
        if first[target] != first[other] and len(same_first) >= 2:
            targets.append(target)
            rivals.append(rng.choice(same_first, 2, replace=False))
    device = DeviceSpelling.of(spelling)
    top_prob, hits = [], {"chain_ceiling_greedy": [], "independence_ceiling": []}
    for p_top in (0.52, 0.4):
        logits = np.full((16, spelling.vocab_size), -30.0, np.float32)
        logits[np.arange(16), targets] = np.log(p_top)
        for row, pair in enumerate(rivals):
            logits[row, pair] = np.log((1 - p_top) / 2)
        logits = jnp.asarray(logits)
        top_prob.append(np.full(16, p_top))
        hits["chain_ceiling_greedy"].append(
            np.asarray(chain_ceiling(logits, device, beam=1, constrained=False)) == targets)
        hits["independence_ceiling"].append(np.asarray(independence_ceiling(logits, device)[0])
                                            == targets)
    bins = agreement_by_confidence(np.concatenate(top_prob),
                                   {name: np.concatenate(h) for name, h in hits.items()})
    assert [b["share"] for b in bins] == [0.0, 0.5, 0.5, 0.0]
    assert bins[0]["chain_ceiling_greedy"] is None
    for name in hits:
        assert (bins[1][name], bins[2][name]) == (0.0, 1.0), name


def test_confident_misses_by_hand(tokenizer):
    spelling = SpellingTable.from_tokenizer(tokenizer, 16)
    water, the, wat = (tokenizer.convert_tokens_to_ids(t) for t in ("\u0120water", "\u0120the", "\u0120wat"))
    teacher = np.array([water, water, the, water])
    free = np.array([the, wat, the, the])  # a miss at symbol 1, a miss at symbol 4, a hit, unsure
    rows = spelling.table[free]
    misses = confident_misses(np.array([0.9, 0.8, 0.95, 0.3]), teacher, rows, free, spelling)
    assert misses["positions"] == 3 and misses["misses"] == 2
    assert misses["first_wrong_symbol"] == [0, 1, 0, 0, 1] + [0] * 11
    assert misses["examples"] == [[0.9, " water", " the"], [0.8, " water", " wat"]]


def test_matching_prefix():
    assert matching_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert matching_prefix([1, 2, 3], [1, 2]) == 2
    assert matching_prefix([5], [6]) == 0
