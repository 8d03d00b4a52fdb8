"""Where training text comes from: one `data.corpora` entry per source, read lazily in shards.

An entry is `TARGET[?option=value&...]`:
  shakespeare, wiki                      the built-in corpora (their own train/heldout split)
  tfds:NAME[/CONFIG][:VERSION]           any prepared TFDS dataset (array_record, read through
                                         `tfds.data_source`, no TensorFlow), `huggingface:` too
  PATH or GLOB (local or gs://)          .txt, .jsonl, .jsonl.gz or .array_record files
Options: `weight` (mixture weight, default 1), `split` (TFDS split, default train), `text_key`
(the text feature or JSON field, default text), `id_key` (a document-id field; default the
position), `blocks` (.txt: `file`, one document per file, or `blank_line`, one per
blank-line-separated block), `record` (.array_record: `text`, UTF-8 records, or `json`),
`heldout` (the share of documents held out for evaluation, by a hash of their id; default
0.01), `data_dir` (TFDS).

Every source is a list of shards (a file, or a range of records of a random-access source) that
read their documents from any position, so a reader holds one document at a time and resumes at
`(shard, document)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import gzip
import hashlib
import io
import json
import re
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from spellm_jax.data import corpora, tfds_io
from spellm_jax.paths import as_path

KINDS = ("builtin", "tfds", "txt", "jsonl", "array_record")
OPTIONS = ("weight", "split", "text_key", "id_key", "blocks", "record", "heldout", "data_dir")
RECORDS_PER_SHARD = 1024  # documents per shard of a random-access source
SAMPLE_CHARS = 4_000_000  # text read per source (beyond the built-ins) for prompts
_SUFFIXES = ((".jsonl.gz", "jsonl"), (".jsonl", "jsonl"), (".txt", "txt"),
             (".array_record", "array_record"))
_BLANK_LINES = re.compile(r"\n\s*\n")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One parsed `data.corpora` entry."""

    entry: str
    kind: str
    target: str  # corpus name, TFDS name, or path / glob
    weight: float = 1.0
    split: str = "train"
    text_key: str = "text"
    id_key: str = ""
    blocks: str = "file"
    record: str = "text"
    heldout: float = 0.01
    data_dir: str = ""

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"{self.entry}: weight={self.weight}; mixture weights must be > 0.")
        if not 0 < self.heldout < 1:
            raise ValueError(f"{self.entry}: heldout={self.heldout}; give a share in (0, 1).")
        if self.blocks not in ("file", "blank_line"):
            raise ValueError(f"{self.entry}: blocks={self.blocks!r}; choose file or blank_line.")
        if self.record not in ("text", "json"):
            raise ValueError(f"{self.entry}: record={self.record!r}; choose text or json.")


def parse_source(entry: str) -> SourceSpec:
    """The `SourceSpec` of one `data.corpora` entry (see the module docstring)."""
    target, _, query = entry.partition("?")
    options = dict(urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    if unknown := sorted(set(options) - set(OPTIONS)):
        raise ValueError(f"{entry}: unknown option(s) {', '.join(unknown)}; the options are "
                         f"{', '.join(OPTIONS)}.")
    fields: dict[str, Any] = dict(options)
    for name in ("weight", "heldout"):
        if name in fields:
            fields[name] = float(fields[name])
    if target in corpora.CORPORA:
        kind = "builtin"
    elif target.startswith("tfds:"):
        kind, target = "tfds", target.removeprefix("tfds:")
    else:
        kind = next((kind for suffix, kind in _SUFFIXES if target.endswith(suffix)), None)
        if kind is None:
            raise ValueError(
                f"data.corpora entry {entry!r} is not a built-in corpus "
                f"({', '.join(corpora.CORPORA)}), a tfds:NAME dataset, or a path ending in "
                f"{', '.join(suffix for suffix, _ in _SUFFIXES)}.")
    return SourceSpec(entry=entry, kind=kind, target=target, **fields)


def is_heldout(doc_id: str, share: float) -> bool:
    """Whether a document is held out: its id's SHA-1, as a fraction of 2^32, is below `share`.
    Depends only on the id, so train and held-out stay disjoint on every host and every run."""
    return int(hashlib.sha1(doc_id.encode()).hexdigest()[:8], 16) < share * 2 ** 32


class Shard(Protocol):
    """Part of a source that can be read from any of its documents on."""

    name: str

    def documents(self, start: int = 0) -> Iterator[tuple[str, str]]:
        """`(doc_id, text)` of the shard's documents from document `start` on."""
        ...


@dataclasses.dataclass(frozen=True)
class RecordShard:
    """Records `[start, stop)` of a random-access source (a TFDS or array_record data source)."""

    name: str
    open: Callable[[], Any]  # -> the data source (opened lazily, once per read)
    start: int
    stop: int
    decode: Callable[[int, Any], tuple[str, str]]  # (index, record) -> (doc_id, text)

    def documents(self, start: int = 0) -> Iterator[tuple[str, str]]:
        source = self.open()
        for index in range(self.start + start, self.stop):
            yield self.decode(index, source[index])


@dataclasses.dataclass(frozen=True)
class TextFileShard:
    """A `.txt` file: one document, or one per blank-line-separated block."""

    name: str
    blocks: str

    def documents(self, start: int = 0) -> Iterator[tuple[str, str]]:
        text = as_path(self.name).read_text(encoding="utf-8")
        if self.blocks == "file":
            pieces = [text]
        else:
            pieces = [block for block in _BLANK_LINES.split(text) if block.strip()]
        for number in range(start, len(pieces)):
            yield (self.name if self.blocks == "file" else f"{self.name}#{number}"), pieces[number]


@dataclasses.dataclass(frozen=True)
class JsonlShard:
    """A `.jsonl` or `.jsonl.gz` file, one JSON object per line."""

    name: str
    text_key: str
    id_key: str

    def documents(self, start: int = 0) -> Iterator[tuple[str, str]]:
        with (as_path(self.name).open("rb") as raw,
              gzip.open(raw) if self.name.endswith(".gz") else contextlib.nullcontext(raw)
              as stream):
            for number, line in enumerate(io.TextIOWrapper(stream, encoding="utf-8")):
                if number >= start:
                    yield _document(json.loads(line), self.text_key, self.id_key,
                                    f"{self.name}:{number}", self.name)


def _document(record: dict, text_key: str, id_key: str, default_id: str, where: str
              ) -> tuple[str, str]:
    if text_key not in record:
        raise KeyError(f"{where}: a record has no {text_key!r} field (it has "
                       f"{', '.join(sorted(record))}); set the source's text_key=.")
    return (str(record[id_key]) if id_key else default_id), tfds_io.decode_text(record[text_key])


def _record_shards(name: str, length: int, open_source: Callable[[], Any],
                   decode: Callable[[int, Any], tuple[str, str]]) -> list[Shard]:
    return [RecordShard(f"{name}[{start}:{min(start + RECORDS_PER_SHARD, length)}]", open_source,
                        start, min(start + RECORDS_PER_SHARD, length), decode)
            for start in range(0, length, RECORDS_PER_SHARD)]


def _files(pattern: str) -> list[str]:
    """The files a path or glob names, sorted (local or gs://; wildcards in any component are
    matched against directory listings, which every filesystem gives alike)."""
    head, _, tail = pattern.rpartition("://")
    components = tail.split("/")
    wild = next((i for i, part in enumerate(components) if any(c in part for c in "*?[")), None)
    if wild is None:
        if not as_path(pattern).exists():
            raise FileNotFoundError(f"{pattern}: no such file (a data.corpora entry).")
        return [str(as_path(pattern))]
    base = "/".join(components[:wild]) or "."
    paths = [as_path(f"{head}://{base}" if head else base)]
    for part in components[wild:]:
        if any(c in part for c in "*?["):
            paths = [child for path in paths if path.is_dir() for child in path.iterdir()
                     if fnmatch.fnmatchcase(child.name, part)]
        else:
            paths = [path / part for path in paths]
    matches = sorted(str(path) for path in paths if path.is_file())
    if not matches:
        raise FileNotFoundError(f"{pattern}: no file matches this data.corpora entry.")
    return matches


def _tfds_source(spec: SourceSpec):
    import tensorflow_datasets as tfds

    def open_source():
        return tfds.data_source(spec.target, split=spec.split, data_dir=spec.data_dir or None,
                                download=False)

    try:
        source = open_source()
    except Exception as error:  # tfds raises several kinds for a dataset that is not there
        raise FileNotFoundError(
            f"{spec.entry}: TFDS could not open {spec.target!r} split {spec.split!r} ({error}). "
            "Prepare it first in array_record format (`tfds build NAME --file_format="
            "array_record`, or builder.download_and_prepare(file_format='array_record')) and "
            "pass its data_dir= if it is not TFDS's default.") from error
    return source, open_source


def shards(spec: SourceSpec, split: str) -> list[Shard]:
    """The shards of a source that hold its `split` documents (built-in corpora have their own
    splits; every other source's shards hold both, `in_split` tells them apart)."""
    if spec.kind == "builtin":
        builder = corpora.corpus_builder(spec.target)
        tfds_io.read_split(builder, split)  # prepares the corpus on first use

        def open_builtin():
            return builder.as_data_source(split)

        def decode_builtin(_, record):
            return tfds_io.decode_text(record["doc_id"]), tfds_io.decode_text(record["text"])

        return _record_shards(spec.target, len(open_builtin()), open_builtin, decode_builtin)
    if spec.kind == "tfds":
        source, open_source = _tfds_source(spec)

        def decode_tfds(index, record):
            return _document(record, spec.text_key, spec.id_key, f"{spec.target}/{spec.split}/"
                             f"{index}", spec.entry)

        return _record_shards(spec.target, len(source), open_source, decode_tfds)
    files = _files(spec.target)
    if spec.kind == "txt":
        return [TextFileShard(name, spec.blocks) for name in files]
    if spec.kind == "jsonl":
        return [JsonlShard(name, spec.text_key, spec.id_key) for name in files]
    from array_record.python import array_record_data_source

    def open_records():
        return array_record_data_source.ArrayRecordDataSource(files)

    def decode_record(index, record):
        if spec.record == "json":
            return _document(json.loads(record), spec.text_key, spec.id_key,
                             f"{spec.target}:{index}", spec.entry)
        return f"{spec.target}:{index}", record.decode("utf-8")

    return _record_shards(spec.target, len(open_records()), open_records, decode_record)


def in_split(spec: SourceSpec, doc_id: str, split: str) -> bool:
    """Whether a document read from `shards(spec, split)` belongs to `split`."""
    if split not in corpora.SPLITS:
        raise ValueError(f"unknown split {split!r}; sources have the splits "
                         f"{', '.join(corpora.SPLITS)}.")
    return spec.kind == "builtin" or is_heldout(doc_id, spec.heldout) == (split == "heldout")


def split_documents(spec: SourceSpec, split: str) -> Iterator[tuple[str, str]]:
    """`(doc_id, text)` of a source's `split` documents, in shard order."""
    for shard in shards(spec, split):
        for doc_id, text in shard.documents():
            if in_split(spec, doc_id, split):
                yield doc_id, text


def read_documents(entries: Sequence[str], split: str, max_chars: int | None = SAMPLE_CHARS
                   ) -> dict[str, str]:
    """`{"<target>/<doc_id>": text}` of the `split` documents of several sources, in shard
    order; each source other than a built-in corpus stops after `max_chars` characters (prompts
    for evaluation or generation need a sample, not the corpus)."""
    documents: dict[str, str] = {}
    for entry in entries:
        spec, chars = parse_source(entry), 0
        for doc_id, text in split_documents(spec, split):
            documents[f"{spec.target}/{doc_id}"] = text
            chars += len(text)
            if spec.kind != "builtin" and max_chars is not None and chars >= max_chars:
                break
        if not chars:
            raise ValueError(f"{entry}: no {split} documents (a held-out share of {spec.heldout} "
                             "of too few documents?).")
    return documents
