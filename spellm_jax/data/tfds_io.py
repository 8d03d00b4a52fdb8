"""Writing and reading our tensorflow-datasets builders without TensorFlow (array_record files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from spellm_jax import assets

FILE_FORMAT = "array_record"  # the default tfrecord format needs TensorFlow to write


def tfds_data_dir() -> Path:
    """Where our tfds datasets are prepared: `<cache_dir>/tfds`."""
    return assets.cache_dir() / "tfds"


def read_split(builder: tfds.core.DatasetBuilder, split: str) -> list[dict[str, Any]]:
    """All examples of `split`, in generation order, preparing the dataset on first use."""
    if split not in builder.info.splits:
        builder.download_and_prepare(file_format=FILE_FORMAT)
    if split not in builder.info.splits:
        raise ValueError(f"{builder.name} has no split {split!r}; its splits are "
                         f"{sorted(builder.info.splits)}.")
    source = builder.as_data_source(split)
    return list(source.__getitems__(range(len(source)))) if len(source) else []


def decode_text(value: bytes | str) -> str:
    """A tfds `Text` feature as read from a data source (bytes) -> str."""
    return value.decode("utf-8") if isinstance(value, bytes) else value
