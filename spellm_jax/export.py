"""Export a trained SpeLLM for PyTorch.

    python -m spellm_jax.export --checkpoint=WORKDIR --out=DIR [--overwrite]

DIR gets the backbone with its original LM head as `model.safetensors` + `config.json`
(`transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads it with no custom code; LoRA
factors are folded into their kernels), the character heads (`spellm_heads.safetensors`,
`spellm_config.json`, `spelling_table.json`) and the tokenizer. `spellm_jax.torch_spellm`
generates from DIR with torch + transformers only; `python -m spellm_jax.convert --source=DIR
--out=OUT` brings it back to Orbax, bit for bit.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from absl import flags

from spellm_jax import cli

FLAGS = flags.FLAGS
HEADS_PREFIX = "char_heads/"


def fold_lora(flat: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """Canonical flat params with every `lora_a`/`lora_b` pair folded into its kernel:
    `W + scale * A @ B`, computed in fp32 and stored in the kernel's dtype."""
    from spellm_jax.models.llama import fold_lora_update

    folded = dict(flat)
    for key in [k for k in flat if k.endswith("/lora_a")]:
        base = key.removesuffix("lora_a")
        folded[base + "kernel"] = fold_lora_update(folded[base + "kernel"], folded.pop(key),
                                                   folded.pop(base + "lora_b"), scale)
    return folded


def split_spellm_params(model) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """`(backbone with LM head, heads)` as canonical flat numpy dicts; LoRA folded in."""
    from spellm_jax.models.params import model_params

    flat = {k: np.asarray(v) for k, v in model_params(model).items()}
    heads = {k.removeprefix(HEADS_PREFIX): v for k, v in flat.items() if k.startswith(HEADS_PREFIX)}
    backbone = {k: v for k, v in flat.items() if not k.startswith(HEADS_PREFIX)}
    return fold_lora(backbone, model.options.lora_scale), heads


def export_spellm(model, tokenizer, spelling, out: str | Path, *, base_model: str,
                  overwrite: bool = False, **description: Any) -> Path:
    """Writes the exported directory (see the module docstring); `description` entries go into
    `spellm_config.json`. A non-empty `out` is replaced only with `overwrite`, and only once the
    new directory is complete."""
    from spellm_jax.checkpointing import commit_output_dir, prepare_output_dir
    from spellm_jax.conversion import hf_dir, mapping, spellm_files
    from spellm_jax.models.char_decoders import fixed_tensors

    out = Path(out)
    staging = prepare_output_dir(out, overwrite)
    backbone, heads = split_spellm_params(model)
    hf_config = model.config.to_hf()
    hf_config["torch_dtype"] = str(backbone["model/embed_tokens"].dtype)
    hf_dir.write_hf_dir(staging, hf_config, mapping.to_hf(model.config, backbone))
    tensors = heads | fixed_tensors(model.char_heads)
    config = spellm_files.spellm_config(spelling, dataclasses.asdict(model.heads_config),
                                        base_model, **description)
    spellm_files.write_exported(staging, spellm_files.SpellmParts(tensors, config, spelling))
    tokenizer.save_pretrained(str(staging))
    commit_output_dir(staging, out)
    return out


def parity_with_torch(model, respeller, torch_spellm, prompts: list[list[int]], new_tokens: int,
                      beams: tuple[int, ...] = (1,)) -> dict[str, Any]:
    """How closely the exported PyTorch SpeLLM follows the JAX one on `prompts`: the largest
    differences of the LM logits and of the (unmasked, greedy-row) character logits over every
    position (over the heads that carry a decision: `loss_weights`, so not the chain's steps
    past the row's end), whether both mask the same symbols, and per decoding mode (and beam, as
    `mode_beamB` for B > 1; free decoding respelled by the tokenizer too, as
    `..._respell_tokenizer`) whether `new_tokens` greedy tokens are identical for every prompt,
    and how often that tokenizer path stopped for the host (`respelled_on_host`)."""
    import jax.numpy as jnp
    import torch

    from spellm_jax import decoding
    from spellm_jax.spelling import RESPELL_MODES

    lm_diff = chars_diff = 0.0
    same_masks = True
    for prompt in prompts:
        hidden, _ = model.model(jnp.asarray([prompt]))
        with torch.no_grad():
            torch_hidden = torch_spellm.lm.model(input_ids=torch.tensor([prompt])).last_hidden_state
            torch_lm = torch_spellm.lm.lm_head(torch_hidden).numpy()
            torch_chars = torch_spellm.decoder.logits(torch_hidden).numpy()
        jax_chars = np.asarray(model.char_heads.logits(hidden))
        unmasked = jax_chars > -1e8  # symbols no token has at a position carry a -1e9 mask
        same_masks &= bool(np.array_equal(unmasked, torch_chars > -1e8))
        rows = model.choose(hidden)
        deciding = np.asarray(model.char_heads.loss_weights(rows, model.spelling)) > 0
        unmasked &= deciding[..., None]
        lm_diff = max(lm_diff, float(np.abs(torch_lm - np.asarray(model.lm_logits(hidden))).max()))
        chars_diff = max(chars_diff, float(np.abs(torch_chars - jax_chars)[unmasked].max()))
    eos = list(model.config.eos_token_ids)
    identical, respelled_on_host = {}, 0
    for mode in decoding.MODES:
        for beam in beams if mode != "lm_head" else (1,):
            for respell in RESPELL_MODES if mode == "free" else ("device",):
                rule = decoding.rule_for(mode, respeller=respeller, beam=beam, respell=respell)
                expected = decoding.generate(model, prompts, new_tokens, rule, eos_ids=eos)
                got = torch_spellm.generate(prompts, new_tokens, mode=mode, beam=beam,
                                            respell=respell)
                name = mode + (f"_beam{beam}" if beam > 1 else "")
                name += "_respell_tokenizer" if respell == "tokenizer" else ""
                identical[name] = got == expected.tokens
                respelled_on_host += expected.host_round_trips if respell == "tokenizer" else 0
    return {"lm_max_diff": lm_diff, "chars_max_diff": chars_diff, "same_masks": same_masks,
            "identical": identical, "respelled_on_host": respelled_on_host}


flags.DEFINE_string("checkpoint", None, "A training workdir (its latest checkpoint) or "
                    "WORKDIR/checkpoints/N.", required=True)
cli.define_output_flags()


def main(argv: list[str]) -> None:
    del argv
    from spellm_jax.runs import load_spellm, run_metadata

    out = cli.checked_output_dir()
    metadata = run_metadata(FLAGS.checkpoint)
    model, tokenizer, spelling = load_spellm(FLAGS.checkpoint)
    export_spellm(model, tokenizer, spelling, out, base_model=metadata["teacher_source"],
                  overwrite=FLAGS.overwrite, trained_with=metadata["config"]["train"]["trainable"],
                  checkpoint=str(Path(FLAGS.checkpoint).resolve()))
    print(f"exported {FLAGS.checkpoint} to {out}; load it in PyTorch with "
          f"spellm_jax.torch_spellm.TorchSpeLLM.from_pretrained({str(out)!r})")


if __name__ == "__main__":
    cli.run(main)
