"""PyTorch export against JAX on a trained checkpoint: logits, character logits, greedy decoding.

    python bench/export_parity.py [--checkpoint=workdir/smollm2]

Exports the checkpoint, loads it with `spellm_jax.torch_spellm.TorchSpeLLM`, and prints the
max-abs differences of the backbone's LM logits and of the character-head logits on held-out
prompts, and whether 32 greedy tokens (free, vocabulary-constrained, LM head) agree token for
token. fp32 on both sides; XLA:CPU uses Eigen dots as in tests/conftest.py.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_experimental_ynn_fusion_type="

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spellm_jax.data import evaluation_prompts
from spellm_jax.export import export_spellm, parity_with_torch
from spellm_jax.runs import load_spellm, run_metadata
from spellm_jax.spelling import Respeller
from spellm_jax.torch_spellm import TorchSpeLLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="workdir/smollm2")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new_tokens", type=int, default=32)
    args = parser.parse_args()

    model, tokenizer, spelling = load_spellm(args.checkpoint)
    prompts = evaluation_prompts(("shakespeare", "wiki"), tokenizer, args.prompts, 24)
    with tempfile.TemporaryDirectory() as tmp:
        out = export_spellm(model, tokenizer, spelling, Path(tmp) / "export",
                            base_model=run_metadata(args.checkpoint)["teacher_source"])
        spellm = TorchSpeLLM.from_pretrained(out)
    parity = parity_with_torch(model, Respeller(spelling, tokenizer), spellm, prompts,
                               args.new_tokens)
    print(f"{args.checkpoint}: {len(prompts)} held-out prompts of 24 tokens")
    print(f"max |LM logits (torch) - LM logits (JAX)| = {parity['lm_max_diff']:.2e}")
    print(f"max |char logits (torch) - char logits (JAX)| = {parity['chars_max_diff']:.2e}")
    print(f"the same symbols masked: {parity['same_masks']}")
    for mode, same in parity["identical"].items():
        print(f"greedy {args.new_tokens} tokens, {mode}: {'identical' if same else 'DIFFERENT'} "
              f"for all {len(prompts)} prompts")


if __name__ == "__main__":
    main()
