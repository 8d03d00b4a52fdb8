"""Benchmark scoring speed: documents per second for the teacher and the SpeLLM, side by side.

    python bench/benchmark_scoring.py [--workdir=workdir/smollm2] [--documents=48] [--repeats=5]

One run, one machine: the first `--documents` documents of each task are scored by
`spellm_jax.benchmarks.scoring.score_pairs` at the default batch (16 requests), with the teacher
(its LM head) and the SpeLLM (character heads: vocabulary scores and free choices) of the same
run. Everything is compiled once before timing; repeats are interleaved in alternating order, and
the table shows the median documents / s and continuation tokens / s of each, and the median
(and range) of each repeat's own SpeLLM / teacher time ratio. Writes
bench/results/benchmark_scoring.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.decode import machine, save_results
from spellm_jax.benchmarks.models import load_run
from spellm_jax.benchmarks.runner import DEFAULT_TASKS, prepare_task
from spellm_jax.benchmarks.scoring import DEFAULT_BATCH, score_pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="workdir/smollm2")
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    parser.add_argument("--documents", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=DEFAULT_BATCH)
    args = parser.parse_args()

    run = load_run(args.workdir)
    backends = run.backends()
    tasks = [prepare_task(name, run.tokenizer, args.documents) for name in args.tasks]
    pairs = {task.spec.name: task.pairs for task in tasks}

    def timed(name: str, task: str) -> float:
        start = time.perf_counter()
        score_pairs(backends[name], pairs[task], args.batch_size, run.max_length)
        return time.perf_counter() - start

    for task in pairs:  # compile every shape of every task, for both models
        for name in backends:
            timed(name, task)
    times = {task: {name: [] for name in backends} for task in pairs}
    for repeat in range(args.repeats):
        order = list(backends) if repeat % 2 == 0 else list(backends)[::-1]
        for task in pairs:
            for name in order:
                times[task][name].append(timed(name, task))

    report = {"machine": machine(), "workdir": args.workdir, "batch_size": args.batch_size,
              "repeats": args.repeats, "tasks": {}}
    lines = ["# Benchmark scoring speed", "", f"Machine: {report['machine']}.",
             f"Run: {args.workdir}; batch {args.batch_size}; first {args.documents} documents per "
             f"task; {args.repeats} interleaved repeats after compiling.", "",
             "| task | documents | requests | tokens scored | teacher docs / s | SpeLLM docs / s "
             "| teacher tokens / s | SpeLLM tokens / s | SpeLLM / teacher time | range |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for task in tasks:
        name = task.spec.name
        tokens = sum(len(p.context) + len(p.continuation) for p in task.pairs)
        median = {m: statistics.median(t) for m, t in times[name].items()}
        ratios = [s / t for s, t in zip(times[name]["spellm"], times[name]["teacher"], strict=True)]
        report["tasks"][name] = {"documents": len(task.items), "requests": len(task.pairs),
                                 "tokens": tokens, "seconds": times[name],
                                 "time_ratio_median": statistics.median(ratios)}
        lines.append(
            f"| {name} | {len(task.items)} | {len(task.pairs)} | {tokens} | "
            f"{len(task.items) / median['teacher']:.2f} | {len(task.items) / median['spellm']:.2f} | "
            f"{tokens / median['teacher']:.0f} | {tokens / median['spellm']:.0f} | "
            f"{statistics.median(ratios):.3f}x | {min(ratios):.3f} to {max(ratios):.3f} |")
    save_results("benchmark_scoring", report, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
