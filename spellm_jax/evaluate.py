"""Evaluate a trained SpeLLM against its teacher on held-out data.

    python -m spellm_jax.evaluate --workdir=WORKDIR [--checkpoint=WORKDIR/checkpoints/N]

Writes `metrics.json`, `summary.md`, `head_accuracy.png` and `agreement_vs_k.png` into `--out`
(default `WORKDIR/eval`). See `spellm_jax.evaluation` for what each figure means.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from absl import app, flags

from spellm_jax import cli
from spellm_jax.evaluation import CHAIN_BEAMS, CONFIDENT

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training workdir (its latest checkpoint is evaluated).")
flags.DEFINE_string("checkpoint", None, "One checkpoint, WORKDIR/checkpoints/N (instead of --workdir).")
flags.DEFINE_string("out", None, "Where the reports go (default: WORKDIR/eval).")
flags.DEFINE_integer("last_word_items", 500, "Items of the last-word completion task.")
flags.DEFINE_integer("prompts", 32, "Held-out prompts continued greedily by teacher and SpeLLM.")
flags.DEFINE_integer("new_tokens", 32, "Tokens per greedy continuation.")
flags.DEFINE_integer("real_text_rows", 16, "Teacher-forced rows of held-out real text.")
flags.DEFINE_integer("beam", 1, "Strings the SpeLLM's decoder searches per step (chain kind).")
flags.DEFINE_enum("respell", "device", ["device", "tokenizer"],  # spelling.RESPELL_MODES
                  "Free decoding's strings that are not one token: greedy longest match on "
                  "device, or the tokenizer's ids on the host.")
flags.DEFINE_list("ceiling_ks", ["4", "6", "8", "12", "16", "24"],
                  "k values at which the independence ceiling is computed.")

_SETS = (("real_text", "held-out real text"), ("continuations", "teacher's greedy continuations"))
_ROWS = (  # (key, label, format)
    ("free_agreement", "agreement with the teacher's argmax, free decoding", "{:.1%}"),
    ("vocab_agreement", "agreement, vocabulary-constrained", "{:.1%}"),
    ("ceiling_free_agreement", "independence ceiling (exact marginals), free", "{:.1%}"),
    ("ceiling_vocab_agreement", "independence ceiling, vocabulary-constrained", "{:.1%}"),
    *((f"chain_ceiling/{mode}_beam{beam}",
       f"chain ceiling (exact conditionals), {label}, beam {beam}", "{:.1%}")
      for beam in CHAIN_BEAMS for mode, label in (("free", "free"), ("vocab", "trie-constrained"))),
    ("word_row_share", "teacher's argmax among the word rows (the shortlist)", "{:.1%}"),
    ("free_agreement_word_rows", "agreement, free, where it is", "{:.1%}"),
    ("free_agreement_spelled", "agreement, free, where the chain must spell it", "{:.1%}"),
    ("exact_token_accuracy", "exact-token accuracy (every symbol to the end of the token)", "{:.1%}"),
    ("representable_share", "teacher tokens the table spells as one token (free ceiling)",
     "{:.1%}"),
    ("spellm_bits_per_byte", "SpeLLM bits per byte (renormalised over the vocabulary)", "{:.3f}"),
    ("teacher_bits_per_byte", "teacher bits per byte", "{:.3f}"),
    ("one_token_share", "emitted strings that are one token", "{:.1%}"),
    ("several_tokens_share", "emitted strings that are several tokens", "{:.1%}"),
    ("unusable_share", "emitted strings that are unusable", "{:.1%}"),
    ("respell_modes_differ_share", "emitted strings the two respell modes segment differently",
     "{:.1%}"),
    ("mean_input_tokens_per_step", "mean input tokens per step", "{:.3f}"),
    ("free_median_matching_prefix", "median tokens before diverging from the teacher, free", "{:g}"),
    ("vocab_median_matching_prefix", "the same, vocabulary-constrained", "{:g}"),
    ("positions", "positions", "{}"),
)


def _lookup(group: dict[str, Any], key: str) -> Any:
    """`group[a][b]` for a key `a/b`, `group[key]` otherwise; None where absent."""
    for part in key.split("/"):
        if not isinstance(group, dict) or part not in group:
            return None
        group = group[part]
    return group


def _confidence_table(metrics: dict[str, Any]) -> list[str]:
    """Agreement by the teacher's top-token probability, one row per bin and set."""
    lines = ["", "Agreement by the teacher's confidence (its top token's probability p), free "
             "decoding beside the exact conditionals decoded greedily and the exact marginals:", "",
             "| positions | p | share | SpeLLM free | chain ceiling, greedy | independence ceiling |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for name, label in _SETS:
        for row in metrics[name]["by_teacher_confidence"]:
            low, high = row["teacher_top_prob"]
            cells = ["-" if row[key] is None else f"{row[key]:.1%}" for key in
                     ("free_agreement", "chain_ceiling_greedy", "independence_ceiling")]
            lines.append(f"| {label} | {low:g}-{high:g} | {row['share']:.1%} | "
                         + " | ".join(cells) + " |")
    for name, label in _SETS:
        misses = metrics[name]["confident_misses"]
        lines += ["", f"Misses where the teacher gives its token p >= {CONFIDENT:g} ({label}): "
                  f"{misses['misses']} of {misses['positions']} positions; first wrong symbol "
                  f"(index: misses) {_nonzero(misses['first_wrong_symbol'])}; for example "
                  + ", ".join(f"{t!r} -> {s!r}" for _, t, s in misses["examples"]) + "."]
    return lines


def _nonzero(counts: list[int]) -> str:
    return ", ".join(f"{index}: {count}" for index, count in enumerate(counts) if count) or "none"


def markdown_summary(metrics: dict[str, Any], source: str) -> str:
    """The figures of `metrics` as markdown tables."""
    lines = [f"# SpeLLM evaluation: {source}", "", f"k = {metrics['k']} character heads.", "",
             "| metric | " + " | ".join(label for _, label in _SETS) + " |",
             "| --- | " + " | ".join("---:" for _ in _SETS) + " |"]
    for key, label, fmt in _ROWS:
        cells = [fmt.format(value) if (value := _lookup(metrics[name], key)) is not None else "-"
                 for name, _ in _SETS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    last_word = metrics["last_word"]
    beam = metrics["settings"]["beam"]
    search = "greedy" if beam == 1 else f"beam {beam}"
    lines += ["", f"Last-word completion ({last_word['items']} items from held-out text, {search}):",
              "", "| teacher (LM head) | SpeLLM free | SpeLLM vocabulary-constrained |",
              "| ---: | ---: | ---: |",
              f"| {last_word['teacher_accuracy']:.1%} | {last_word['free_accuracy']:.1%} | "
              f"{last_word['vocab_accuracy']:.1%} |",
              *_confidence_table(metrics),
              "", "Independence ceiling against k (teacher's continuations):", "",
              "| k | free | vocabulary-constrained |", "| ---: | ---: | ---: |"]
    for k, ceiling in metrics["ceiling_against_k"].items():
        lines.append(f"| {k} | {ceiling['free']:.1%} | {ceiling['vocab']:.1%} |")
    return "\n".join(lines) + "\n"


def write_plots(metrics: dict[str, Any], out: Path) -> None:
    """`head_accuracy.png` (per-head symbol accuracy) and `agreement_vs_k.png` (the ceiling
    against k, with this model's agreement at its k)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    for name, label in _SETS:
        accuracy = metrics[name]["head_accuracy"]
        axes.plot(range(1, len(accuracy) + 1), accuracy, marker="o", label=label)
    axes.set(xlabel="head (symbol position)", ylabel="symbol accuracy", ylim=(0, 1.02),
             title="Per-head accuracy against the teacher's argmax")
    axes.legend()
    figure.tight_layout()
    figure.savefig(out / "head_accuracy.png", dpi=120)
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(6, 3.5))
    ks = [int(k) for k in metrics["ceiling_against_k"]]
    for mode in ("free", "vocab"):
        axes.plot(ks, [metrics["ceiling_against_k"][str(k)][mode] for k in ks], marker="o",
                  label=f"independence ceiling, {mode}")
        axes.scatter([metrics["k"]], [metrics["continuations"][f"{mode}_agreement"]], marker="*",
                     s=150, zorder=3, label=f"this SpeLLM, {mode}")
    axes.set(xlabel="k (character heads)", ylabel="agreement with the teacher", ylim=(0, 1.02),
             title="Agreement on the teacher's continuations against k")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "agreement_vs_k.png", dpi=120)
    plt.close(figure)


def main(argv: list[str]) -> None:
    del argv
    from spellm_jax.evaluation import EvalSettings, evaluate
    from spellm_jax.runs import load_for_inference
    from spellm_jax.spelling import Respeller

    if bool(FLAGS.workdir) == bool(FLAGS.checkpoint):
        raise app.UsageError("pass exactly one of --workdir and --checkpoint.")
    source = FLAGS.checkpoint or FLAGS.workdir
    run = load_for_inference(source)
    config = run.config
    settings = EvalSettings(
        corpora=tuple(config.data.corpora), prompts=FLAGS.prompts, new_tokens=FLAGS.new_tokens,
        prompt_tokens=config.data.prompt_tokens, real_text_rows=FLAGS.real_text_rows,
        last_word_items=FLAGS.last_word_items, ceiling_ks=tuple(map(int, FLAGS.ceiling_ks)),
        beam=FLAGS.beam, respell=FLAGS.respell, seed=config.seed)
    metrics = evaluate(run.spellm, run.teacher, Respeller(run.spelling, run.tokenizer), settings)
    metrics["source"] = str(Path(source).resolve())
    out = Path(FLAGS.out or Path(FLAGS.workdir or Path(source).parent.parent) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    summary = markdown_summary(metrics, source)
    (out / "summary.md").write_text(summary)
    write_plots(metrics, out)
    print(summary + f"\nwrote {out}/metrics.json, summary.md, head_accuracy.png, agreement_vs_k.png")


if __name__ == "__main__":
    cli.run(main)
