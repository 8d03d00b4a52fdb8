"""The PyTorch backend of the benchmark scorer: transformers models and exported SpeLLMs
(`spellm_jax.torch_spellm.TorchSpeLLM`), scored with torch only, on the same batches and with
the same definitions as `scoring.JaxBackend`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spellm_jax.benchmarks.scoring import Batch


def spells_target(rows: torch.Tensor, table: torch.Tensor, lengths: torch.Tensor,
                  targets: torch.Tensor) -> torch.Tensor:
    """`scoring.spells_target` in torch: the row's string is exactly the target's spelling."""
    k = rows.shape[-1]
    length = lengths[targets]
    compared = torch.arange(k) <= length[..., None]
    return ((rows == table[targets]) | ~compared).all(-1) & (length <= k)


@dataclasses.dataclass
class TorchBackend:
    """A transformers causal LM (its LM head), or a TorchSpeLLM (its character decoder, greedy
    choices with `beam` strings)."""

    model: torch.nn.Module
    spellm: bool = False
    beam: int = 1

    def __post_init__(self) -> None:
        if self.spellm:
            self.lengths = torch.as_tensor(self.model.spelling.lengths, dtype=torch.long)
            self.table = torch.as_tensor(self.model.spelling.table, dtype=torch.long)

    @property
    def modes(self) -> tuple[str, ...]:
        return ("vocab", "free") if self.spellm else ("lm_head",)

    @torch.no_grad()
    def score(self, batch: Batch) -> dict[str, np.ndarray]:
        ids = torch.as_tensor(batch.ids, dtype=torch.long)
        targets = torch.as_tensor(batch.targets, dtype=torch.long)
        backbone = self.model.lm.model if self.spellm else self.model.model
        hidden = backbone(input_ids=ids).last_hidden_state
        index = (torch.as_tensor(batch.starts, dtype=torch.long)[:, None]
                 + torch.arange(targets.shape[1])).clamp(max=ids.shape[1] - 1)
        hidden = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
        if not self.spellm:
            log_probs = torch.log_softmax(self.model.lm_head(hidden).float(), dim=-1)
            picked = log_probs.gather(-1, targets[..., None])[..., 0]
            hits = {"lm_head": log_probs.argmax(-1) == targets}
            return {"log_probs": picked.numpy()} | {
                f"hits/{mode}": hit.numpy() for mode, hit in hits.items()}
        # Only the positions that predict a continuation token reach the decoder.
        mask = torch.as_tensor(batch.mask)
        decoder, wanted, rows = self.model.decoder, targets[mask], self.table[targets[mask]]
        out = {name: np.zeros(targets.shape, dtype) for name, dtype in
               (("log_probs", np.float32), ("hits/vocab", bool), ("hits/free", bool))}
        out["log_probs"][mask.numpy()] = decoder.token_log_probs(hidden[mask], rows).numpy()
        vocab = self.model.choose(hidden[mask], constrained=True, beam=self.beam)
        out["hits/vocab"][mask.numpy()] = (vocab == rows).all(-1).numpy()
        free = self.model.choose(hidden[mask], beam=self.beam)
        out["hits/free"][mask.numpy()] = spells_target(free, self.table, self.lengths,
                                                       wanted).numpy()
        return out


def load_torch_lm(source: str) -> torch.nn.Module:
    """A transformers causal LM in fp32 from a HF dir or hub name, a .gguf file, or `smollm2`."""
    from transformers import AutoModelForCausalLM

    if source == "smollm2":
        from spellm_jax import assets

        source = str(assets.fetch(assets.SMOLLM2))
    path = Path(source)
    if path.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                    dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()


@dataclasses.dataclass(frozen=True)
class ExportModels:
    """An exported SpeLLM and its teacher, in PyTorch."""

    teacher: torch.nn.Module
    spellm: Any  # TorchSpeLLM
    tokenizer: Any
    beam: int = 1

    def backends(self) -> dict[str, TorchBackend]:
        return {"teacher": TorchBackend(self.teacher),
                "spellm": TorchBackend(self.spellm, True, self.beam)}

    @property
    def max_length(self) -> int:
        return self.spellm.lm.config.max_position_embeddings


def load_export(path: str | Path, teacher: str | None = None, beam: int = 1) -> ExportModels:
    """`TorchSpeLLM` of an export directory, and its teacher: `teacher`, else the export's
    recorded `base_model`."""
    from spellm_jax.conversion import spellm_files
    from spellm_jax.torch_spellm import TorchSpeLLM

    spellm = TorchSpeLLM.from_pretrained(path)
    if teacher is None:
        teacher = json.loads((Path(path) / spellm_files.CONFIG_FILE).read_text())["base_model"]
    return ExportModels(load_torch_lm(teacher), spellm, spellm.tokenizer, beam)
