"""Reads llama.cpp GGUF files: dequantized tensors under transformers names, config and tokenizer
(the last two kept beside the file once read)."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from spellm_jax.conversion.errors import ConversionError

# llama.cpp tensor name -> transformers name; `{i}` is the block index.
_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# Precomputed RoPE factors that llama.cpp stores for Llama 3.1; we derive them from the config.
_DERIVED_TENSORS = {"rope_freqs.weight"}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file


def hf_name(gguf_name: str) -> str:
    """transformers state-dict name of a llama.cpp tensor name."""
    match = _BLOCK.match(gguf_name)
    template = f"blk.{{i}}.{match[2]}" if match else gguf_name
    if template not in _GGUF_TO_HF:
        raise ConversionError(
            f"GGUF tensor {gguf_name!r} has no transformers counterpart in spellm_jax's table; "
            "this GGUF holds an architecture or tensor that is not supported.")
    return _GGUF_TO_HF[template].format(i=match[1] if match else "")


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's interleaving of Q/K rows (its RoPE pairs adjacent dims, HF halves)."""
    rows = weight.shape[0]
    rest = weight.shape[1:]
    return (weight.reshape(num_heads, rows // num_heads // 2, 2, *rest)
            .swapaxes(1, 2).reshape(rows, *rest))


def read_gguf_config(path: Path) -> dict[str, Any]:
    """The transformers config dict that transformers derives from the GGUF metadata."""
    from transformers import AutoConfig

    with path.open("rb") as file:
        magic = file.read(4)
    if magic != GGUF_MAGIC:
        raise ConversionError(f"{path} is not a GGUF file (it starts with {magic!r}, not "
                              f"{GGUF_MAGIC!r}); pass a llama.cpp .gguf file, or a Hugging Face "
                              "model directory for other weights.")
    kept = _readings_of(path) / "config"
    if (kept / "config.json").exists():
        return json.loads((kept / "config.json").read_text())
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
    config.pop("quantization_config", None)
    text = json.dumps(config)
    _keep(kept, lambda directory: (directory / "config.json").write_text(text))
    return json.loads(text)  # as it reads back


def read_gguf_tokenizer(path: Path) -> Any:
    """The transformers tokenizer of a GGUF file."""
    from transformers import AutoTokenizer

    kept = _readings_of(path) / "tokenizer"
    if (kept / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(kept))
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    _keep(kept, tokenizer.save_pretrained)
    return tokenizer


def _readings_of(path: Path) -> Path:
    """Where transformers' readings of a GGUF file (its config and tokenizer: 15 s of Python
    parsing each for SmolLM2) are kept, beside it, for the file's current size and mtime."""
    stat = path.stat()
    return path.parent / f".{path.name}.transformers" / f"{stat.st_size}-{stat.st_mtime_ns}"


def _keep(target: Path, write: Callable[[Path], Any]) -> None:
    """Makes the directory `target` through `write(staging directory)` and a rename; where the
    GGUF's directory is read-only, nothing is kept (the reading is simply repeated next time)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    except OSError:
        return
    try:
        write(staging)
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)


def read_gguf_tensors(path: Path, hf_config: dict[str, Any], show_progress: bool = False
                      ) -> dict[str, np.ndarray]:
    """All tensors as fp32 numpy under transformers names, Q/K rows restored to HF order."""
    import gguf
    from tqdm import tqdm

    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    heads = {"q_proj": hf_config["num_attention_heads"],
             "k_proj": hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"]}
    tensors = {}
    for tensor in tqdm(reader.tensors, desc=f"reading {path.name}", unit="tensor",
                       disable=not show_progress):
        if tensor.name in _DERIVED_TENSORS:
            continue
        name = hf_name(tensor.name)
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except (NotImplementedError, KeyError, ValueError) as error:
            raise ConversionError(
                f"GGUF tensor {tensor.name!r} uses type {tensor.tensor_type.name}, which the "
                f"installed gguf package cannot dequantize ({error}). Re-export the model with a "
                "supported type (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K, ...).") from error
        values = np.asarray(values, np.float32).reshape(tuple(int(n) for n in tensor.shape[::-1]))
        proj = name.split(".")[-2]
        if arch == "llama" and proj in heads:
            values = unpermute_rope_rows(values, heads[proj])
        tensors[name] = values
    return tensors
