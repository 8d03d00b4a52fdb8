"""Decoding speed of SpeLLM against the ordinary LM head, and against transformers' PyTorch.

    python bench/decode.py [--checkpoint DIR [DIR ...]] [--beams 1 4] [--repeats=9] [--batches 1 8]

One run, one machine: greedy decoding of 128 new tokens after 64-token prompts (held-out text),
at batch 1 and 8, with the LM head, and SpeLLM free and vocabulary-constrained decoding of every
checkpoint given (each decoder kind; the chain kind also with each beam width), in the same
compiled loop (`spellm_jax.decoding.generate` on `fused_for_inference(model)`), and transformers'
`generate` on the first checkpoint's weights; at batch 1 also the LM head on the model before
fusion. Repeats are interleaved, in alternating order; a repeat's
per-token time is (time for 128 new tokens - median time for 1) / 127, so prefill is not counted.
The table shows medians over repeats, the median and range of each repeat's own ratio to the
LM head, and the fastest repeat of each mode. Then a head-only micro-benchmark and a FLOPs/bytes
table. Writes bench/results/decode.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spellm_jax import decoding, tokenizers
from spellm_jax.models.char_decoders import HeadsConfig
from spellm_jax.models.char_decoders.independent import head_cost
from spellm_jax.models.config import ModelConfig
from spellm_jax.spelling import Respeller

PROMPT_TOKENS, NEW_TOKENS, BATCHES = 64, 128, (1, 8)
RESULTS = Path(__file__).resolve().parent / "results"
# Public shapes for the FLOPs table; C is the SpeLLM alphabet of each tokenizer (k = 16).
SHAPES = {
    "SmolLM2-135M": (ModelConfig(49152, 576, 1536, 30, 9, 3, 64, tie_word_embeddings=True), 274),
    "Llama-3.2-1B": (ModelConfig(128256, 2048, 8192, 16, 32, 8, 64, tie_word_embeddings=True), 514),
    "Llama-3.1-8B": (ModelConfig(128256, 4096, 14336, 32, 32, 8, 128), 514),
}


def save_results(name: str, report: dict, markdown_text: str) -> None:
    """`bench/results/NAME.json` and `NAME.md`, and the markdown on stdout."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2))
    (RESULTS / f"{name}.md").write_text(markdown_text)
    print(markdown_text)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    import torch

    return (f"{cpu}, {os.cpu_count()} cores visible; jax {jax.__version__} ({jax.default_backend()}), "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads); fp32")


def load(checkpoints: list[str]) -> list[tuple]:
    """`(model, tokenizer, spelling, source)` of each SpeLLM to time: trained checkpoints, else
    the bundled teacher with untrained decoders of both kinds (their speed, not their text)."""
    if checkpoints:
        from spellm_jax.runs import load_spellm

        return [(*load_spellm(path), path) for path in checkpoints]
    from configs.llama import get_config
    from spellm_jax.pretrained import build_spellm, load_source
    from spellm_jax.spelling import SpellingTable
    from spellm_jax.trainer import heads_config, shortlist_for

    teacher = load_source("smollm2")
    spelling = SpellingTable.from_tokenizer(teacher.tokenizer, 16, teacher.config.vocab_size)
    preset = get_config("smollm2")  # the chain decoder as the default run trains it
    chain = heads_config(preset, 16, spelling.num_symbols,
                         shortlist_for(preset, teacher.tokenizer, spelling))
    return [(build_spellm(teacher, spelling, heads), teacher.tokenizer, spelling,
             f"smollm2 with untrained {heads.kind} heads")
            for heads in (HeadsConfig(16, spelling.num_symbols), chain)]


def torch_model(model, tokenizer, spelling):
    """transformers' model holding the same backbone weights (via the exporter)."""
    from transformers import AutoModelForCausalLM

    from spellm_jax.export import export_spellm

    with tempfile.TemporaryDirectory() as tmp:
        out = export_spellm(model, tokenizer, spelling, Path(tmp) / "export", base_model="bench")
        return AutoModelForCausalLM.from_pretrained(out).eval()


# Free decoding respells strings that are not one token on device (the default) or, as before
# that existed, through the tokenizer on the host (a round trip per such step).
SPELLM_MODES = (("free", "device"), ("free", "tokenizer"), ("vocab", "device"))


def spellm_modes(models: list, beams: list[int]):
    """`(name, model, spelling, mode, beam, respell)` of each SpeLLM mode to time: free (both
    respell modes) and vocab for every model, with each of `beams` for the chain kind (the kind
    that searches)."""
    for model, spelling in models:
        kind = model.heads_config.kind
        for beam in beams if kind == "chain" else [1]:
            for mode, respell in SPELLM_MODES:
                name = (f"{kind} {mode}" + (f" beam {beam}" if beam > 1 else "")
                        + (", tokenizer respell" if respell == "tokenizer" else ""))
                yield name, model, spelling, mode, beam, respell


def decode_timers(models: list, unfused, reference, tokenizer, prompts, beams: list[int]
                  ) -> dict[str, Callable[[int], dict]]:
    """Per mode, a function that decodes `n` new tokens for `prompts` and returns stats: the LM
    head on the first of `models` (and on `unfused`, unless None), each model's SpeLLM modes
    (`"chain free beam 4"`, ...) and transformers' `reference`."""
    import torch

    def jax_timer(rule, model):
        def run(n: int) -> dict:
            start = time.perf_counter()
            out = decoding.generate(model, prompts, n, rule)
            return {"seconds": time.perf_counter() - start, "host_round_trips": out.host_round_trips,
                    "tokens": sum(min(len(o), n) for o in out.tokens)}
        return run

    pad_id = tokenizers.pad_id(tokenizer)
    ids, mask = decoding.left_pad(prompts, pad_id, bucket=1)

    def torch_run(n: int) -> dict:
        start = time.perf_counter()
        with torch.no_grad():
            out = reference.generate(torch.as_tensor(ids, dtype=torch.long),
                                     attention_mask=torch.as_tensor(mask, dtype=torch.long),
                                     max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                     pad_token_id=pad_id)
        return {"seconds": time.perf_counter() - start, "tokens": (out.shape[1] - ids.shape[1]) * len(ids)}

    timers = {"lm_head": jax_timer(decoding.LMHeadRule(), models[0][0])}
    for name, model, spelling, mode, beam, respell in spellm_modes(models, beams):
        rule = decoding.rule_for(mode, respeller=Respeller(spelling, tokenizer), beam=beam,
                                 respell=respell)
        timers[name] = jax_timer(rule, model)
    if unfused is not None:
        timers["lm_head_unfused"] = jax_timer(decoding.LMHeadRule(), unfused)
    return timers | {"torch": torch_run}


def time_decoding(timers: dict[str, Callable[[int], dict]], batch: int, repeats: int) -> dict:
    for run in timers.values():  # compile (and warm the caches) outside the timed repeats
        run(NEW_TOKENS)
        run(1)
    samples: dict[str, list[dict]] = {name: [] for name in timers}
    names = list(timers)
    for repeat in range(repeats):
        # Interleaved, in alternating order, so drift and neighbours' load hit every mode alike.
        for name in names if repeat % 2 == 0 else names[::-1]:
            run = timers[name]
            long = run(NEW_TOKENS)
            prefill = statistics.median(run(1)["seconds"] for _ in range(3))
            samples[name].append(long | {"per_token_s": (long["seconds"] - prefill)
                                         / (NEW_TOKENS - 1)})
    base = [r["per_token_s"] for r in samples["lm_head"]]
    results = {}
    for name, runs in samples.items():
        per_token = [r["per_token_s"] for r in runs]
        ratios = [b / t for b, t in zip(base, per_token, strict=True)]
        results[name] = {"per_token_ms": statistics.median(per_token) * 1e3,
                         "tokens_per_s": batch / statistics.median(per_token),
                         "speedup_vs_lm_head": statistics.median(ratios),
                         "speedup_range": [min(ratios), max(ratios)],
                         "best_per_token_ms": min(per_token) * 1e3,
                         "best_speedup_vs_lm_head": min(base) / min(per_token),
                         "host_round_trips": statistics.median(r.get("host_round_trips", 0)
                                                               for r in runs),
                         "all_per_token_ms": [t * 1e3 for t in per_token]}
    return results


def time_heads(models: list, batch: int, beams: list[int], iterations: int = 200) -> dict:
    """The output layer alone on random hidden states `[batch, d]`: LM head + argmax against
    each decoder's choice + lookup, free and vocabulary-constrained (and with each beam width
    where the decoder searches)."""
    first = models[0][0]
    hidden = jax.random.normal(jax.random.key(0), (batch, first.config.hidden_size))
    functions = {"lm_head": jax.jit(lambda h: jnp.argmax(first.lm_logits(h), axis=-1))}
    for name, model, _, mode, beam, respell in spellm_modes(models, beams):
        if respell == "tokenizer":  # the output layer alone never respells
            continue
        functions[name] = jax.jit(lambda h, m=model, c=mode == "vocab", b=beam: m.spelling.lookup(
            m.choose(h, constrained=c, beam=b)))
    timings: dict[str, list[float]] = {name: [] for name in functions}
    for fn in functions.values():
        fn(hidden).block_until_ready()
    for _ in range(iterations):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn(hidden).block_until_ready()
            timings[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e6 for name, t in timings.items()}


def flops_table(k: int = 16, context: int = 192) -> list[dict]:
    """Per decoded token at batch 1: multiply-adds of the backbone (with `context` keys), the LM
    head and the k linear heads, and the weight bytes each reads in bf16."""
    rows = []
    for name, (config, symbols) in SHAPES.items():
        d, hd = config.hidden_size, config.head_dim
        q, kv = config.num_heads * hd, config.num_kv_heads * hd
        layer = d * (q + 2 * kv) + q * d + 3 * d * config.intermediate_size
        backbone = config.num_layers * (layer + 2 * context * q)
        lm_head = d * config.vocab_size
        heads = head_cost(d, config.vocab_size, HeadsConfig(k, symbols))["heads_macs"]
        weights = config.num_layers * layer
        rows.append({"model": name, "backbone_macs": backbone, "lm_head_macs": lm_head,
                     "heads_macs": heads, "lm_head_share": lm_head / (backbone + lm_head),
                     "heads_share": heads / (backbone + heads),
                     "ideal_speedup": (backbone + lm_head) / (backbone + heads),
                     "backbone_weight_mb_bf16": 2 * weights / 1e6,
                     "lm_head_mb_bf16": 2 * lm_head / 1e6, "heads_mb_bf16": 2 * heads / 1e6})
    return rows


def markdown(report: dict) -> str:
    lines = [f"Machine: {report['machine']}.", f"Model: {report['model']}.", "",
             f"{report['repeats']} interleaved repeats. Median ms / token and tokens / s; \"vs LM "
             "head\" is the median (and range) of each repeat's own ratio; \"best\" is the fastest "
             "repeat of each mode (the least disturbed by the machine's neighbours).", "",
             "| batch | decoding | ms / token | tokens / s | vs LM head | range | best ms / token | "
             "best vs LM head | host round trips |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    labels = {"lm_head": "LM head (baseline)", "lm_head_unfused": "LM head, unfused q/k/v and gate/up",
              "torch": "transformers PyTorch (LM head)"}
    for batch, results in report["decoding"].items():
        for name, r in results.items():
            low, high = r["speedup_range"]
            lines.append(f"| {batch} | {labels.get(name, 'SpeLLM ' + name)} | {r['per_token_ms']:.2f} | "
                         f"{r['tokens_per_s']:.1f} | {r['speedup_vs_lm_head']:.3f}x | "
                         f"{low:.2f} to {high:.2f} | {r['best_per_token_ms']:.2f} | "
                         f"{r['best_speedup_vs_lm_head']:.3f}x | {r['host_round_trips']:g} |")
    lines += ["", "Output layer alone (median µs per call: LM head + argmax, each decoder's "
              "choice + lookup):", ""]
    for batch, r in report["heads_only_us"].items():
        if batch == next(iter(report["heads_only_us"])):
            lines += ["| batch | " + " | ".join(labels.get(n, n) for n in r) + " |",
                      "| ---: |" + " ---: |" * len(r)]
        lines.append(f"| {batch} | " + " | ".join(f"{us:.0f}" for us in r.values()) + " |")
    lines += ["", "Per decoded token, batch 1, 192 keys in the cache, k = 16 linear heads (MACs; "
              "weight MB read in bf16):", "",
              "| shape | backbone | LM head | heads | LM head share | ideal speed-up | "
              "backbone MB | LM head MB | heads MB |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["flops"]:
        lines.append(f"| {r['model']} | {r['backbone_macs'] / 1e6:.0f}M | {r['lm_head_macs'] / 1e6:.1f}M"
                     f" | {r['heads_macs'] / 1e6:.2f}M | {r['lm_head_share']:.1%} | "
                     f"{r['ideal_speedup']:.3f}x | {r['backbone_weight_mb_bf16']:.0f} | "
                     f"{r['lm_head_mb_bf16']:.0f} | {r['heads_mb_bf16']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", nargs="+", default=["workdir/smollm2"] if Path(
        "workdir/smollm2/spellm.json").exists() else [], help="trained SpeLLMs (default: the "
        "README's default run if present, else untrained decoders of both kinds on the bundled "
        "teacher)")
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 4],
                        help="beam widths for the chain kind")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    args = parser.parse_args()

    from spellm_jax.data import evaluation_prompts
    from spellm_jax.models.llama import fused_for_inference

    loaded = load(args.checkpoint)
    unfused, tokenizer, spelling, _ = loaded[0]
    reference = torch_model(unfused, tokenizer, spelling)
    models = [(fused_for_inference(model), spelling) for model, _, spelling, _ in loaded]
    pool = evaluation_prompts(("shakespeare", "wiki"), tokenizer, max(args.batches), PROMPT_TOKENS)
    report = {"machine": machine(), "model": "; ".join(source for *_, source in loaded),
              "prompt_tokens": PROMPT_TOKENS,
              "new_tokens": NEW_TOKENS, "repeats": args.repeats, "decoding": {},
              "heads_only_us": {}, "flops": flops_table()}
    for batch in args.batches:
        timers = decode_timers(models, unfused if batch == 1 else None, reference, tokenizer,
                               pool[:batch], args.beams)
        report["decoding"][str(batch)] = time_decoding(timers, batch, args.repeats)
        report["heads_only_us"][str(batch)] = time_heads(models, batch, args.beams)
        print(markdown(report), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "decode.json").write_text(json.dumps(report, indent=2))
    (RESULTS / "decode.md").write_text(markdown(report))
    print(f"wrote {RESULTS / 'decode.json'} and decode.md")


if __name__ == "__main__":
    main()
