"""Benchmark results as files: `results.json`, a markdown table `summary.md`, a bar chart PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from spellm_jax.benchmarks.metrics import reference_metric

LABELS = {
    "acc": "acc",
    "acc_norm": "acc_norm (per character)",
    "acc_free": "acc, SpeLLM free decoding",
    "perplexity": "perplexity",
    "bits_per_byte": "bits per byte",
}
LAST_WORD_ACC = "acc, greedy (teacher: LM head; SpeLLM: vocabulary-constrained)"
PERCENT = ("acc",)  # metrics shown as percentages (by prefix)


def _format(name: str, value: float, stderr: float | None = None, signed: bool = False) -> str:
    sign = "+" if signed else ""
    if name.startswith(PERCENT):
        spec, scale = ".1f", 100
    else:  # perplexities of a weak model run into the billions
        spec, scale = (".3f" if name == "bits_per_byte" else ".4g"), 1
    text = f"{value * scale:{sign}{spec}}"
    if stderr is not None:
        text += f" ± {stderr * scale:{spec}}"
    return text


def _label(kind: str, name: str) -> str:
    return LAST_WORD_ACC if kind == "last_word" and name == "acc" else LABELS.get(name, name)


def markdown(results: dict[str, Any], title: str) -> str:
    """One table: per task and metric, each model ± standard error and the gaps to the first."""
    models = results["models"]
    reference, others = models[0], models[1:]
    header = ["task", "docs", "metric", *models, *(f"{m} - {reference}" for m in others)]
    lines = [f"# {title}", "",
             "Accuracies in %, ± one standard error (gaps: paired over the same documents).", "",
             "| " + " | ".join(header) + " |",
             "| --- | ---: | --- | " + " | ".join("---:" for _ in header[3:]) + " |"]
    for task, entry in results["tasks"].items():
        names = list(entry["models"][models[-1]])
        for name in names:
            cells = []
            for model in models:
                metrics = entry["models"][model]
                metric = metrics[reference_metric(name, metrics)]
                cells.append(_format(name, metric["value"], metric["stderr"]))
            for model in others:
                gap = entry["gaps"][model].get(name)
                cells.append("-" if gap is None else _format(name, gap["value"], gap["stderr"], True))
            lines.append(f"| {task} | {entry['documents']} | {_label(entry['kind'], name)} | "
                         + " | ".join(cells) + " |")
    lines += ["", "Scoring time (s) and documents per second:", "",
              "| task | requests | " + " | ".join(models) + " |",
              "| --- | ---: | " + " | ".join("---:" for _ in models) + " |"]
    for task, entry in results["tasks"].items():
        cells = [f"{entry['seconds'][m]:.1f} ({entry['documents'] / entry['seconds'][m]:.1f}/s)"
                 for m in models]
        lines.append(f"| {task} | {entry['requests']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _primary(entry: dict[str, Any]) -> list[str]:
    """The accuracies a chart shows for a task: acc_norm where it is defined, else acc; LAMBADA
    also free decoding."""
    names = entry["models"][next(reversed(entry["models"]))]
    if "acc_norm" in names:
        return ["acc_norm"]
    return [name for name in names if name.startswith("acc")]


def bar_chart(results: dict[str, Any], path: Path, title: str) -> None:
    """Grouped bars, one group per task metric, one bar per model, with standard-error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib import pyplot as plt

    models = results["models"]
    groups = [(task, name) for task, entry in results["tasks"].items() for name in _primary(entry)]
    width = 0.8 / len(models)
    figure, axes = plt.subplots(figsize=(max(6, 1.3 * len(groups)), 3.8))
    for m, model in enumerate(models):
        values, errors = [], []
        for task, name in groups:
            metrics = results["tasks"][task]["models"][model]
            metric = metrics[reference_metric(name, metrics)]
            values.append(metric["value"])
            errors.append(metric["stderr"])
        axes.bar(np.arange(len(groups)) + (m - (len(models) - 1) / 2) * width, values, width,
                 yerr=errors, capsize=3, label=model)
    axes.set_xticks(np.arange(len(groups)),
                    [f"{task}\n{name.replace('acc_free', 'acc (free)')}" for task, name in groups],
                    fontsize=8)
    axes.set(ylabel="accuracy", ylim=(0, 1), title=title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write(results: dict[str, Any], out: Path, title: str) -> str:
    """Writes `results.json`, `summary.md` and `accuracy.png` into `out`; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    summary = markdown(results, title)
    (out / "summary.md").write_text(summary)
    bar_chart(results, out / "accuracy.png", title)
    return summary
