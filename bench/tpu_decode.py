"""Decoding on a TPU, estimated on this CPU: one step of the compiled decode loop, compiled by
libtpu for one chip, for the LM head and the SpeLLM rules of both decoder kinds.

    python bench/tpu_decode.py [--topology=v6e-1] [--batches 1 64] [--context=1024]

For Llama-3.2-1B and Llama-3.1-8B shapes (bf16 weights and cache, k = 16, no weights read), each
rule's step (`spellm_jax.decoding.decode_step`: feed one token per row with a cache of
`--context` slots, then choose the next) is compiled for the chip, and XLA's cost analysis
gives its bytes accessed and FLOPs. Decoding at these batches is memory-bound, so the predicted
speed-up over the LM head is the ratio of bytes per step (the limit at the chip's bandwidth);
the time columns are each step at the chip's peak FLOP/s or bandwidth, whichever is slower.
Writes bench/results/tpu_decode.{json,md}. Needs libtpu (`pip install -e .[tpu-compile]`).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flax import nnx

from spellm_jax import decoding
from spellm_jax.aot.architectures import architecture_named
from spellm_jax.aot.slices import named_slice
from spellm_jax.aot.topology import compile_only_devices
from spellm_jax.models.char_decoders import HeadsConfig
from spellm_jax.models.llama import LlamaForCausalLM, RuntimeOptions, fused_for_inference
from spellm_jax.models.spellm import SpeLLM

RESULTS = Path(__file__).resolve().parent / "results"
TEACHERS = ("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.1-8B")
NEW_TOKENS = 128
RULES = {  # name -> (decoder kind or None for the LM head, rule)
    "LM head": (None, decoding.LMHeadRule()),
    "SpeLLM independent, free": ("independent", decoding.FreeRule()),
    "SpeLLM chain, free greedy": ("chain", decoding.FreeRule()),
    "SpeLLM chain, free beam 4": ("chain", decoding.FreeRule(beam=4)),
}


def abstract_model(teacher: str, kind: str | None) -> nnx.Module:
    """The teacher's architecture in bf16, fused for inference, as shapes only."""
    architecture = architecture_named(teacher)
    options = RuntimeOptions(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)

    def build():
        if kind is None:
            return fused_for_inference(LlamaForCausalLM(architecture.config, options,
                                                        rngs=nnx.Rngs(0)))
        heads = HeadsConfig(k=16, num_symbols=architecture.num_symbols, kind=kind)
        return fused_for_inference(SpeLLM(architecture.config, heads, options, rngs=nnx.Rngs(0)))

    return nnx.eval_shape(build)


def step_cost(model: nnx.Module, rule, batch: int, context: int, device) -> dict[str, float]:
    """Bytes accessed and FLOPs of one decode step at `batch`, compiled for `device`."""
    graphdef, state = nnx.split(model)
    s = jax.eval_shape(functools.partial(decoding.initial_state, model, rule, batch, context,
                                         NEW_TOKENS))
    single = jax.sharding.SingleDeviceSharding(device)
    step = jax.jit(functools.partial(decoding.decode_step, graphdef, rule=rule,
                                     max_new_tokens=NEW_TOKENS),
                   in_shardings=single, out_shardings=single)
    compiled = step.lower(state, s, jax.ShapeDtypeStruct((1,), jnp.int32)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return {"bytes": float(cost["bytes accessed"]), "flops": float(cost["flops"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topology", default="v6e-1", help="a slice; its first chip is used")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--context", type=int, default=1024, help="KV-cache slots")
    args = parser.parse_args()
    jax.config.update("jax_platforms", "cpu")
    shape = named_slice(args.topology)
    device = compile_only_devices(shape)[0]
    family = shape.family
    rows = []
    for teacher in TEACHERS:
        models = {kind: abstract_model(teacher, kind) for kind in {k for k, _ in RULES.values()}}
        for batch in args.batches:
            base = None
            for name, (kind, rule) in RULES.items():
                cost = step_cost(models[kind], rule, batch, args.context, device)
                seconds = max(cost["flops"] / family.peak_bf16_flops,
                              cost["bytes"] / family.hbm_bytes_per_s)
                base = base or cost["bytes"]
                rows.append({"teacher": teacher, "batch": batch, "rule": name, **cost,
                             "bytes_per_token": cost["bytes"] / batch, "step_ms": seconds * 1e3,
                             "speedup_limit": base / cost["bytes"]})
                print(f"{teacher} batch {batch} {name}: {cost['bytes'] / batch / 1e6:.1f} MB/token, "
                      f"{seconds * 1e3:.3f} ms/step, x{base / cost['bytes']:.3f}", flush=True)
    header = (f"One decode step compiled for one {family.topology_prefix} chip "
              f"({args.topology}: {family.hbm_bytes_per_s / 1e9:.0f} GB/s, "
              f"{family.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16), bf16 weights and KV cache, "
              f"{args.context} cache slots, k = 16 (`python bench/tpu_decode.py "
              f"--topology={args.topology}`).")
    lines = [header, "", "| teacher | batch | rule | MB accessed per token | step at the chip's peak "
             "(ms) | speed-up over the LM head (memory-bound limit) |",
             "| --- | ---: | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['teacher'].split('/')[-1]} | {r['batch']} | {r['rule']} | "
              f"{r['bytes_per_token'] / 1e6:.1f} | {r['step_ms']:.3f} | {r['speedup_limit']:.3f}x |"
              for r in rows]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tpu_decode.json").write_text(json.dumps(
        {"topology": args.topology, "context": args.context, "rows": rows}, indent=2))
    (RESULTS / "tpu_decode.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
