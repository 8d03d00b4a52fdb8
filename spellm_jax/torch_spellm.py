"""An exported SpeLLM in PyTorch: torch + transformers only (no JAX is imported).

    from spellm_jax.torch_spellm import TorchSpeLLM

    spellm = TorchSpeLLM.from_pretrained("exported/")   # written by `python -m spellm_jax.export`
    prompt = spellm.tokenizer("Once upon a time")["input_ids"]
    new_ids = spellm.generate([prompt], max_new_tokens=32, mode="free")[0]

`mode="free"`: the decoder chooses a row of symbols; a string that is one token feeds that token,
any other string is turned into input ids by the spelling table and the tokenizer. `mode="vocab"`:
the token whose spelling the decoder scores highest. `mode="lm_head"`: the original output layer. Greedy, with
a KV cache, one prompt at a time; the same choices as `spellm_jax.decoding.generate`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn

from spellm_jax.conversion import spellm_files
from spellm_jax.spelling import Respeller, SpellingTable
from spellm_jax.spelling.trie import PrefixTrie

Mode = Literal["free", "vocab", "lm_head"]


class TorchCharDecoder(Protocol):
    """The PyTorch twin of `models.char_decoders.CharDecoder` (greedy decoding): built from an
    export's tensors, its `heads` config and the spelling table's `[V, k]` rows."""

    def logits(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced symbol logits `[..., k, C]` (fp32)."""
        ...

    def choose(self, hidden: torch.Tensor, constrained: bool = False, beam: int = 1,
               unembedding: torch.Tensor | None = None) -> torch.Tensor:
        """The greedy rows `[..., k]` (the best of `beam` where the kind searches); with
        `constrained`, the row of a vocabulary token; word rows check the tokens the decoder
        spells against the LM head's rows `unembedding` `[V, d]` when given."""
        ...

    def token_log_probs(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """`[...]`: the log-probability of the token each table row `[..., k]` spells, under the
        decoder's distribution over the vocabulary (benchmark scoring)."""
        ...


TorchDecoderFactory = Callable[[dict[str, torch.Tensor], dict[str, Any], torch.Tensor,
                                torch.Tensor, SpellingTable], nn.Module]
TORCH_DECODERS: dict[str, TorchDecoderFactory] = {}


def register_torch_decoder(kind: str) -> Callable[[TorchDecoderFactory], TorchDecoderFactory]:
    """Class decorator: exports of decoder `kind` are read by `cls(tensors, heads, table, valid,
    spelling)`."""

    def register(factory: TorchDecoderFactory) -> TorchDecoderFactory:
        TORCH_DECODERS[kind] = factory
        return factory

    return register


def token_scores(symbol_scores: torch.Tensor, table: torch.Tensor, valid: torch.Tensor
                 ) -> torch.Tensor:
    """`Σ_i s_i(spell(v)_i)` for every token v: `[..., k, C]` -> `[..., V]`, -inf where invalid."""
    k = table.shape[1]
    scores = symbol_scores[..., torch.arange(k)[None, :], table].sum(-1)
    return scores.masked_fill(~valid, -torch.inf)


@register_torch_decoder("independent")
class TorchIndependentHeads(nn.Module):
    """The twin of `IndependentHeads`: hidden states `[..., d]` -> symbol logits `[..., k, C]`."""

    def __init__(self, tensors: dict[str, torch.Tensor], heads: dict[str, Any],
                 table: torch.Tensor, valid: torch.Tensor, spelling: SpellingTable | None = None):
        super().__init__()
        self.adapter = heads["adapter"]
        self.weights = nn.ParameterDict({
            name.replace("/", "_"): nn.Parameter(value.float(), requires_grad=False)
            for name, value in tensors.items()})
        self.register_buffer("table", table)
        self.register_buffer("valid", valid)

    def _get(self, name: str) -> torch.Tensor | None:
        return self.weights.get(name.replace("/", "_"))

    def _dense(self, x: torch.Tensor, name: str, equation: str) -> torch.Tensor:
        y = torch.einsum(equation, x, self._get(f"{name}/kernel"))
        bias = self._get(f"{name}/bias")
        return y if bias is None else y + bias

    def logits(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        del rows
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

    def choose(self, hidden: torch.Tensor, constrained: bool = False, beam: int = 1,
               unembedding: torch.Tensor | None = None) -> torch.Tensor:
        del beam, unembedding  # one string, no word rows
        if constrained:
            scores = token_scores(torch.log_softmax(self.logits(hidden), dim=-1), self.table,
                                  self.valid)
            return self.table[scores.argmax(-1)]
        return self.logits(hidden).argmax(-1)

    def token_log_probs(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The heads' product of symbol probabilities, renormalised over the vocabulary: a table
        row's score is its token's."""
        log_probs = torch.log_softmax(self.logits(hidden), dim=-1)
        picked = log_probs.gather(-1, rows[..., None])[..., 0].sum(-1)
        return picked - torch.logsumexp(token_scores(log_probs, self.table, self.valid), dim=-1)


class TorchPrefixTrie:
    """`spelling.trie.PrefixTrie` as torch tensors: allowed symbols and range narrowing."""

    def __init__(self, spelling: SpellingTable):
        trie = PrefixTrie.of(spelling)
        self.count, self.num_symbols = trie.count, trie.num_symbols
        self.rows = torch.as_tensor(trie.rows, dtype=torch.long)
        bits = np.unpackbits(trie.allowed, axis=-1, bitorder="little")[..., :trie.num_symbols]
        self.allowed_by_node = torch.as_tensor(bits.astype(bool))  # [k, V, C]

    def allowed(self, depth: int, lo: torch.Tensor) -> torch.Tensor:
        return self.allowed_by_node[depth][lo]

    def narrow(self, depth: int, lo: torch.Tensor, hi: torch.Tensor, symbol: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        column = self.rows[:, depth].contiguous()
        new_lo = torch.stack([lo[j] + torch.searchsorted(column[lo[j]:hi[j]], symbol[j])
                              for j in range(len(lo))]) if len(lo) else lo
        new_hi = torch.stack([lo[j] + torch.searchsorted(column[lo[j]:hi[j]], symbol[j],
                                                         right=True)
                              for j in range(len(lo))]) if len(lo) else hi
        return new_lo, new_hi


State = torch.Tensor | tuple[torch.Tensor, ...]  # a decoder's per-hypothesis state `[B, ...]`


def _pick(state: State, index: torch.Tensor | int) -> State:
    """The hypotheses `index` of every part of a state (the same beam of each)."""
    if isinstance(state, tuple):
        return tuple(part[index] for part in state)
    return state[index]


def _expand(state: State, beam: int) -> State:
    """One hypothesis's state `[1, ...]` repeated for `beam` hypotheses."""
    if isinstance(state, tuple):
        return tuple(part.expand(beam, *part.shape[1:]) for part in state)
    return state.expand(beam, *state.shape[1:])


def torch_search(step: Callable, state: State, k: int, pad: int, beam: int,
                 trie: TorchPrefixTrie | None, every_row: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`search.search_rows` for one hidden state, greedy or beam: the best row `[k]` and its
    log-probability (`every_row`: every hypothesis's, `[beam, k]` and `[beam]`)."""
    score = torch.full((beam,), -torch.inf)
    score[0] = 0.0
    rows = torch.full((beam, k), pad, dtype=torch.long)
    done = torch.zeros(beam, dtype=torch.bool)
    lo = torch.zeros(beam, dtype=torch.long)
    hi = torch.full((beam,), trie.count if trie is not None else 0, dtype=torch.long)
    previous = None
    for i in range(k):
        logits, state = step(state, previous, i)  # [B, C]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        if trie is not None:
            allowed = trie.allowed(i, lo)
            masked = logits.float().masked_fill(~allowed, -torch.inf)
            log_probs = (masked - torch.logsumexp(masked, -1, keepdim=True)).masked_fill(
                ~allowed, -torch.inf)
        is_pad = torch.arange(logits.shape[-1]) == pad
        finished = torch.where(is_pad, 0.0, -torch.inf).expand_as(log_probs)
        log_probs = torch.where(done[:, None], finished, log_probs)
        if beam == 1:
            symbol = torch.where(done, pad, log_probs.argmax(-1))
            score = score + log_probs.gather(-1, symbol[:, None])[:, 0]
        else:
            score, flat = torch.topk((score[:, None] + log_probs).reshape(-1), beam)
            parents, symbol = flat // logits.shape[-1], flat % logits.shape[-1]
            rows, state, done, lo, hi = rows[parents], _pick(state, parents), done[parents], \
                lo[parents], hi[parents]
        rows = rows.clone()
        rows[:, i] = symbol
        if trie is not None:
            lo, hi = trie.narrow(i, lo, hi, symbol)
        done = done | (symbol == pad)
        previous = symbol
    if every_row:
        return rows, score
    best = int(score.argmax())
    return rows[best], score[best]


@register_torch_decoder("chain")
class TorchChainHeads(TorchIndependentHeads):
    """The twin of `ChainHeads`: the independent heads plus the recurrence over chosen symbols."""

    def __init__(self, tensors: dict[str, torch.Tensor], heads: dict[str, Any],
                 table: torch.Tensor, valid: torch.Tensor, spelling: SpellingTable):
        super().__init__(tensors, heads, table, valid)
        self.trie = TorchPrefixTrie(spelling)
        self.pad = spelling.pad_symbol
        shortlist = torch.as_tensor(heads.get("shortlist_tokens", ()), dtype=torch.long)
        self.register_buffer("shortlist_spellings", table[shortlist])  # [R, k]
        self.token_for_row = spelling.token_for_row

    def _step(self, hidden: torch.Tensor):
        """`(step, one hypothesis's state)` for one hidden state `[d]`."""
        base = super().logits(hidden)  # [k, C]
        step_in = self._get("step_in")  # [d, k - 1, r] where every step rereads the hidden state

        def recurrent_step(s, previous, i):
            if previous is not None:
                drive = self._get("symbol_embed")[i][previous]
                if step_in is not None:
                    drive = drive + hidden.float() @ step_in[:, i - 1]
                s = nn.functional.silu(s @ self._get("transition") + drive)
            return base[i] + s @ self._get("readout")[i], s

        return recurrent_step, torch.tanh(hidden.float() @ self._get("state_in"))[None]

    def _word_scores(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The shortlist's R word scores and the rest row's `[R + 1]` (None without one)."""
        if not len(self.shortlist_spellings):
            return None
        h = hidden.float()
        words = h @ self._get("shortlist/kernel")
        rest = (torch.logsumexp(words, -1) + h @ self._get("shortlist/rest_kernel")
                + self._get("shortlist/rest_bias"))
        return torch.cat([words, rest.reshape(1)])

    def logits(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        if rows is None:
            rows = self.choose(flat)
        rows = rows.reshape(len(flat), -1)
        out = []
        for h, row in zip(flat, rows, strict=True):
            step, state = self._step(h)
            per_symbol = []
            for i in range(row.shape[0]):
                logits, state = step(state, None if i == 0 else row[i - 1:i], i)
                per_symbol.append(logits[0])
            out.append(torch.stack(per_symbol))
        return torch.stack(out).reshape(*hidden.shape[:-1], *out[0].shape)

    def choose(self, hidden: torch.Tensor, constrained: bool = False, beam: int = 1,
               unembedding: torch.Tensor | None = None) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        trie = self.trie if constrained else None
        rows = []
        for h in flat:
            scores = self._word_scores(h)
            word = None if scores is None else int(scores[:-1].argmax())
            if word is not None and scores[-1] <= scores[word]:  # the rest row cannot win
                rows.append(self.shortlist_spellings[word])
                continue
            step, state = self._step(h)
            checked = word is not None and unembedding is not None
            found, score = torch_search(step, _expand(state, beam), self.table.shape[1],
                                        self.pad, beam, trie, every_row=checked)
            if checked:
                row, score = self._checked(h, found, unembedding)
            else:
                row, score = found, None if word is None else scores[-1] + score
            if word is not None and score <= scores[word]:
                row = self.shortlist_spellings[word]
            rows.append(row)
        return torch.stack(rows).reshape(*hidden.shape[:-1], -1)

    def _checked(self, hidden: torch.Tensor, rows: torch.Tensor, unembedding: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """`ChainHeads._checked` for one hidden state: of the search's rows `[B, k]`, the one
        whose token has the highest LM-head logit, and that logit (-inf if none is a token)."""
        tokens = [self.token_for_row(row.tolist()) for row in rows]
        logits = torch.stack([hidden.float() @ unembedding[t].float() if t is not None
                              else torch.tensor(-torch.inf) for t in tokens])
        best = int(logits.argmax())
        return rows[best], logits[best]

    def token_log_probs(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The string probability of each row, each symbol renormalised over the symbols the
        vocabulary's prefix trie allows after those before it."""
        flat_rows = rows.reshape(-1, rows.shape[-1])
        logits = self.logits(hidden, rows).reshape(*flat_rows.shape, -1).float()
        total = torch.zeros(len(flat_rows))
        done = torch.zeros(len(flat_rows), dtype=torch.bool)
        lo = torch.zeros(len(flat_rows), dtype=torch.long)
        hi = torch.full((len(flat_rows),), self.trie.count, dtype=torch.long)
        for i in range(flat_rows.shape[1]):
            masked = logits[:, i].masked_fill(~self.trie.allowed(i, lo), -torch.inf)
            picked = torch.log_softmax(masked, -1).gather(-1, flat_rows[:, i:i + 1])[:, 0]
            total = total + torch.where(done, 0.0, picked)
            lo, hi = self.trie.narrow(i, lo, hi, flat_rows[:, i])
            done = done | (flat_rows[:, i] == self.pad)
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        if len(self.shortlist_spellings):  # p_words(v) + p_rest * chain(v)
            for n, (h, row) in enumerate(zip(flat_hidden, flat_rows, strict=True)):
                log_probs = torch.log_softmax(self._word_scores(h), -1)
                same = (self.shortlist_spellings == row).all(-1)
                words = torch.logsumexp(log_probs[:-1].masked_fill(~same, -torch.inf), -1)
                total[n] = torch.logaddexp(words, log_probs[-1] + total[n])
        return total.reshape(rows.shape[:-1])


class TorchSpeLLM(nn.Module):
    """The backbone (a transformers causal LM), the character decoder, the spelling table and
    the tokenizer of an exported SpeLLM directory."""

    def __init__(self, lm: nn.Module, decoder: nn.Module, spelling: SpellingTable, tokenizer):
        super().__init__()
        self.lm, self.decoder, self.spelling, self.tokenizer = lm, decoder, spelling, tokenizer
        self.respeller = Respeller(spelling, tokenizer)
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
        config, spelling = spellm_files.read_description(path)
        tensors = spellm_files.from_file_names(load_file(str(path / spellm_files.HEADS_FILE)))
        heads = config["heads"]
        kind = heads.get("kind", "independent")  # exports before decoder kinds existed
        if kind not in TORCH_DECODERS:
            raise ValueError(f"{path} holds a {kind!r} character decoder, which has no PyTorch "
                             f"twin here; known kinds: {', '.join(TORCH_DECODERS)}.")
        decoder = TORCH_DECODERS[kind](tensors, heads,
                                       torch.as_tensor(spelling.table, dtype=torch.long),
                                       torch.as_tensor(spelling.valid), spelling)
        lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
        return cls(lm, decoder, spelling, AutoTokenizer.from_pretrained(str(path))).eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """Character logits `[B, T, k, C]`, teacher-forced on `rows` `[B, T, k]`."""
        hidden = self.lm.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.decoder.logits(hidden, rows)

    def choose(self, hidden: torch.Tensor, constrained: bool = False, beam: int = 1
               ) -> torch.Tensor:
        """`SpeLLM.choose`: the decoder's rows for hidden states `[..., d]`, the tokens it
        spells checked against the LM head's rows where it has word rows."""
        return self.decoder.choose(hidden, constrained, beam, unembedding=self.lm.lm_head.weight)

    def next_ids(self, hidden: torch.Tensor, mode: Mode, beam: int = 1, respell: str = "device"
                 ) -> list[int]:
        """The input ids that follow the final hidden state `[d]` of one row (greedy); a free
        string that is not one token becomes ids by `respell`, as in `decoding.FreeRule`."""
        if mode == "lm_head":
            return [int(self.lm.lm_head(hidden).argmax())]
        if mode == "vocab":
            row = self.choose(hidden, constrained=True, beam=beam)
            return [self.spelling.token_for_row(row.tolist())]
        if mode == "free":
            return self.respeller.ids_for_row(self.choose(hidden, beam=beam).tolist(), respell)
        raise ValueError(f"mode={mode!r}; choose 'free', 'vocab' or 'lm_head'.")

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, mode: Mode = "free",
                 beam: int = 1, respell: str = "device") -> list[list[int]]:
        """New token ids for each prompt (ending with the EOS id if one was produced); `beam`
        strings per step where the decoder searches, `respell` as in `decoding.FreeRule`."""
        outputs = []
        for prompt in prompts:
            if not prompt:
                raise ValueError("every prompt needs at least one token; got an empty prompt.")
            step = self.lm.model(input_ids=torch.tensor([list(prompt)]), use_cache=True)
            new: list[int] = []
            while len(new) < max_new_tokens:
                ids = self.next_ids(step.last_hidden_state[0, -1], mode, beam, respell)
                new += ids
                if self.eos_ids.intersection(ids):
                    break
                step = self.lm.model(input_ids=torch.tensor([ids]), cache=step.cache,
                                     use_cache=True)
            outputs.append(new[:max_new_tokens])
        return outputs
