"""How fast the streamed reader makes training rows, against what the training step consumes.

    python bench/stream.py [--preset=smollm2] [--batches=200] [--hosts=1]

Builds the preset's training data (`spellm_jax.data.training_data`: its sources, lanes and
tokenizer) and times `--batches` global batches (each of `--hosts` simulated hosts makes its
slice), reporting tokens/s and the growth of the process's peak memory while streaming. Set
`--step_tokens_per_s` to the training step's throughput (`bench/distill.py`, or the trainer's
`tok_s`) to print the ratio. Writes bench/results/stream.{json,md}.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.decode import machine, save_results
from configs.llama import get_config
from spellm_jax import runs


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--hosts", type=int, default=1)
    parser.add_argument("--step_tokens_per_s", type=float, default=0.0)
    args = parser.parse_args()
    from spellm_jax.data import training_data

    config = get_config(args.preset)
    teacher = runs.load_teacher(config)
    hosts = [training_data(config, teacher.tokenizer, teacher.source, None, p, args.hosts).batches
             for p in range(args.hosts)]
    for host in hosts:  # the first batch opens every lane's first document
        host.next()
    before, start = peak_rss_mib(), time.perf_counter()
    for _ in range(args.batches):
        for host in hosts:
            host.next()
    seconds = time.perf_counter() - start
    tokens = args.batches * config.train.batch_size * config.train.seq_len
    result = {"machine": machine(), "preset": args.preset, "corpora": list(config.data.corpora),
              "lanes_per_slot": config.data.lanes, "batch_size": config.train.batch_size,
              "seq_len": config.train.seq_len, "hosts": args.hosts, "batches": args.batches,
              "tokens_per_s": tokens / seconds, "peak_rss_growth_mib": peak_rss_mib() - before,
              "step_tokens_per_s": args.step_tokens_per_s or None}
    ratio = (f"{result['tokens_per_s'] / args.step_tokens_per_s:.0f}x"
             if args.step_tokens_per_s else "-")
    table = (f"Machine: {result['machine']}.\n\n"
             "| preset | sources | lanes per slot | rows x tokens | reader tokens / s | training step "
             "tokens / s | reader / step | peak memory growth while streaming |\n"
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |\n"
             f"| {args.preset} | {', '.join(config.data.corpora)} | {config.data.lanes} | "
             f"{config.train.batch_size} x {config.train.seq_len} | {result['tokens_per_s']:,.0f} | "
             f"{args.step_tokens_per_s or '-'} | {ratio} | "
             f"{result['peak_rss_growth_mib']:.1f} MiB |\n")
    save_results("stream", result, table)


if __name__ == "__main__":
    main()
