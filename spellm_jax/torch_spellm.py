"""An exported SpeLLM in PyTorch: torch + transformers only (no JAX is imported).

    from spellm_jax.torch_spellm import TorchSpeLLM

    spellm = TorchSpeLLM.from_pretrained("exported/")   # written by `python -m spellm_jax.export`
    prompt = spellm.tokenizer("Once upon a time")["input_ids"]
    new_ids = spellm.generate([prompt], max_new_tokens=32, mode="free")[0]

`mode="free"`: each head picks its symbol; a string that is one token feeds that token, any other
string is turned into input ids by the spelling table and the tokenizer. `mode="vocab"`: the token
whose spelling the heads score highest. `mode="lm_head"`: the original output layer. Greedy, with
a KV cache, one prompt at a time; the same choices as `spellm_jax.decoding.generate`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from spellm_jax.charset import SpellingTable
from spellm_jax.conversion import spellm_files

Mode = Literal["free", "vocab", "lm_head"]


class TorchCharHeads(nn.Module):
    """Hidden states `[..., d]` -> symbol logits `[..., k, C]` (fp32), the twin of `CharHeads`."""

    def __init__(self, tensors: dict[str, torch.Tensor], adapter: str):
        super().__init__()
        self.adapter = adapter
        self.weights = nn.ParameterDict({
            name.replace("/", "_"): nn.Parameter(value.float(), requires_grad=False)
            for name, value in tensors.items()})

    def _get(self, name: str) -> torch.Tensor | None:
        key = name.replace("/", "_")
        return self.weights.get(key)

    def _dense(self, x: torch.Tensor, name: str, equation: str) -> torch.Tensor:
        y = torch.einsum(equation, x, self._get(f"{name}/kernel"))
        bias = self._get(f"{name}/bias")
        return y if bias is None else y + bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h = hidden.float()
        if self.adapter == "shared":
            h = h + self._dense(nn.functional.silu(self._dense(h, "adapter/up", "...d,dh->...h")),
                                "adapter/down", "...h,hd->...d")
            logits = torch.einsum("...d,kdc->...kc", h, self._get("kernel"))
        elif self.adapter == "per_head":
            up = nn.functional.silu(self._dense(h, "adapter/up", "...d,kdh->...kh"))
            h = h[..., None, :] + self._dense(up, "adapter/down", "...kh,khd->...kd")
            logits = torch.einsum("...kd,kdc->...kc", h, self._get("kernel"))
        else:
            logits = torch.einsum("...d,kdc->...kc", h, self._get("kernel"))
        if (bias := self._get("bias")) is not None:
            logits = logits + bias
        return logits + self._get(spellm_files.SYMBOL_MASK)


class TorchSpeLLM(nn.Module):
    """The backbone (a transformers causal LM), the character heads, the spelling table and the
    tokenizer of an exported SpeLLM directory."""

    def __init__(self, lm: nn.Module, heads: TorchCharHeads, spelling: SpellingTable, tokenizer):
        super().__init__()
        self.lm, self.heads, self.spelling, self.tokenizer = lm, heads, spelling, tokenizer
        self.register_buffer("table", torch.as_tensor(spelling.table, dtype=torch.long))
        self.register_buffer("token_valid", torch.as_tensor(spelling.valid))
        eos = lm.config.eos_token_id
        self.eos_ids = set() if eos is None else set(eos if isinstance(eos, list) else [eos])

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> TorchSpeLLM:
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        if not spellm_files.has_spellm_parts(path):
            raise FileNotFoundError(f"{path} has no {spellm_files.CONFIG_FILE}; export a trained "
                                    "SpeLLM with `python -m spellm_jax.export` first.")
        config = json.loads((path / spellm_files.CONFIG_FILE).read_text())
        spelling = SpellingTable.load(path / spellm_files.SPELLING_FILE)
        spelling.check_hash(config["spelling_table_hash"], str(path / spellm_files.CONFIG_FILE))
        tensors = spellm_files.from_file_names(load_file(str(path / spellm_files.HEADS_FILE)))
        heads = TorchCharHeads(tensors, config["heads"]["adapter"])
        lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
        return cls(lm, heads, spelling, AutoTokenizer.from_pretrained(str(path))).eval()

    def char_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.heads(hidden)

    def vocab_log_scores(self, char_logits: torch.Tensor) -> torch.Tensor:
        """`Σ_i log q_i(spell(v)_i)` for every token v `[..., V]`; -inf for unspellable rows."""
        log_probs = torch.log_softmax(char_logits, dim=-1)
        k = self.table.shape[1]
        scores = log_probs[..., torch.arange(k)[None, :], self.table].sum(-1)
        return scores.masked_fill(~self.token_valid, -torch.inf)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Character logits `[B, T, k, C]`."""
        hidden = self.lm.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.char_logits(hidden)

    def next_ids(self, hidden: torch.Tensor, mode: Mode) -> list[int]:
        """The input ids that follow the final hidden state `[d]` of one row (greedy)."""
        if mode == "lm_head":
            return [int(self.lm.lm_head(hidden).argmax())]
        logits = self.char_logits(hidden)
        if mode == "vocab":
            return [int(self.vocab_log_scores(logits).argmax())]
        if mode == "free":
            return self.spelling.ids_for_row(logits.argmax(-1).tolist(), self.tokenizer)
        raise ValueError(f"mode={mode!r}; choose 'free', 'vocab' or 'lm_head'.")

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, mode: Mode = "free"
                 ) -> list[list[int]]:
        """New token ids for each prompt (ending with the EOS id if one was produced)."""
        outputs = []
        for prompt in prompts:
            if not prompt:
                raise ValueError("every prompt needs at least one token; got an empty prompt.")
            step = self.lm.model(input_ids=torch.tensor([list(prompt)]), use_cache=True)
            new: list[int] = []
            while len(new) < max_new_tokens:
                ids = self.next_ids(step.last_hidden_state[0, -1], mode)
                new += ids
                if self.eos_ids.intersection(ids):
                    break
                step = self.lm.model(input_ids=torch.tensor([ids]), cache=step.cache,
                                     use_cache=True)
            outputs.append(new[:max_new_tokens])
        return outputs
