"""Training text from anywhere (spellm_jax.data.sources) streamed per host (data.stream): every
source kind, mixture weights, held-out disjointness, per-host disjointness and exact resume."""

import gzip
import json
import os
import sys

import numpy as np
import pytest

from spellm_jax.data import sources
from spellm_jax.data.stream import DocumentSource, SourceLanes, StreamedBatches


def words(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    vocabulary = ["the", "river", "stone", "quietly", "ran", "under", "a", "bridge", "of", "light"]
    return " ".join(rng.choice(vocabulary, size=n))


def write_jsonl(path, count: int, first: int = 0, key: str = "text") -> dict[str, str]:
    texts = {f"doc{i}": f"Document {i}: {words(20 + i % 7, i)}." for i in range(first, first + count)}
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as file:
        for doc_id, text in texts.items():
            file.write(json.dumps({"id": doc_id, key: text}) + "\n")
    return texts


def batches_for(entries, tokenizer, process_index=0, process_count=1, batch=4, seq_len=16,
                lanes=2, seed=0) -> StreamedBatches:
    specs = [sources.parse_source(entry) for entry in entries]
    row_sources = [DocumentSource(entry, spec.weight, SourceLanes(spec, batch * lanes, seed, i))
                   for i, (entry, spec) in enumerate(zip(entries, specs, strict=True))]
    return StreamedBatches(row_sources, tokenizer, seq_len, batch, lanes, seed, process_index,
                           process_count)


def first_epoch(source: SourceLanes, lane: int) -> list[str]:
    ids = []
    for position, doc_id, _ in source.read(lane, None):
        if position[0] >= (len(source.in_memory) if source.in_memory is not None else 1):
            return ids
        ids.append(doc_id)
    return ids


def train_texts(entry: str) -> list[str]:
    return [text for _, text in sources.split_documents(sources.parse_source(entry), "train")]


def test_entries_parse_and_bad_ones_name_the_fix(tmp_path):
    spec = sources.parse_source("gs://bucket/c4/*.jsonl.gz?weight=2.5&text_key=content")
    assert (spec.kind, spec.target, spec.weight, spec.text_key) == (
        "jsonl", "gs://bucket/c4/*.jsonl.gz", 2.5, "content")
    assert sources.parse_source("tfds:huggingface:wikitext/wikitext-2-raw-v1:1.0.0").target == \
        "huggingface:wikitext/wikitext-2-raw-v1:1.0.0"
    assert sources.parse_source("shakespeare").kind == "builtin"
    with pytest.raises(ValueError, match=r"unknown option.*text_field.*the options are"):
        sources.parse_source("a.jsonl?text_field=body")
    with pytest.raises(ValueError, match=r"not a built-in corpus.*tfds:NAME"):
        sources.parse_source("corpus.csv")
    with pytest.raises(ValueError, match="weights must be > 0"):
        sources.parse_source("a.txt?weight=0")
    with pytest.raises(FileNotFoundError, match="no file matches"):
        sources.shards(sources.parse_source(f"{tmp_path}/*.jsonl"), "train")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(KeyError, match=r"no 'text' field.*set the source's text_key"):
        train_texts(f"{tmp_path}/bad.jsonl?heldout=0.0001")
    with pytest.raises(FileNotFoundError, match="Prepare it first in array_record format"):
        sources.shards(sources.parse_source(f"tfds:no_such_dataset_xyz?data_dir={tmp_path}"),
                       "train")


def test_local_files_of_every_kind(tmp_path):
    expected = write_jsonl(tmp_path / "a.jsonl", 30) | write_jsonl(tmp_path / "b.jsonl.gz", 30, 30)
    read = {doc_id: text for entry in (f"{tmp_path}/*.jsonl?id_key=id",
                                       f"{tmp_path}/*.jsonl.gz?id_key=id")
            for split in ("train", "heldout")
            for doc_id, text in sources.split_documents(sources.parse_source(entry), split)}
    assert read == expected
    (tmp_path / "one.txt").write_text("First block.\n\nSecond block,\nstill second.\n\n\nThird.")
    assert train_texts(f"{tmp_path}/one.txt?heldout=0.0001") == [
        "First block.\n\nSecond block,\nstill second.\n\n\nThird."]
    assert train_texts(f"{tmp_path}/one.txt?blocks=blank_line&heldout=0.0001") == [
        "First block.", "Second block,\nstill second.", "Third."]
    from array_record.python import array_record_module

    for name, records in (("plain", [b"alpha beta", "gamma \u00e9".encode()]),
                          ("json", [json.dumps({"body": "delta"}).encode()])):
        writer = array_record_module.ArrayRecordWriter(str(tmp_path / f"{name}.array_record"),
                                                       "group_size:1")
        for record in records:
            writer.write(record)
        writer.close()
    assert train_texts(f"{tmp_path}/plain.array_record?heldout=0.0001") == ["alpha beta",
                                                                             "gamma \u00e9"]
    assert train_texts(f"{tmp_path}/json.array_record?record=json&text_key=body&heldout=0.0001"
                       ) == ["delta"]


def test_a_tfds_dataset_registered_here(tmp_path):
    import tensorflow_datasets as tfds

    class SpellmTestStories(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"story": tfds.features.Text()}), disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(40)}

        def _generate_examples(self, count):
            for i in range(count):
                yield i, {"story": f"Story {i}: {words(12, i)}"}

    SpellmTestStories(data_dir=str(tmp_path)).download_and_prepare(file_format="array_record")
    entry = f"tfds:spellm_test_stories:1.0.0?text_key=story&data_dir={tmp_path}"
    texts = train_texts(entry) + [t for _, t in sources.split_documents(
        sources.parse_source(entry), "heldout")]
    assert sorted(texts) == sorted(f"Story {i}: {words(12, i)}" for i in range(40))


def test_gs_paths_read_through_epath(monkeypatch):
    """fsspec's in-memory filesystem stands in for gcsfs."""
    from etils import epath
    from fsspec.implementations.memory import MemoryFileSystem

    monkeypatch.setitem(sys.modules["fsspec.registry"]._registry, "gcs", MemoryFileSystem)
    monkeypatch.setitem(sys.modules["fsspec.registry"]._registry, "gs", MemoryFileSystem)
    bucket = f"gs://spellm-sources-{os.getpid()}"
    for name, lines in (("x/part-0.jsonl", ["one", "two"]), ("x/part-1.jsonl", ["three"])):
        with epath.Path(f"{bucket}/{name}").open("w") as file:
            file.writelines(json.dumps({"text": line}) + "\n" for line in lines)
    assert sorted(train_texts(f"{bucket}/x/*.jsonl?heldout=0.0001")) == ["one", "three", "two"]


def test_held_out_documents_never_reach_training(tmp_path, smollm2_tokenizer):
    texts = write_jsonl(tmp_path / "c.jsonl", 200)
    entry = f"{tmp_path}/c.jsonl?id_key=id&heldout=0.2"
    heldout = dict(sources.split_documents(sources.parse_source(entry), "heldout"))
    assert 20 <= len(heldout) <= 60 and set(heldout) < set(texts)
    assert sources.read_documents([entry], "heldout").keys() == {
        f"{tmp_path}/c.jsonl/{doc_id}" for doc_id in heldout}
    batches = batches_for([entry], smollm2_tokenizer, batch=1, lanes=1, seq_len=64)
    streamed = smollm2_tokenizer.decode(np.concatenate(
        [batches.next()["input_ids"].ravel() for _ in range(60)]))
    seen = {doc_id for doc_id, text in texts.items() if f"Document {doc_id[3:]}:" in streamed}
    assert len(seen) > 100 and not seen & set(heldout)


def test_lanes_split_the_documents_and_any_host_count_makes_the_same_batches(
        tmp_path, smollm2_tokenizer):
    for part in range(8):
        write_jsonl(tmp_path / f"p{part}.jsonl", 10, 10 * part)
    entry = f"{tmp_path}/p*.jsonl?id_key=id&heldout=0.0001"
    spec = sources.parse_source(entry)
    for num_lanes in (4, 16):  # 4: each lane reads whole files; 16: every 16th document
        source = SourceLanes(spec, num_lanes, 0, 0)
        assert (source.in_memory is None) == (num_lanes <= 8)
        read = [first_epoch(source, lane) for lane in range(num_lanes)]
        assert sum(map(len, read)) == len(set().union(*read)) == 80
    single = batches_for([entry], smollm2_tokenizer)  # 8 lanes: 2 per slot of a batch of 4
    expected = [single.next()["input_ids"] for _ in range(30)]
    hosts = [batches_for([entry], smollm2_tokenizer, p, 2) for p in range(2)]
    for want in expected[:12]:
        got = np.concatenate([host.next()["input_ids"] for host in hosts])
        np.testing.assert_array_equal(got, want)
    state = json.loads(json.dumps(single_state(entry, smollm2_tokenizer, 12)))
    for count in (1, 2):  # the checkpoint of one host resumes on one or two
        resumed = [batches_for([entry], smollm2_tokenizer, p, count) for p in range(count)]
        for host in resumed:
            host.set_state(state)
        for want in expected[12:]:
            np.testing.assert_array_equal(
                np.concatenate([host.next()["input_ids"] for host in resumed]), want)
    with pytest.raises(ValueError, match=r"lanes=2, this run has 3.*same data.corpora, data.lanes"):
        batches_for([entry], smollm2_tokenizer, lanes=3).set_state(state)
    with pytest.raises(ValueError, match="older in-memory corpus reader"):
        single.set_state({"epoch": 0, "position": 3, "seed": 0})


def single_state(entry, tokenizer, steps):
    batches = batches_for([entry], tokenizer)
    for _ in range(steps):
        batches.next()
    return batches.get_state()


def test_rows_follow_the_mixture_weights(tmp_path, smollm2_tokenizer):
    write_jsonl(tmp_path / "a.jsonl", 50)  # lower-case words
    (tmp_path / "b.txt").write_text("\n\n".join(words(30, i).upper() for i in range(50)))
    entries = [f"{tmp_path}/a.jsonl?weight=3&heldout=0.0001",
               f"{tmp_path}/b.txt?blocks=blank_line&heldout=0.0001"]
    batches = batches_for(entries, smollm2_tokenizer, batch=8)
    chosen = np.concatenate([batches.source_of_rows(step) for step in range(200)])
    assert abs((chosen == 0).mean() - 0.75) < 4 * np.sqrt(0.75 * 0.25 / chosen.size)
    for step in range(3):
        rows = batches.next()["input_ids"]
        for source, row in zip(batches.source_of_rows(step), rows, strict=True):
            text = smollm2_tokenizer.decode(row, skip_special_tokens=True)
            assert any(c.islower() for c in text) == (source == 0), text
