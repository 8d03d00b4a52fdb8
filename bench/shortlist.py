"""How much of the teacher a shortlist of word rows can hold, before any training.

    python bench/shortlist.py [--preset=smollm2] [--sizes 512 1024 2048 4096]

On the trainer's held-out set (the teacher's greedy continuations of the preset's held-out
prompts), keeps the teacher's logits of a shortlist's tokens only and decodes them as the chain
decoder does, greedily and with a beam of 4 (the teacher's exact conditionals over the shortlist:
what the shortlist of a chain decoder whose own logits added nothing would choose). Reports, per
shortlist size, how often the teacher's argmax is in the shortlist and how often those decoders
choose it, for shortlists of the training text's most frequent tokens (`heads.shortlist`) and of
the lowest token ids (the tokenizer's merge order). Writes bench/results/shortlist.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.decode import machine, save_results
from configs.llama import get_config
from spellm_jax import runs

BEAMS = (1, 4)


def heldout_teacher_logits(config, model, tokenizer) -> np.ndarray:
    """The teacher's logits `[P, V]` at the positions of the trainer's held-out set."""
    import jax.numpy as jnp

    from spellm_jax.data import evaluation_prompts
    from spellm_jax.trainer import heldout_sequences

    prompts = evaluation_prompts(config.data.corpora, tokenizer, config.data.eval_prompts,
                                 config.data.prompt_tokens, config.seed)
    rows, mask = heldout_sequences(model, prompts, config)
    logits = np.concatenate([np.asarray(model(jnp.asarray(rows[i:i + 8])))
                             for i in range(0, len(rows), 8)])
    return logits[mask]


def shortlist_choices(logits: np.ndarray, tokens: np.ndarray, spelling) -> dict[str, float]:
    """Agreement with the argmax of the chain ceiling over the shortlist `tokens` only."""
    import jax.numpy as jnp

    from spellm_jax.evaluation import chain_ceiling

    keep = np.zeros(logits.shape[-1], bool)
    keep[tokens] = True
    argmax = logits.argmax(-1)
    out = {"argmax_in_shortlist": float(keep[argmax].mean())}
    restricted = jnp.asarray(np.where(keep, logits, -np.inf))
    for beam in BEAMS:
        chosen = np.asarray(chain_ceiling(restricted, spelling, beam, constrained=False))
        out[f"beam{beam}"] = float((chosen == argmax).mean())
    return out


def markdown(report: dict) -> str:
    lines = [f"Machine: {report['machine']}.", f"Preset: {report['preset']}; "
             f"{report['positions']} held-out continuation positions.", "",
             "| shortlist | size | training tokens covered | teacher's argmax in it | "
             "exact conditionals over it, greedy | beam 4 |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["rows"]:
        lines.append(f"| {r['ranking']} | {r['size']} | {r['coverage']:.1%} | "
                     f"{r['argmax_in_shortlist']:.1%} | {r['beam1']:.1%} | {r['beam4']:.1%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    args = parser.parse_args()
    from spellm_jax.data import token_counts
    from spellm_jax.models.char_decoders.shortlist import most_frequent_tokens
    from spellm_jax.pretrained import build_model
    from spellm_jax.spelling import DeviceSpelling, SpellingTable

    start = time.time()
    config = get_config(args.preset)
    teacher = runs.load_teacher(config)
    model = build_model(teacher.config, runs.runtime_options(config), teacher.params)
    logits = heldout_teacher_logits(config, model, teacher.tokenizer)
    table = SpellingTable.from_tokenizer(teacher.tokenizer, config.heads.k, teacher.config.vocab_size)
    spelling = DeviceSpelling.of(table)
    counts = token_counts(config.data.corpora, teacher.tokenizer, table.vocab_size)
    by_id = np.flatnonzero(table.valid)
    report = {"machine": machine(), "preset": args.preset, "positions": len(logits), "rows": []}
    for size in args.sizes:
        for ranking, tokens in (("most frequent in the training text",
                                 np.asarray(most_frequent_tokens(counts, table, size))),
                                ("lowest ids", by_id[:size])):
            report["rows"].append({"ranking": ranking, "size": size,
                                   "coverage": float(counts[tokens].sum() / counts.sum()),
                                   **shortlist_choices(logits, tokens, spelling)})
            print(markdown(report), flush=True)
    report["seconds"] = time.time() - start
    save_results("shortlist", report, markdown(report))


if __name__ == "__main__":
    main()
