"""Run and output paths: local or cloud (`gs://`), one way of making them."""

from __future__ import annotations

import importlib.util
import os

from etils import epath


def as_path(path: str | os.PathLike) -> epath.Path:
    """A local or cloud (`gs://`) path; local paths are made absolute, as Orbax needs. Cloud paths
    need `gcsfs` (installed on TPU VMs by `launch/run_on_tpu.sh`). An `epath.Path` is returned
    as it is (it may stand on any filesystem fsspec knows)."""
    if isinstance(path, epath.Path):
        return path
    text = os.fspath(path)
    if text.startswith("gs://") and importlib.util.find_spec("gcsfs") is None:
        raise FileNotFoundError(f"{text}: gs:// paths need gcsfs; `pip install gcsfs "
                                "google-cloud-storage` (launch/run_on_tpu.sh does on TPU VMs).")
    return epath.Path(text if "://" in text else os.path.abspath(os.path.expanduser(text)))
