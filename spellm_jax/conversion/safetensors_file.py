"""Safetensors files read in slices, on any filesystem `etils.epath` knows (local disks, `gs://`).

The file's JSON header gives each tensor's dtype, shape and byte range; a slice of a tensor is
one ranged read of the rows its leading axis spans, the other axes cut in memory, so a host
never reads more than the rows of the tensor it is reading.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np

from spellm_jax.conversion.errors import ConversionError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file; `tensor[index]` reads only what `index` needs."""

    path: Any  # a pathlib or epath path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # where its bytes start in the file

    def __getitem__(self, index: Sequence[slice] | slice) -> np.ndarray:
        index = (index,) if isinstance(index, slice) else tuple(index)
        index += (slice(None),) * (len(self.shape) - len(index))
        if not self.shape:
            return self._read(0, self.dtype.itemsize).reshape(())
        lead = range(*index[0].indices(self.shape[0]))
        if lead.step != 1:
            raise ValueError(f"safetensors slices need a unit step, got {index[0]}.")
        row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        rows = self._read(lead.start * row, len(lead) * row).reshape(len(lead), *self.shape[1:])
        return rows[(slice(None), *index[1:])]

    def read(self) -> np.ndarray:
        """The whole tensor."""
        return self[()]

    def _read(self, start: int, size: int) -> np.ndarray:
        """`size` bytes from `start` of the tensor's data, read straight into their array."""
        out = np.empty(size // self.dtype.itemsize, self.dtype)
        with self.path.open("rb") as handle:
            handle.seek(self.offset + start)
            got = handle.readinto(memoryview(out.view(np.uint8)))
        if got != size:
            raise ConversionError(f"{self.path} ends before the tensor data its header promises; "
                                  "the file is truncated: download it again.")
        return out


def tensors_in(path) -> dict[str, StoredTensor]:
    """Every tensor of one safetensors file, by name, from its header alone."""
    with path.open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    unknown = sorted({entry["dtype"] for entry in header.values()} - set(DTYPES))
    if unknown:
        raise ConversionError(f"{path} stores tensors of dtype {', '.join(unknown)}, which "
                              f"spellm_jax does not read (it reads {', '.join(DTYPES)}).")
    return {name: StoredTensor(path, np.dtype(DTYPES[entry["dtype"]]), tuple(entry["shape"]),
                               8 + size + entry["data_offsets"][0])
            for name, entry in header.items()}
