"""The self-distillation data of the method: the teacher's own continuations of corpus prompts.

Samples are generated batch by batch and each batch is written as one shard,
`<cache_dir>/self_generated/<key>/part-NNNNN.npz`. The key hashes every setting except
`num_samples`, and batch `b` depends only on the spec and `b`, so an interrupted run continues
where it stopped, a larger `num_samples` extends an existing set, and a finished set is reused as
it is. Prompts come from the corpus split the spec names (`train` for training data; `heldout`
only for evaluation sets).

A tensorflow-datasets builder (`SelfGenerated`, array_record) exposes a finished set like the
corpora; the shards stay the resumable store it is built from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from spellm_jax import assets
from spellm_jax.data import corpora, sources, tfds_io
from spellm_jax.sampling import Sampling

FORMAT_VERSION = 1  # bump when the sampling procedure or the shard layout changes
_WORD_START = re.compile(r"\s\S")
_CHARS_PER_TOKEN_BOUND = 16  # a text window this many chars per wanted token holds enough tokens

# The teacher's continuations of a batch of prompts (token ids), sampled with a seed.
Sampler = Callable[[list[list[int]], int], list[list[int]]]


@dataclasses.dataclass(frozen=True)
class SelfGeneratedSpec:
    """What to generate: `num_samples` continuations of `new_tokens` sampled from the `teacher`
    (temperature, top-k, top-p) after prompts of `prompt_tokens` (an inclusive range, or one
    length) taken at random places of the `split` documents of `corpora`."""

    teacher: str = "smollm2"
    corpora: tuple[str, ...] = ("shakespeare", "wiki")
    split: str = "train"
    num_samples: int = 256
    prompt_tokens: tuple[int, int] = (16, 32)
    new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        prompt = self.prompt_tokens
        prompt = (prompt, prompt) if isinstance(prompt, int) else tuple(int(n) for n in prompt)
        object.__setattr__(self, "prompt_tokens", prompt)
        object.__setattr__(self, "corpora", tuple(self.corpora))
        unknown = [name for name in self.corpora if name not in corpora.CORPORA]
        if not self.corpora or unknown:
            raise ValueError(f"corpora={self.corpora}: the teacher's generations take their "
                             f"prompts from the built-in corpora ({', '.join(corpora.CORPORA)}); "
                             "other sources stream with data.source=corpus.")
        if self.split not in corpora.SPLITS:
            raise ValueError(f"split={self.split!r}: choose from {', '.join(corpora.SPLITS)}.")
        if len(prompt) != 2 or not 1 <= prompt[0] <= prompt[1]:
            raise ValueError(f"prompt_tokens={self.prompt_tokens}: need 1 <= min <= max.")
        if min(self.num_samples, self.new_tokens, self.batch_size) < 1:
            raise ValueError("num_samples, new_tokens and batch_size must all be at least 1.")
        self.sampling  # noqa: B018 (validates the sampling settings)

    @property
    def sampling(self) -> Sampling:
        """How the teacher samples its continuations."""
        return Sampling(self.temperature, self.top_k, self.top_p)

    @property
    def num_batches(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def key_fields(self) -> dict[str, Any]:
        """Everything the samples depend on (not `num_samples`: sets of any size share shards)."""
        fields = dataclasses.asdict(self)
        del fields["num_samples"]
        fields["prompt_tokens"] = list(self.prompt_tokens)
        fields["corpora"] = {name: str(corpora.CORPORA[name].VERSION) for name in self.corpora}
        fields["format_version"] = FORMAT_VERSION
        return fields

    def cache_key(self) -> str:
        text = json.dumps(self.key_fields(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class Prompt(NamedTuple):
    ids: list[int]
    doc_id: str  # "<corpus>/<doc_id>"
    char_offset: int  # where in the document the prompt's text starts


class Sample(NamedTuple):
    """One generated sample: `ids` = prompt ids + continuation ids."""

    ids: np.ndarray  # int32
    prompt_length: int
    doc_id: str


def shard_dir(spec: SelfGeneratedSpec) -> Path:
    """`<cache_dir>/self_generated/<spec.cache_key()>`."""
    return assets.cache_dir() / "self_generated" / spec.cache_key()


def _shard_path(directory: Path, batch: int) -> Path:
    return directory / f"part-{batch:05d}.npz"


def num_shards(directory: Path) -> int:
    """How many consecutive shards (from part-00000) exist: the batches already generated."""
    count = 0
    while _shard_path(directory, count).exists():
        count += 1
    return count


def sample_prompts(documents: Mapping[str, str], tokenizer: Any, count: int,
                   prompt_tokens: tuple[int, int], rng: np.random.Generator) -> list[Prompt]:
    """`count` prompts, each the first n tokens (n uniform in `prompt_tokens`) of the text from a
    word start at a uniformly random character of `documents` (documents weighted by length)."""
    doc_ids = list(documents)
    if not doc_ids:
        raise ValueError("no documents to take prompts from.")
    lengths = np.array([len(documents[doc_id]) for doc_id in doc_ids], np.float64)
    weights = lengths / lengths.sum()
    prompts: list[Prompt] = []
    for _ in range(count):
        for _attempt in range(100):
            length = int(rng.integers(prompt_tokens[0], prompt_tokens[1] + 1))
            doc_id = doc_ids[rng.choice(len(doc_ids), p=weights)]
            text = documents[doc_id]
            window = length * _CHARS_PER_TOKEN_BOUND
            offset = int(rng.integers(0, max(1, len(text) - window)))
            word = _WORD_START.search(text, offset) if offset else None
            start = word.start() + 1 if word else 0
            ids = tokenizer(text[start:start + window], add_special_tokens=False)["input_ids"][:length]
            if len(ids) >= prompt_tokens[0]:
                prompts.append(Prompt(list(ids), doc_id, start))
                break
        else:
            raise ValueError(f"could not find a prompt of {prompt_tokens[0]} tokens in 100 tries; "
                             "the documents are too short for this prompt length.")
    return prompts


def _batch_rng(spec: SelfGeneratedSpec, batch: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, batch])


def _write_shard(path: Path, prompts: Sequence[Prompt], continuations: Sequence[Sequence[int]]
                 ) -> None:
    """One batch as flat ids + per-sample lengths, written atomically (temp file, then rename)."""
    samples = [prompt.ids + list(continuation)
               for prompt, continuation in zip(prompts, continuations, strict=True)]
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # hosts may share the directory
    with temporary.open("wb") as handle:
        np.savez(handle, ids=np.concatenate([np.asarray(s, np.int32) for s in samples]),
                 lengths=np.array([len(s) for s in samples], np.int32),
                 prompt_lengths=np.array([len(p.ids) for p in prompts], np.int32),
                 doc_ids=np.array([p.doc_id for p in prompts]),
                 char_offsets=np.array([p.char_offset for p in prompts], np.int64))
    os.replace(temporary, path)


def read_shard(path: Path) -> list[Sample]:
    """The samples of one shard, in generation order."""
    with np.load(path) as shard:
        pieces = np.split(shard["ids"], np.cumsum(shard["lengths"])[:-1])
        return [Sample(ids, int(prompt_length), str(doc_id)) for ids, prompt_length, doc_id
                in zip(pieces, shard["prompt_lengths"], shard["doc_ids"], strict=True)]


def _missing_batches(spec: SelfGeneratedSpec, directory: Path, process_count: int) -> list[int]:
    """The batches some host lacks: every host must take part in generating each of them."""
    lacking = np.array([not _shard_path(directory, b).exists() for b in range(spec.num_batches)])
    if process_count > 1:
        from jax.experimental import multihost_utils

        lacking = np.asarray(multihost_utils.process_allgather(lacking)).any(0)
    return [int(b) for b in np.flatnonzero(lacking)]


def generate_shards(spec: SelfGeneratedSpec, tokenizer: Any, sampler: Callable[[], Sampler],
                    progress: bool = True, process_index: int = 0, process_count: int = 1
                    ) -> Path:
    """Generates the batches of `spec` that are missing and returns the shard directory.

    `sampler()` gives the teacher's `Sampler`; it is called only if something is left to
    generate, and must sample from the model that `spec.teacher` names with the spec's settings:
    the cache is keyed by them. On several hosts every host calls this: each batch is generated
    once by all of them together (the sampler splits it over the mesh), and host `b % count`
    writes shard b; a host whose cache directory is not shared with that host's writes its own
    copy, so every host ends with every shard.
    """
    directory = shard_dir(spec)
    directory.mkdir(parents=True, exist_ok=True)
    if process_index == 0:
        (directory / "spec.json").write_text(json.dumps(spec.key_fields(), indent=2,
                                                        sort_keys=True))
    missing = _missing_batches(spec, directory, process_count)
    if not missing:
        return directory
    continue_prompts = sampler()
    documents = corpora.load_corpora(spec.corpora, spec.split)
    bar = tqdm.tqdm(missing, initial=spec.num_batches - len(missing), total=spec.num_batches,
                    unit="batch", desc=f"teacher generations ({directory.name})",
                    disable=not progress or process_index != 0)
    started, new_tokens = time.perf_counter(), 0
    for batch in bar:
        rng = _batch_rng(spec, batch)
        prompts = sample_prompts(documents, tokenizer, spec.batch_size, spec.prompt_tokens, rng)
        continuations = continue_prompts([p.ids for p in prompts], int(rng.integers(2**31)))
        path = _shard_path(directory, batch)
        if batch % process_count == process_index:
            _write_shard(path, prompts, continuations)
        if process_count > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"self_generated shard {batch}")
            if not path.exists():  # not a store shared with the writer
                _write_shard(path, prompts, continuations)
        new_tokens += sum(map(len, continuations))
        bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - started):.0f}")
    return directory


def read_samples(spec: SelfGeneratedSpec) -> list[Sample]:
    """The first `spec.num_samples` samples from the shards (which must all exist)."""
    directory = shard_dir(spec)
    if num_shards(directory) < spec.num_batches:
        raise FileNotFoundError(f"{directory} holds {num_shards(directory)} of the {spec.num_batches} "
                                "shards of this spec; run generate_shards(spec) first.")
    samples = [sample for batch in range(spec.num_batches)
               for sample in read_shard(_shard_path(directory, batch))]
    return samples[:spec.num_samples]


class SelfGenerated(tfds.core.GeneratorBasedBuilder):
    """Teacher generations of one `SelfGeneratedSpec` (one split, named after the spec's prompt
    split), built from its finished shards into `<shard dir>/tfds/<num_samples>/`."""

    name = "spellm_self_generated"
    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, spec: SelfGeneratedSpec, **kwargs: Any) -> None:
        self.spec = spec
        kwargs.setdefault("data_dir", str(shard_dir(spec) / "tfds" / str(spec.num_samples)))
        kwargs.setdefault("file_format", tfds_io.FILE_FORMAT)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({
            "ids": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "prompt_length": tfds.features.Scalar(dtype=np.int32),
            "doc_id": tfds.features.Text()})
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=features,
                                     disable_shuffling=True,
                                     metadata=tfds.core.MetadataDict(spec=self.spec.key_fields()))

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        return {self.spec.split: self._generate_examples(read_samples(self.spec))}

    def _generate_examples(self, samples: Sequence[Sample]) -> Iterator[tuple[int, dict[str, Any]]]:
        for index, sample in enumerate(samples):
            yield index, {"ids": sample.ids, "prompt_length": sample.prompt_length,
                          "doc_id": sample.doc_id}


def load_self_generated(spec: SelfGeneratedSpec, tokenizer: Any, sampler: Callable[[], Sampler],
                        progress: bool = True, process_index: int = 0, process_count: int = 1
                        ) -> list[Sample]:
    """The samples of `spec`: generated where missing (resumable, see `generate_shards`), then
    read through the `SelfGenerated` tfds builder (prepared by process 0 before the others
    look, as hosts may share the store)."""
    generate_shards(spec, tokenizer, sampler, progress, process_index, process_count)
    examples = tfds_io.read_split(SelfGenerated(spec=spec), spec.split) if process_index == 0 \
        else None
    if process_count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("self_generated prepared")
    if examples is None:
        examples = tfds_io.read_split(SelfGenerated(spec=spec), spec.split)
    return [Sample(np.asarray(ex["ids"], np.int32), int(ex["prompt_length"]),
                   tfds_io.decode_text(ex["doc_id"])) for ex in examples]


def evaluation_prompts(corpus_names: Sequence[str], tokenizer: Any, count: int,
                       prompt_tokens: int | tuple[int, int], seed: int = 0) -> list[list[int]]:
    """`count` prompts from the `heldout` split of the corpora (never train), for evaluation."""
    if isinstance(prompt_tokens, int):
        prompt_tokens = (prompt_tokens, prompt_tokens)
    documents = sources.read_documents(corpus_names, "heldout")
    rng = np.random.default_rng([seed, 0x4E1D])
    return [p.ids for p in sample_prompts(documents, tokenizer, count, prompt_tokens, rng)]
