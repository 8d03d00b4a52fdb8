"""Orbax checkpoints of parameters as pure nested dicts with paths we own."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from spellm_jax.models.params import flatten, unflatten


def save_params(path: Path, flat_params: Mapping[str, jax.Array]) -> None:
    """Writes flat params as an Orbax checkpoint at `path` (which must not exist)."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(Path(path).absolute(), unflatten(flat_params))
    checkpointer.wait_until_finished()


def restore_params(path: Path, target: Mapping[str, jax.ShapeDtypeStruct] | None = None) -> dict:
    """Reads flat params; with a `target` of ShapeDtypeStructs (with shardings) restores into it."""
    checkpointer = ocp.StandardCheckpointer()
    abstract = None if target is None else unflatten(target)
    return flatten(checkpointer.restore(Path(path).absolute(), abstract))


def prepare_output_dir(out: Path, overwrite: bool) -> Path:
    """A fresh staging directory beside `out`; refuses a non-empty `out` unless `overwrite`.

    Writers fill the staging directory and then `commit_output_dir` swaps it in, so a failure
    half-way never destroys what `out` held before.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pass --overwrite to "
                              "replace it, or choose another --out.")
    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def commit_output_dir(staging: Path, out: Path) -> None:
    """Replaces `out` with the completed staging directory."""
    out = Path(out)
    if out.exists():
        backup = out.with_name(out.name + ".old")
        out.rename(backup)
        staging.rename(out)
        shutil.rmtree(backup) if backup.is_dir() else backup.unlink()
    else:
        staging.rename(out)
