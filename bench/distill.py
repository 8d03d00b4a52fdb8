"""Distillation step throughput against the teacher's forward pass, on the bundled SmolLM2.

    python bench/distill.py [--batch=16] [--seq_len=128] [--repeats=5] [--kinds independent chain]

One run, one machine, one compiled dtype (the preset's): tokens/s of the teacher's forward pass
(backbone, LM-head logits at every position and their argmax: what choosing the next token
costs) and of the trainer's own jitted train step (`trainer.prepare`: loss, gradients, AdamW) for
each trainable set (`heads`, `top_layers`, `full`) and decoder kind, at the same batch and
sequence length, on real held-out text. Repeats are interleaved; the table shows each mode's
median and the median of each repeat's ratio to the teacher's forward. `--no_save_targets` times
the step that recomputes the teacher in its backward pass (the pod presets' choice). A second
table breaks a heads step down: the backbone over the batch, and per loss chunk the teacher's
logits, its argmax (what the forward adds to them), the soft targets and each decoder's forward
and backward pass, each jitted alone.
Writes bench/results/distill.{json,md}.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.decode import RESULTS, machine
from configs.llama import get_config
from spellm_jax import sharding, trainer
from spellm_jax.losses import LossConfig
from spellm_jax.pretrained import load_source
from spellm_jax.runs import distill_spec
from spellm_jax.spelling import SpellingTable

TRAINABLE = ("heads", "top_layers", "full")


def text_batch(tokenizer, batch: int, length: int) -> np.ndarray:
    """`[batch, length]` token ids of held-out Wikipedia text, packed."""
    from spellm_jax.data.corpora import load_corpora

    documents = load_corpora(("wiki",), "heldout")
    ids = [i for doc in documents.values() for i in tokenizer.encode(doc)]
    if len(ids) < batch * length:
        raise SystemExit(f"held-out text has {len(ids)} tokens; lower --batch or --seq_len.")
    return np.asarray(ids[:batch * length], np.int32).reshape(batch, length)


def step_timer(config, teacher, spelling, mesh, input_ids) -> Callable[[], float]:
    """One train step of `config` (a fresh state, re-run from the same state each call)."""
    heads = trainer.heads_config(config, spelling.k, spelling.num_symbols)
    setup = trainer.prepare(config, teacher, spelling, heads, mesh)
    batch = jax.device_put({"input_ids": jnp.asarray(input_ids),
                            "loss_mask": jnp.ones(input_ids.shape, bool)}, setup.batch_sharding)
    state = setup.state
    step = setup.step_fn.lower(state, setup.teacher_params, setup.rest, batch).compile()

    def run() -> float:
        fresh = jax.block_until_ready(jax.tree.map(jnp.copy, state))  # the step donates it
        start = time.perf_counter()
        jax.block_until_ready(step(fresh, setup.teacher_params, setup.rest, batch))
        return time.perf_counter() - start

    return run


def forward_timer(config, teacher, spelling, mesh, input_ids) -> Callable[[], float]:
    """The teacher's forward pass and next-token argmax at every position."""
    heads = trainer.heads_config(config, spelling.k, spelling.num_symbols)
    _, graphdef, params, rest, _ = trainer.build_student(config, teacher, spelling, heads, 0)
    params = jax.device_put(params, sharding.shardings_of(params, mesh))
    rest = jax.device_put(rest, sharding.shardings_of(rest, mesh))

    @jax.jit
    def forward(params, rest, ids):
        model = nnx.merge(graphdef, params, rest)
        return jnp.argmax(model.lm_logits(model.model(ids)[0]), axis=-1)

    ids = jnp.asarray(input_ids)
    compiled = forward.lower(params, rest, ids).compile()
    return functools.partial(_seconds, compiled, params, rest, ids)


def chunk_timers(config, teacher, spelling, mesh, input_ids) -> dict[str, Callable[[], float]]:
    """The parts of a heads step (see the module docstring), each compiled on its own."""
    heads = trainer.heads_config(config, spelling.k, spelling.num_symbols)
    _, graphdef, params, rest, _ = trainer.build_student(config, teacher, spelling, heads, 0)
    params = jax.device_put(params, sharding.shardings_of(params, mesh))
    rest = jax.device_put(rest, sharding.shardings_of(rest, mesh))
    loss: LossConfig = distill_spec(config).loss

    def model(p):
        return nnx.merge(graphdef, p, rest)

    ids = jnp.asarray(input_ids)
    hidden = jax.jit(lambda p: model(p).model(ids)[0][:, :loss.chunk_size])(params)

    def teacher_side(p, h):  # the loss's teacher half: logits, argmax, softmax, soft targets
        m = model(p)
        scaled = jnp.where(m.spelling.valid[...], m.lm_logits(h) / loss.temperature, -jnp.inf)
        rows = m.spelling.rows_of(jnp.argmax(scaled, -1)[..., None])
        weights = jnp.exp(scaled - jnp.max(scaled, -1, keepdims=True))
        return m.char_heads.soft_targets(weights, rows, m.spelling), rows

    targets, rows = jax.jit(teacher_side)(params, hidden)

    def decoder_loss(p, h):
        log_probs = jax.nn.log_softmax(model(p).char_heads.logits(h, rows), axis=-1)
        return -jnp.sum(jnp.where(targets > 0, targets * log_probs, 0.0))

    parts = {"backbone (whole batch)": (lambda p, h: model(p).model(ids)[0]),
             "teacher logits": lambda p, h: model(p).lm_logits(h),
             "teacher logits + argmax": lambda p, h: jnp.argmax(model(p).lm_logits(h), -1),
             "teacher logits + soft targets": teacher_side,
             "decoder forward": decoder_loss,
             "decoder forward + backward": jax.grad(decoder_loss)}
    timers = {}
    for name, part in parts.items():
        compiled = jax.jit(part).lower(params, hidden).compile()
        timers[name] = functools.partial(_seconds, compiled, params, hidden)
    return timers


def _seconds(compiled, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - start


def interleaved(timers: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Each timer's seconds over `repeats` rounds (after one warm-up round), in alternating
    order."""
    seconds: dict[str, list[float]] = {name: [] for name in timers}
    for repeat in range(repeats + 1):
        names = list(timers) if repeat % 2 else list(timers)[::-1]
        for name in names:
            elapsed = timers[name]()
            if repeat:
                seconds[name].append(elapsed)
    return seconds


def breakdown(base, teacher, spelling, mesh, input_ids, args, report, rows) -> list[str]:
    """The heads step's parts for each kind (into `report["breakdown"]`), as markdown lines."""
    chunks = args.seq_len // min(base.loss.chunk_size, args.seq_len)
    lines = ["", f"Where a heads step's time goes (ms, medians of {args.repeats} interleaved "
             f"repeats; per step = per chunk x {chunks} chunks):", "",
             "| part | kind | ms | per step | share of the heads step |",
             "| --- | --- | ---: | ---: | ---: |"]
    for kind in args.kinds:
        config = base.copy_and_resolve_references()
        config.train.trainable, config.heads.kind = "heads", kind
        step_ms = 1e3 * args.batch * args.seq_len / rows[f"heads step, {kind}"]["tokens_per_s"]
        parts = {name: statistics.median(times) * 1e3 for name, times in interleaved(
            chunk_timers(config, teacher, spelling, mesh, input_ids), args.repeats).items()}
        report["breakdown"][kind] = parts
        for name, ms in parts.items():
            per_step = ms * (1 if name.startswith("backbone") else chunks)
            lines.append(f"| {name} | {kind} | {ms:.0f} | {per_step:.0f} | "
                         f"{per_step / step_ms:.0%} |")
        lines.append(f"| heads step | {kind} | | {step_ms:.0f} | 100% |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kinds", nargs="+", default=["independent", "chain"])
    parser.add_argument("--trainable", nargs="+", default=list(TRAINABLE), choices=TRAINABLE)
    parser.add_argument("--no_save_targets", action="store_true")
    args = parser.parse_args()

    base = get_config("smollm2").unlock()
    base.train.batch_size, base.train.seq_len = args.batch, args.seq_len
    base.loss.save_targets = not args.no_save_targets
    teacher = load_source(base.teacher)
    spelling = SpellingTable.from_tokenizer(teacher.tokenizer, base.heads.k,
                                            teacher.config.vocab_size)
    mesh = sharding.make_mesh(base.mesh.shape)
    input_ids = text_batch(teacher.tokenizer, args.batch, args.seq_len)
    timers = {"teacher forward": forward_timer(base, teacher, spelling, mesh, input_ids)}
    for trainable in args.trainable:
        for kind in args.kinds:
            config = base.copy_and_resolve_references()
            config.train.trainable, config.heads.kind = trainable, kind
            timers[f"{trainable} step, {kind}"] = step_timer(config, teacher, spelling, mesh,
                                                             input_ids)
    seconds = interleaved(timers, args.repeats)
    tokens = args.batch * args.seq_len
    forward = seconds["teacher forward"]
    rows = {name: {"tokens_per_s": tokens / statistics.median(times),
                   "vs_teacher_forward": statistics.median(
                       f / t for f, t in zip(forward, times, strict=True)),
                   "seconds": times}
            for name, times in seconds.items()}
    report = {"machine": machine(), "batch": args.batch, "seq_len": args.seq_len,
              "dtype": base.model.dtype, "loss_chunk": base.loss.chunk_size,
              "save_targets": base.loss.save_targets, "repeats": args.repeats, "modes": rows}
    lines = ["# Distillation step throughput", "",
             f"Machine: {report['machine']}. Batch {args.batch} x {args.seq_len} tokens of "
             f"held-out text, loss chunk {base.loss.chunk_size}, save_targets="
             f"{base.loss.save_targets}; medians of {args.repeats} interleaved repeats.", "",
             "| mode | tokens/s | x teacher forward |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {row['tokens_per_s']:.0f} | {row['vs_teacher_forward']:.2f} |"
              for name, row in rows.items()]
    report["breakdown"] = {}
    if "heads" in args.trainable:
        lines += breakdown(base, teacher, spelling, mesh, input_ids, args, report, rows)
    RESULTS.mkdir(exist_ok=True)
    suffix = "_recompute" if args.no_save_targets else ""
    (RESULTS / f"distill{suffix}.json").write_text(json.dumps(report, indent=1))
    (RESULTS / f"distill{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
