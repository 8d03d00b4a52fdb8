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

import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spellm_jax import decoding
from spellm_jax.data import evaluation_prompts
from spellm_jax.export import export_spellm
from spellm_jax.torch_spellm import TorchSpeLLM
from spellm_jax.trainer import load_spellm, run_metadata


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
    lm_diff = chars_diff = 0.0
    for prompt in prompts:
        hidden, _ = model.model(jnp.asarray([prompt]))
        with torch.no_grad():
            torch_hidden = spellm.lm.model(input_ids=torch.tensor([prompt])).last_hidden_state
            torch_lm = spellm.lm.lm_head(torch_hidden).numpy()
            torch_chars = spellm.char_logits(torch_hidden).numpy()
        jax_chars = np.asarray(model.char_logits(hidden))
        unmasked = jax_chars > -1e8  # symbols no token has at a position carry a -1e9 mask
        lm_diff = max(lm_diff, float(np.abs(torch_lm - np.asarray(model.lm_logits(hidden))).max()))
        chars_diff = max(chars_diff, float(np.abs(torch_chars - jax_chars)[unmasked].max()))
    print(f"{args.checkpoint}: {len(prompts)} held-out prompts of 24 tokens")
    print(f"max |LM logits (torch) - LM logits (JAX)| = {lm_diff:.2e}")
    print(f"max |char logits (torch) - char logits (JAX)| = {chars_diff:.2e}")
    eos = list(model.config.eos_token_ids)
    rules = {"free": decoding.FreeRule(), "vocab": decoding.VocabRule(),
             "lm_head": decoding.LMHeadRule()}
    for mode, rule in rules.items():
        expected = decoding.generate(model, prompts, args.new_tokens, rule, eos_ids=eos,
                                     spelling=spelling, tokenizer=tokenizer)
        got = spellm.generate(prompts, args.new_tokens, mode=mode)
        same = sum(a == b for a, b in zip(expected, got, strict=True))
        print(f"greedy {args.new_tokens} tokens, {mode}: {same}/{len(prompts)} prompts identical")


if __name__ == "__main__":
    main()
