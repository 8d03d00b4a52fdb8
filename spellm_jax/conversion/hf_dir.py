"""Reads and writes Hugging Face model directories (config.json + safetensors or .bin weights)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from spellm_jax.conversion import safetensors_file
from spellm_jax.conversion.errors import ConversionError
from spellm_jax.conversion.mapping import TIED_LM_HEAD

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "pytorch_model.bin.index.json")


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_hf_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{path} has no config.json; point --source at a Hugging Face "
                              "model directory (config.json + weights).")
    return json.loads(config_file.read_text())


def _torch_to_numpy(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:  # numpy has no bf16: keep the bits exactly
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def weight_files(path: Path) -> list[Path]:
    for name in _WEIGHT_FILES:
        candidate = path / name
        if not candidate.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(candidate.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise ConversionError(f"{candidate} lists shards that are missing: {missing}. "
                                      "Download the complete checkpoint.")
            return [path / s for s in shards]
        return [candidate]
    raise ConversionError(f"{path} holds no weights: expected one of {', '.join(_WEIGHT_FILES)}.")


def read_safetensors(file: Path) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file as numpy, in its stored dtype (bf16 bit-exact)."""
    return {name: tensor.read() for name, tensor in safetensors_file.tensors_in(file).items()}


def read_hf_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of an HF directory as numpy, in its stored dtype."""
    tensors: dict[str, np.ndarray] = {}
    for file in weight_files(path):
        if file.suffix == ".safetensors":
            tensors.update(read_safetensors(file))
        else:
            import torch

            with file.open("rb") as handle:  # local or remote alike
                state = torch.load(handle, map_location="cpu", weights_only=True)
            tensors.update({name: _torch_to_numpy(t) for name, t in state.items()})
    return tensors


def write_safetensors(file: Path, tensors: dict[str, np.ndarray]) -> None:
    """Writes numpy tensors (bf16 bit-exact) as a safetensors file that PyTorch reads."""
    import torch
    from safetensors.torch import save_file

    converted = {}
    for name, value in tensors.items():
        array = np.array(value, order="C")  # a writable copy: torch refuses read-only memory
        if array.dtype == ml_dtypes.bfloat16:
            converted[name] = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        else:
            converted[name] = torch.from_numpy(array)
    save_file(converted, str(file), metadata={"format": "pt"})


def write_hf_dir(path: Path, hf_config: dict[str, Any], hf_state: dict[str, np.ndarray]) -> None:
    """Writes `config.json` + `model.safetensors` that transformers loads with no custom code."""
    path.mkdir(parents=True, exist_ok=True)
    if hf_config.get("tie_word_embeddings"):
        hf_state = {k: v for k, v in hf_state.items() if k != TIED_LM_HEAD}
    write_safetensors(path / "model.safetensors", hf_state)
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))
