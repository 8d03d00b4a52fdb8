"""Orbax checkpoints of parameters as pure nested dicts with paths we own."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from spellm_jax.models.params import flatten, shape_differences, unflatten
from spellm_jax.paths import as_path


def save_params(path: Path, flat_params: Mapping[str, jax.Array]) -> None:
    """Writes flat params as an Orbax checkpoint at `path` (which must not exist)."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(Path(path).absolute(), unflatten(flat_params))
    checkpointer.wait_until_finished()


def restore_params(path: Path, target: Mapping[str, jax.ShapeDtypeStruct] | None = None) -> dict:
    """Reads flat params; with a `target` of ShapeDtypeStructs (with shardings) restores into it."""
    checkpointer = ocp.StandardCheckpointer()
    abstract = None if target is None else unflatten(target)
    return flatten(checkpointer.restore(as_path(path), abstract))


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


class CheckpointMismatchError(ValueError):
    """A checkpoint whose structure does not fit the run that tries to restore it."""


def flatten_tree(tree) -> tuple[dict, object]:
    """`{"path": leaf}` (paths from jax key paths) and the treedef to rebuild the tree."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}, treedef


def _pytree_restore(target: dict, partial: bool = False) -> ocp.args.PyTreeRestore:
    """Restore arguments placing each entry as its ShapeDtypeStruct in `target` says (shape,
    dtype, sharding); `partial` reads only the entries `target` names."""
    return ocp.args.PyTreeRestore(item=target, partial_restore=partial,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(target))


class TrainCheckpoints:
    """Orbax CheckpointManager over `workdir/checkpoints`: train state (as a flat dict of paths we
    own), data-iterator state and metadata JSON per step. `checkpoint N` = state after N updates."""

    def __init__(self, workdir: str | os.PathLike, keep: int, save_every: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=save_every,
            enable_async_checkpointing=async_save, create=True)
        handlers = {"state": ocp.PyTreeCheckpointHandler(),
                    "data": ocp.JsonCheckpointHandler(), "metadata": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(as_path(workdir) / "checkpoints",
                                             options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        """Whether `save(step, ...)` without `force` would write a checkpoint."""
        return self.manager.should_save(step)

    def save(self, step: int, state, data_state: dict, metadata: dict, force: bool = False
             ) -> bool:
        flat, _ = flatten_tree(state)
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(flat), data=ocp.args.JsonSave(data_state),
            metadata=ocp.args.JsonSave(metadata)), force=force)

    def restore(self, step: int, abstract_state) -> tuple[object, dict, dict]:
        """Restores into `abstract_state` (ShapeDtypeStructs carrying the target shardings):
        the state, the data-iterator state and the metadata."""
        target, treedef = flatten_tree(abstract_state)
        self._check(step, target, partial=False)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=_pytree_restore(target), data=ocp.args.JsonRestore(),
            metadata=ocp.args.JsonRestore()))
        leaves = [restored["state"][key] for key in target]
        return jax.tree_util.tree_unflatten(treedef, leaves), restored["data"], restored["metadata"]

    def restore_params(self, step: int, abstract_params, fresh=None):
        """Only the trained parameters (`state["params"]`) of checkpoint `step`: no optimizer
        state is read or needs a target. Given `fresh` (concrete parameters of the same
        structure), parameters the checkpoint lacks keep their `fresh` values (a run of another
        decoder kind that adds parameters) instead of being refused."""
        target, treedef = flatten_tree({"params": abstract_params})
        stored = self.manager.item_metadata(step)["state"]
        kept = {key: value for key, value in target.items() if fresh is None or key in stored}
        self._check(step, kept, partial=True)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=_pytree_restore(kept, partial=True)))["state"]
        defaults = {} if fresh is None else flatten_tree({"params": fresh})[0]
        leaves = [restored[key] if key in restored else defaults[key] for key in target]
        return jax.tree_util.tree_unflatten(treedef, leaves)["params"]

    def _check(self, step: int, target: dict, partial: bool) -> None:
        """Refuses, with a readable message, a flat restore `target` unless checkpoint `step`
        stores exactly (or, if `partial`, at least) its entries with the same shapes."""
        stored = self.manager.item_metadata(step)["state"]
        stored_shapes = {k: tuple(v.shape) for k, v in stored.items()}
        target_shapes = {k: tuple(v.shape) for k, v in target.items()}
        if partial:
            stored_shapes = {k: v for k, v in stored_shapes.items() if k in target_shapes}
        if stored_shapes != target_shapes:
            missing, unexpected, different = shape_differences(target_shapes, stored_shapes)
            raise CheckpointMismatchError(
                f"checkpoint {step} in {self.manager.directory} does not fit this run: missing "
                f"{missing[:5]}, unexpected {unexpected[:5]}, different shapes {different[:5]}. "
                "It was written with another model, trainable set or heads config; use a fresh "
                "--workdir.")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
