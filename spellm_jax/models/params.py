"""Parameters as flat `{"model/layers/0/self_attn/q_proj/kernel": array}` dicts, and their layouts.

The canonical layout has one entry per layer (`model/layers/{i}/...`); a `scan_layers` model holds
the same tensors stacked along a leading layer axis (`model/layers/...`). Checkpoints and the
conversion table speak flat dicts; these helpers move them in and out of NNX modules.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx

from spellm_jax import sharding

LAYER_KEY = re.compile(r"^(?P<prefix>.*?layers)/(?P<index>\d+)/(?P<rest>.+)$")


class ParamMismatchError(ValueError):
    """Parameters that do not fit the model they are loaded into."""


def flatten(nested: Mapping, prefix: str = "") -> dict:
    """`{"a": {"b": x}}` -> `{"a/b": x}` (keys become strings)."""
    flat = {}
    for key, value in nested.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, path + "/"))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping) -> dict:
    nested: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def stack_layers(flat: Mapping) -> dict:
    """Per-layer entries `.../layers/{i}/x` -> one stacked entry `.../layers/x` (leading axis i)."""
    stacked: dict = {}
    groups: dict[str, dict[int, object]] = {}
    for path, value in flat.items():
        match = LAYER_KEY.match(path)
        if match is None:
            stacked[path] = value
        else:
            key = f"{match['prefix']}/{match['rest']}"
            groups.setdefault(key, {})[int(match["index"])] = value
    for key, by_layer in groups.items():
        if sorted(by_layer) != list(range(len(by_layer))):
            raise ParamMismatchError(f"{key}: layers {sorted(by_layer)} are not 0..n-1.")
        stack = np.stack if all(isinstance(v, np.ndarray) for v in by_layer.values()) else (
            jax.numpy.stack)
        stacked[key] = stack([by_layer[i] for i in range(len(by_layer))])
    return stacked


def _layer_key(stacked_key: str, index: int) -> str:
    """`.../layers/x` (stacked) -> `.../layers/{index}/x` (canonical)."""
    prefix, rest = stacked_key.split("/layers/", 1)
    return f"{prefix}/layers/{index}/{rest}"


def unstack_layers(flat: Mapping, stacked_keys: set[str]) -> dict:
    """Inverse of `stack_layers` for the entries named in `stacked_keys`."""
    out = {}
    for path, value in flat.items():
        if path not in stacked_keys:
            out[path] = value
            continue
        for i in range(value.shape[0]):
            out[_layer_key(path, i)] = value[i]
    return out


def _flat_params(module: nnx.Module) -> dict[str, nnx.Variable]:
    """The module's parameter variables under their flat keys (in the module's own layout)."""
    return {"/".join(str(p) for p in path): variable
            for path, variable in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def _stacked_keys(module: nnx.Module) -> set[str]:
    """Flat keys of a module's parameters that carry a leading stacked-layers axis."""
    return {key for key, variable in _flat_params(module).items()
            if (sharding.logical_axes(variable) or (None,))[0] == "layers"}


def model_params(module: nnx.Module, canonical: bool = True) -> dict:
    """Flat params of a module; `canonical` unstacks scanned layers into one entry per layer."""
    flat = {key: variable.get_value() for key, variable in _flat_params(module).items()}
    return unstack_layers(flat, _stacked_keys(module)) if canonical else flat


def param_shapes(module: nnx.Module) -> dict[str, tuple[int, ...]]:
    """Canonical flat key -> shape, computed without allocating (works on abstract modules)."""
    stacked = _stacked_keys(module)
    shapes = {}
    for key, variable in _flat_params(module).items():
        shape = tuple(variable.get_value().shape)
        if key in stacked:
            shapes.update({_layer_key(key, i): shape[1:] for i in range(shape[0])})
        else:
            shapes[key] = shape
    return shapes


def shape_differences(expected: Mapping[str, tuple[int, ...]], actual: Mapping[str, tuple[int, ...]]
                      ) -> tuple[list[str], list[str], list[str]]:
    """`(missing, unexpected, different shapes)` of `actual` against `expected` shapes by key,
    each sorted; the last as `"key: got shape, needs shape"`."""
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    different = sorted(f"{k}: got {tuple(actual[k])}, needs {tuple(expected[k])}"
                       for k in set(expected) & set(actual) if tuple(actual[k]) != tuple(expected[k]))
    return missing, unexpected, different


def check_params(expected: Mapping[str, tuple[int, ...]], flat: Mapping, source: str) -> None:
    """Raises ParamMismatchError naming every missing, unexpected or mis-shaped parameter."""
    missing, unexpected, wrong = shape_differences(
        expected, {k: tuple(np.shape(v)) for k, v in flat.items()})
    if missing or unexpected or wrong:
        raise ParamMismatchError(mismatch_report(
            f"parameters from {source} do not fit the model:",
            {"missing": missing, "unexpected": unexpected, "shape mismatch": wrong},
            "Check that the config matches the weights (model type, sizes, tied embeddings)."))


def mismatch_report(title: str, sections: Mapping[str, list[str]], advice: str = "") -> str:
    """`title`, then one line per non-empty section listing up to 8 of its names, then `advice`."""
    lines = [title]
    for name, items in sections.items():
        if items:
            shown = ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")
            lines.append(f"  {name}: {shown}")
    return "\n".join(lines + ([advice] if advice else []))


def load_params(module: nnx.Module, flat: Mapping, source: str = "the given weights",
                exclude: str | None = None) -> None:
    """Writes canonical flat params into a module (stacking layers for a scanned model).

    Parameters whose key matches the regular expression `exclude` are neither expected nor
    written (they keep the values the module has).
    """
    skip = re.compile(exclude).search if exclude else (lambda key: False)
    expected = {k: v for k, v in param_shapes(module).items() if not skip(k)}
    check_params(expected, flat, source)
    layout = stack_layers(flat) if _stacked_keys(module) else dict(flat)
    state = nnx.state(module, nnx.Param)
    for path, variable in nnx.to_flat_state(state):
        key = "/".join(str(p) for p in path)
        if skip(key):
            continue
        value = layout[key]  # copied: a donated train state never frees the source's arrays
        variable.set_value(jax.numpy.array(value, dtype=variable.get_value().dtype, copy=True))
    nnx.update(module, state)
