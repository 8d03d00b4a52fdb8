"""The lm-evaluation-harness model `spellm_jax`: a trained run's SpeLLM (or its teacher).

    python -m spellm_jax.benchmarks.harness --model spellm_jax \
        --model_args workdir=DIR,mode=free --tasks hellaswag ...

(lm-eval's own command line with this model registered: lm-eval 0.4.13 finds models only in
its registry, so plain `lm_eval` must import this module first.) From Python, importing this
module registers the model for `lm_eval.simple_evaluate(model="spellm_jax", ...)`.

`mode`: `free` or `vocab` (the SpeLLM's character decoder, free or vocabulary-constrained
decoding; `beam=B` strings for the chain kind) or `lm_head` (the teacher). Log-likelihoods come
from `scoring` (for the SpeLLM, its decoder's distribution over the vocabulary, whichever the
mode); `is_greedy` and `generate_until` follow the mode. Needs `pip install lm-eval==0.4.13`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from spellm_jax import decoding, tokenizers
from spellm_jax.benchmarks.models import RunModels, load_run
from spellm_jax.benchmarks.scoring import DEFAULT_BATCH, Pair, encode_pair, score_pairs
from spellm_jax.spelling import Respeller

MODES = ("free", "vocab", "lm_head")
DEFAULT_MAX_GEN_TOKS = 256


def generate_ids(run: RunModels, mode: str, prompts: Sequence[Sequence[int]], max_new_tokens: int
                 ) -> list[list[int]]:
    """Greedy new token ids for each prompt, in `mode` (the SpeLLM with the run's beam)."""
    model = run.teacher if mode == "lm_head" else run.spellm
    rule = decoding.rule_for(mode, respeller=Respeller(run.spelling, run.tokenizer), beam=run.beam)
    return decoding.generate(model, prompts, max_new_tokens, rule,
                             eos_ids=list(model.config.eos_token_ids),
                             pad_id=tokenizers.pad_id(run.tokenizer)).tokens


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to the earliest of the stop strings (all of it when none occurs)."""
    ends = [text.find(stop) for stop in stops if stop and stop in text]
    return text[:min(ends)] if ends else text


@register_model("spellm_jax")
class SpeLLMHarnessModel(LM):
    """A SpeLLM run for lm-evaluation-harness: `loglikelihood`, `loglikelihood_rolling` and
    `generate_until` (greedy; stop strings and `max_gen_toks` honoured)."""

    def __init__(self, workdir: str | None = None, mode: str = "free", beam: int | str = 1,
                 batch_size: int | str = DEFAULT_BATCH, run: RunModels | None = None,
                 **ignored: Any):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; choose one of {', '.join(MODES)}.")
        if (workdir is None) == (run is None):
            raise ValueError("pass model_args workdir=DIR (a training workdir or checkpoint).")
        self.run = run or load_run(workdir, int(beam))
        self.mode = mode
        self.batch_size = DEFAULT_BATCH if batch_size in (None, "auto") else int(batch_size)
        backends = self.run.backends()
        self.backend = backends["teacher" if mode == "lm_head" else "spellm"]
        self.greedy_mode = mode

    @property
    def tokenizer_name(self) -> str:
        return self.run.tokenizer.name_or_path.replace("/", "__")

    def _scores(self, pairs: list[Pair], desc: str) -> tuple[list[float], list[bool]]:
        scores = score_pairs(self.backend, pairs, self.batch_size, self.run.max_length, desc)
        return scores.log_prob.tolist(), scores.greedy[self.greedy_mode].tolist()

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.run.tokenizer, *request.args) for request in requests]
        log_probs, greedy = self._scores(pairs, None if disable_tqdm else "loglikelihood")
        return list(zip(log_probs, greedy, strict=True))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        tokenizer = self.run.tokenizer
        prefix = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
        pairs, owners = [], []
        for n, request in enumerate(requests):
            ids = tokenizer(request.args[0], add_special_tokens=False)["input_ids"]
            for window in get_rolling_token_windows(ids, prefix, self.run.max_length, 1):
                context, continuation = make_disjoint_window(window)
                pairs.append(Pair(tuple(context), tuple(continuation)))
                owners.append(n)
        log_probs, _ = self._scores(pairs, None if disable_tqdm else "loglikelihood_rolling")
        totals = [0.0] * len(requests)
        for owner, log_prob in zip(owners, log_probs, strict=True):
            totals[owner] += log_prob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tqdm import tqdm

        tokenizer = self.run.tokenizer
        outputs: list[str | None] = [None] * len(requests)
        groups: dict[tuple[int, tuple[str, ...]], list[int]] = {}
        for n, request in enumerate(requests):
            _, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            groups.setdefault((max_new, tuple(until)), []).append(n)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm, leave=False)
        for (max_new, until), members in groups.items():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                keep = max(self.run.max_length - max_new - 1, 1)
                prompts = [tokenizer(requests[n].args[0], add_special_tokens=False)["input_ids"][-keep:]
                           or [tokenizer.eos_token_id] for n in chunk]
                for n, ids in zip(chunk, generate_ids(self.run, self.mode, prompts, max_new),
                                  strict=True):
                    text = tokenizer.decode(ids, skip_special_tokens=True)
                    outputs[n] = cut_at_stop(text, until)
                bar.update(len(chunk))
        bar.close()
        return outputs


def main() -> None:
    """lm-eval's command line, with `spellm_jax` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
