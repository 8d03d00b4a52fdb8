"""Score a trained SpeLLM beside its teacher on standard downstream tasks.

    python -m spellm_jax.benchmark --workdir=WORKDIR [--tasks=lambada,hellaswag,...] [--limit=N]
    python -m spellm_jax.benchmark --export=EXPORT_DIR --out=DIR     # the PyTorch export

Writes `results.json`, `summary.md` and `accuracy.png` into `--out` (default
`WORKDIR/benchmarks`). See `spellm_jax.benchmarks` for the tasks and the metrics.
"""

from __future__ import annotations

import time
from pathlib import Path

from absl import app, flags

from spellm_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training workdir (its latest checkpoint is scored).")
flags.DEFINE_string("checkpoint", None, "One checkpoint, WORKDIR/checkpoints/N (instead of --workdir).")
flags.DEFINE_string("export", None, "An exported SpeLLM directory, scored in PyTorch instead.")
flags.DEFINE_string("teacher", None, "With --export: the teacher (HF dir, .gguf, smollm2; default "
                    "the export's base_model).")
flags.DEFINE_string("out", None, "Where the reports go (default: WORKDIR/benchmarks).")
flags.DEFINE_list("tasks", ["lambada", "hellaswag", "arc_easy", "arc_challenge", "piqa",
                            "winogrande"], "Tasks to score.")
flags.DEFINE_integer("limit", None, "Score only the first N documents of each task.")
flags.DEFINE_integer("batch_size", 16, "Requests per scoring call.")
flags.DEFINE_integer("beam", 1, "Strings the SpeLLM's decoder searches for its greedy choices "
                     "(chain kind; 1: greedy).")


def main(argv: list[str]) -> None:
    del argv
    from spellm_jax.benchmarks import report
    from spellm_jax.benchmarks.runner import run_tasks
    from spellm_jax.benchmarks.tasks import check_task_names

    sources = [s for s in (FLAGS.workdir, FLAGS.checkpoint, FLAGS.export) if s]
    if len(sources) != 1:
        raise app.UsageError("pass exactly one of --workdir, --checkpoint and --export.")
    if FLAGS.export and not FLAGS.out:
        raise app.UsageError("--export needs --out (an export directory is not written into).")
    try:
        tasks = check_task_names(FLAGS.tasks)
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    source = sources[0]
    start = time.perf_counter()
    if FLAGS.export:
        from spellm_jax.benchmarks.torch_scoring import load_export

        run = load_export(source, FLAGS.teacher, FLAGS.beam)
    else:
        from spellm_jax.benchmarks.models import load_run

        run = load_run(source, FLAGS.beam)
    results = run_tasks(run.backends(), run.tokenizer, tasks, FLAGS.limit, FLAGS.batch_size,
                        run.max_length)
    results |= {"source": str(Path(source).resolve()), "backend": "torch" if FLAGS.export else "jax",
                "wall_seconds": time.perf_counter() - start}
    out = Path(FLAGS.out or Path(FLAGS.workdir or Path(source).parent.parent) / "benchmarks")
    limit = f", first {FLAGS.limit} documents per task" if FLAGS.limit else ""
    summary = report.write(results, out, f"Benchmarks: {source}{limit}")
    print(summary + f"\nwall time {results['wall_seconds']:.0f} s; wrote {out}/results.json, "
          "summary.md, accuracy.png")


if __name__ == "__main__":
    cli.run(main)
