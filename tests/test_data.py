"""Data: real corpora (tfds), wiki markup stripping, packing, the per-host iterator, and the
teacher's own resumable generations. Corpora and generations are built from scratch in a
temporary cache that links only the assets."""

import json

import jax
import ml_collections
import numpy as np
import pytest

from spellm_jax import decoding
from spellm_jax.data import (
    BatchIterator,
    SelfGeneratedSpec,
    corpora,
    evaluation_prompts,
    generate_shards,
    heldout_ids,
    load_named_documents,
    load_self_generated,
    pack_documents,
    pack_ids,
    read_samples,
    sample_prompts,
    shard_dir,
    strip_wiki_markup,
    tokenize_documents,
    training_data,
)
from spellm_jax.data import self_generated as self_generated_lib
from tests.conftest import linked_cache

EOS = 2


@pytest.fixture(scope="module")
def teacher():
    """The bundled SmolLM2-135M teacher and its tokenizer."""
    from spellm_jax.pretrained import load_pretrained

    return load_pretrained("smollm2")


@pytest.fixture(scope="module")
def tokenizer(teacher):
    return teacher[1]


@pytest.fixture(scope="module")
def cache(teacher, tmp_path_factory):
    """An empty SPELLM_CACHE holding links to the assets (fetched into the user cache once)."""
    path = linked_cache(tmp_path_factory.mktemp("spellm_cache"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPELLM_CACHE", str(path))
        yield path


def all_documents(name: str) -> dict[str, dict[str, str]]:
    return {split: load_named_documents(name, split) for split in corpora.SPLITS}


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)


# ---------------------------------------------------------------- corpora


@pytest.mark.parametrize("name", ["shakespeare", "wiki"])
def test_corpus_builds_and_splits_by_document(cache, name):
    documents = all_documents(name)
    train, heldout = documents["train"], documents["heldout"]
    assert (cache / "tfds" / corpora.CORPORA[name].name).is_dir()  # built here, from the assets
    assert len(train) > 30 and len(heldout) >= corpora.MIN_HELDOUT_DOCUMENTS
    assert not set(train) & set(heldout)
    assert not set(train.values()) & set(heldout.values())
    assert set(heldout) == heldout_ids([*train, *heldout])
    assert all(text.strip() for split in documents.values() for text in split.values())


def test_shakespeare_is_the_42_works(cache):
    documents = all_documents("shakespeare")
    texts = {**documents["train"], **documents["heldout"]}
    assert len(texts) == 42
    assert any("To be, or not to be" in text for text in texts.values())
    assert "hamlet" in texts and texts["hamlet"].startswith("HAMLET, PRINCE OF DENMARK")


def test_wiki_sample_is_prose(cache):
    documents = all_documents("wiki")
    texts = {**documents["train"], **documents["heldout"]}
    assert len(texts) == 101
    for title, text in texts.items():
        for markup in ("{{", "}}", "[[", "]]", "<ref", "{|", "'''", "=="):
            assert markup not in text, (title, markup)
    assert texts["Anarchism"].startswith("Anarchism is a political philosophy that advocates "
                                         "self-governed societies based on voluntary institutions.")
    assert sum(map(len, texts.values())) > 2_000_000


def test_strip_wiki_markup():
    markup = (
        "{{Infobox thing|name={{nowrap|X}}|size=3}}\n"
        "'''Foo''' is a [[bar (thing)|bar]] from [[Baz]]s<ref name=\"a\">Cite {{cite|x}}</ref>, "
        "{{lang|fr|très}} old.<ref name=\"b\" /> See [http://example.org the site].\n"
        "[[File:Foo.jpg|thumb|A [[bar]] picture.]]\n"
        "{| class=\"wikitable\"\n|-\n| cell || {{x}}\n|}\n"
        "== History ==\n"
        "* It was {{convert|5|km}} long.<!-- hidden -->\n"
        "== References ==\n{{reflist}}\n* Some book.\n"
        "=== Sub of references ===\nmore refs\n"
        "[[Category:Things]]\n[[de:Foo]]")
    assert strip_wiki_markup(markup) == (
        "Foo is a bar from Bazs, très old. See the site.\n\nHistory\n\nIt was 5 km long.")


def test_heldout_ids_needs_enough_documents():
    assert heldout_ids([f"doc{i}" for i in range(40)]) == heldout_ids([f"doc{i}" for i in range(39, -1, -1)])
    with pytest.raises(ValueError, match="too few"):
        heldout_ids(["a", "b", "c"])
    with pytest.raises(ValueError, match="unknown corpus"):
        corpora.corpus_builder("gutenberg")


# ---------------------------------------------------------------- packing


def test_pack_documents_round_trip(tokenizer):
    texts = ["To be, or not to be, that is the question.", "Anarchism is a political philosophy.",
             "Héllo wörld — ünïcode!"]
    packed = pack_documents(texts, tokenizer, seq_len=7)
    pieces = tokenize_documents(texts, tokenizer)
    expected = np.concatenate([pieces[0], [EOS], pieces[1], [EOS], pieces[2]])
    assert packed.tokens.dtype == np.int32 and packed.loss_mask.dtype == bool
    assert packed.tokens.shape == packed.loss_mask.shape == (-(-len(expected) // 7), 7)
    np.testing.assert_array_equal(packed.tokens[packed.loss_mask], expected)
    assert packed.loss_mask.ravel().tolist() == [True] * len(expected) + [False] * (
        packed.tokens.size - len(expected))
    assert decode(tokenizer, pieces[2]) == texts[2]


def test_pack_ids_separators_and_padding():
    packed = pack_ids([[5, 6], [], [7, EOS], [8], [9, 10, 11]], seq_len=4, separator=EOS, pad_id=0)
    # no separator after a sequence that already ends with it; empty sequences vanish
    np.testing.assert_array_equal(packed.tokens, [[5, 6, EOS, 7], [EOS, 8, EOS, 9], [10, 11, 0, 0]])
    np.testing.assert_array_equal(packed.loss_mask[-1], [True, True, False, False])
    exact = pack_ids([[1, 2, 3], [4, 5, 6, 7]], seq_len=4, separator=None)
    assert exact.tokens.tolist() == [[1, 2, 3, 4], [5, 6, 7, 0]] and exact.loss_mask.sum() == 7
    assert pack_ids([[1, 2], [3, 4]], seq_len=2, separator=None).loss_mask.all()
    with pytest.raises(ValueError, match="nothing to pack"):
        pack_ids([[], []], seq_len=4, separator=EOS)


# ---------------------------------------------------------------- iterator


def make_rows(count: int = 37, length: int = 3) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.arange(count * length, dtype=np.int32).reshape(count, length)
    return tokens, tokens % 5 != 0


def take(iterator: BatchIterator, count: int) -> list[dict[str, np.ndarray]]:
    return [iterator.next() for _ in range(count)]


def test_iterator_restores_mid_epoch():
    tokens, mask = make_rows()
    reference = take(BatchIterator(tokens, mask, 8, seed=3), 11)  # 4 batches per epoch
    first = BatchIterator(tokens, mask, 8, seed=3)
    take(first, 6)
    state = json.loads(json.dumps(first.get_state()))
    assert state["epoch"] == 1 and state["position"] == 2 and state["seed"] == 3
    resumed = BatchIterator(tokens, mask, 8, seed=0)
    resumed.set_state(state)
    for expected, got in zip(reference[6:], take(resumed, 5), strict=True):
        assert got["input_ids"].dtype == np.int32 and got["loss_mask"].dtype == bool
        np.testing.assert_array_equal(got["input_ids"], expected["input_ids"])
        np.testing.assert_array_equal(got["loss_mask"], expected["loss_mask"])


def test_iterator_hosts_slice_the_global_batch():
    tokens, mask = make_rows()
    single = take(BatchIterator(tokens, mask, 8, seed=1), 9)
    hosts = [take(BatchIterator(tokens, mask, 8, seed=1, process_index=i, process_count=2), 9)
             for i in range(2)]
    for step, batch in enumerate(single):
        assert hosts[0][step]["input_ids"].shape == (4, 3)
        for key in ("input_ids", "loss_mask"):
            np.testing.assert_array_equal(
                np.concatenate([hosts[0][step][key], hosts[1][step][key]]), batch[key])


def test_iterator_epochs_reshuffle_deterministically():
    tokens, mask = make_rows()
    rows = lambda batches: [int(r) // 3 for b in batches for r in b["input_ids"][:, 0]]
    first = rows(take(BatchIterator(tokens, mask, 8, seed=1), 8))
    epoch0, epoch1 = first[:32], first[32:]
    assert len(set(epoch0)) == len(set(epoch1)) == 32  # each row at most once per epoch
    assert epoch0 != epoch1 and sorted(epoch0) != list(range(32))
    assert rows(take(BatchIterator(tokens, mask, 8, seed=1), 8)) == first
    assert rows(take(BatchIterator(tokens, mask, 8, seed=2), 8)) != first


def test_iterator_refuses_bad_setups():
    tokens, mask = make_rows()
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        BatchIterator(tokens, mask, 8, seed=0, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        BatchIterator(tokens[:7], mask[:7], 8, seed=0)
    iterator = BatchIterator(tokens, mask, 8, seed=0)
    with pytest.raises(ValueError, match="num_sequences=36"):
        iterator.set_state({**iterator.get_state(), "num_sequences": 36})


# ---------------------------------------------------------------- self-generated data


def sampler_of(teacher, spec: SelfGeneratedSpec):
    """The teacher's self-generation as the trainer builds it for `spec`."""
    model, tokenizer = teacher
    return lambda: decoding.sampler(model, tokenizer, decoding.LMHeadRule(spec.sampling),
                                    spec.new_tokens)


def on_mesh(model, mesh_shape: tuple[int, int, int]):
    """`model` laid out on a mesh of the 8 devices by the rules, as the trainer places it."""
    from flax import nnx

    from spellm_jax import sharding

    mesh = sharding.make_mesh(mesh_shape)
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state, sharding.shardings_of(state, mesh))), mesh


def tiny_spec(num_samples: int, **overrides) -> SelfGeneratedSpec:
    # prompts of 20-24 tokens share one padded prompt length, hence one compilation
    settings = dict(corpora=("shakespeare",), num_samples=num_samples, prompt_tokens=(20, 24),
                    new_tokens=8, temperature=1.0, top_p=0.9, batch_size=2, seed=5)
    return SelfGeneratedSpec(**(settings | overrides))


def test_self_generated_resumes_and_is_deterministic(cache, teacher, tokenizer):
    two, four = tiny_spec(2), tiny_spec(4)
    assert shard_dir(two) == shard_dir(four)  # num_samples is not part of the key
    directory = generate_shards(two, tokenizer, sampler_of(teacher, two), progress=False)
    first_shard = directory / "part-00000.npz"
    written = first_shard.stat().st_mtime_ns
    assert self_generated_lib.num_shards(directory) == 1
    (directory / "part-00001.npz.123.tmp").write_bytes(b"half-written by a killed run")

    samples = load_self_generated(four, tokenizer, sampler_of(teacher, four),
                                  progress=False)  # continues with batch 1 only
    assert first_shard.stat().st_mtime_ns == written
    assert self_generated_lib.num_shards(directory) == 2 and len(samples) == 4
    assert [s.ids.tolist() for s in samples[:2]] == [s.ids.tolist() for s in read_samples(two)]
    assert [s.ids.tolist() for s in samples] == [s.ids.tolist() for s in read_samples(four)]

    def no_teacher():
        raise AssertionError("a finished set must be reused without the teacher")

    again = load_self_generated(four, tokenizer, no_teacher, progress=False)
    assert [s.ids.tolist() for s in again] == [s.ids.tolist() for s in samples]

    # A different seed gives other samples; the same seed regenerated from scratch the same ones.
    other_spec = tiny_spec(2, seed=6)
    other = load_self_generated(other_spec, tokenizer, sampler_of(teacher, other_spec),
                                progress=False)
    assert [s.ids.tolist() for s in other] != [s.ids.tolist() for s in samples[:2]]
    for path in directory.glob("part-*.npz"):
        path.unlink()
    generate_shards(four, tokenizer, sampler_of(teacher, four), progress=False)
    assert [s.ids.tolist() for s in read_samples(four)] == [s.ids.tolist() for s in samples]

    train = load_named_documents("shakespeare", "train")
    for sample in samples:
        assert 20 <= sample.prompt_length <= 24 and 0 < len(sample.ids) - sample.prompt_length <= 8
        corpus, doc_id = sample.doc_id.split("/")
        assert corpus == "shakespeare" and doc_id in train
        assert decode(tokenizer, sample.ids[:sample.prompt_length]) in train[doc_id]


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1)])
def test_sharded_generation_equals_one_device(cache, teacher, tokenizer, mesh_shape):
    spec = tiny_spec(16, batch_size=8)
    directory = generate_shards(spec, tokenizer, sampler_of(teacher, spec), progress=False)
    want = [s.ids.tolist() for s in read_samples(spec)]
    for path in directory.glob("part-*.npz"):
        path.unlink()
    model, mesh = on_mesh(teacher[0], mesh_shape)
    rule = decoding.LMHeadRule(spec.sampling)
    generate_shards(spec, tokenizer, lambda: decoding.sampler(model, tokenizer, rule,
                                                              spec.new_tokens, mesh),
                    progress=False)
    assert [s.ids.tolist() for s in read_samples(spec)] == want
    prompts = [[1, 2, 3]] * 3  # fewer rows than batch shards: every device holds them all
    assert decoding.generate(model, prompts, 4, rule, mesh=mesh).tokens == decoding.generate(
        teacher[0], prompts, 4, rule).tokens


def test_prompts_come_from_their_split_only(cache, tokenizer):
    documents = {split: load_named_documents("shakespeare", split) for split in corpora.SPLITS}
    prompts = sample_prompts(documents["train"], tokenizer, 40, (16, 32), np.random.default_rng(0))
    assert {len(p.ids) for p in prompts} <= set(range(16, 33)) and len({p.doc_id for p in prompts}) > 10
    for prompt in prompts:
        text = decode(tokenizer, prompt.ids)
        assert prompt.doc_id in documents["train"]
        assert documents["train"][prompt.doc_id][prompt.char_offset:].startswith(text)
    heldout_text = "\n".join(documents["heldout"].values())
    for ids in evaluation_prompts(["shakespeare"], tokenizer, 20, 24, seed=0):
        assert len(ids) == 24 and decode(tokenizer, ids) in heldout_text


def test_training_data_packs_cached_generations(cache, teacher, tokenizer):
    spec = tiny_spec(4)
    generate_shards(spec, tokenizer, sampler_of(teacher, spec), progress=False)  # or cached
    config = ml_collections.ConfigDict({
        "seed": spec.seed, "train": {"seq_len": 16, "batch_size": 1},
        "data": {"source": "self_generated", "corpora": spec.corpora, "num_samples": 4,
                 "prompt_tokens": spec.prompt_tokens, "new_tokens": 8, "temperature": 1.0,
                 "top_p": 0.9, "generation_batch": 2, "eval_prompts": 3, "lanes": 1}})
    data = training_data(config, tokenizer, spec.teacher,
                         lambda: pytest.fail("the generations are cached: no teacher is built"))
    expected = pack_ids([s.ids for s in read_samples(spec)], 16, EOS, tokenizer.pad_token_id)
    assert data.batches.global_batch_size == config.train.batch_size
    epoch = [data.batches.next() for _ in range(len(expected.tokens) // config.train.batch_size)]
    rows = np.concatenate([batch["input_ids"] for batch in epoch])
    masks = np.concatenate([batch["loss_mask"] for batch in epoch])
    order = np.lexsort(rows.T[::-1])  # one epoch: every packed row once, in a shuffled order
    expected_order = np.lexsort(expected.tokens.T[::-1])
    np.testing.assert_array_equal(rows[order], expected.tokens[expected_order])
    np.testing.assert_array_equal(masks[order], expected.loss_mask[expected_order])
    assert len(data.heldout_prompts) == 3
