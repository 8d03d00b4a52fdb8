"""Run and output paths: local or cloud (`gs://`), one way of making them."""

from __future__ import annotations

import os

from etils import epath


def as_path(path: str | os.PathLike) -> epath.Path:
    """A local or cloud (`gs://`) path; local paths are made absolute, as Orbax needs. Cloud paths
    need `gcsfs` (installed on TPU VMs by `launch/run_on_tpu.sh`). An `epath.Path` is returned
    as it is (it may stand on any filesystem fsspec knows)."""
    if isinstance(path, epath.Path):
        return path
    text = os.fspath(path)
    if text.startswith("gs://") and not _gcs_available():
        raise FileNotFoundError(f"{text}: gs:// paths need gcsfs; `pip install gcsfs "
                                "google-cloud-storage` (launch/run_on_tpu.sh does on TPU VMs).")
    return epath.Path(text if "://" in text else os.path.abspath(os.path.expanduser(text)))


def _gcs_available() -> bool:
    """Whether fsspec can open gs:// (gcsfs installed, or another filesystem registered)."""
    import fsspec

    try:
        fsspec.get_filesystem_class("gcs")
    except (ImportError, ValueError):
        return False
    return True
