"""Generate text with the LM head or the SpeLLM character heads.

    python -m spellm_jax.generate --source=smollm2 --prompt="..."                # LM head
    python -m spellm_jax.generate --checkpoint=WORKDIR --mode=free --prompt="..."  # trained SpeLLM
    python -m spellm_jax.generate --source=smollm2 --mode=vocab                  # untrained heads
"""

from __future__ import annotations

import time

from absl import app, flags

from spellm_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("source", "smollm2", "HF dir, hub name, .gguf file, converted dir or smollm2.")
flags.DEFINE_multi_string("prompt", ["Once upon a time, there was a little"], "Prompt (repeatable).")
flags.DEFINE_integer("max_new_tokens", 48, "Tokens to generate per prompt.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_bool("chat", False, "Wrap each prompt in the tokenizer's chat template.")
flags.DEFINE_enum("mode", "lm_head", ["lm_head", "free", "vocab"],  # decoding.MODES
                  "Output rule: the ordinary LM head, SpeLLM free decoding, or SpeLLM "
                  "vocabulary-constrained decoding.")
flags.DEFINE_string("checkpoint", None, "A trained SpeLLM (training workdir or checkpoint dir).")
flags.DEFINE_integer("k", 16, "Character heads of an untrained SpeLLM built from --source.")
flags.DEFINE_integer("beam", 1, "Strings the decoder searches per step (chain kind; 1: greedy).")
flags.DEFINE_enum("respell", "device", ["device", "tokenizer"],  # spelling.RESPELL_MODES
                  "--mode=free: a string that is not one token becomes input ids on device "
                  "(greedy longest match) or by the tokenizer on the host.")


def encode_prompts(tokenizer, prompts: list[str], chat: bool) -> list[list[int]]:
    """Token ids of each prompt, optionally as a user turn of the chat template."""
    if any(not p.strip() for p in prompts):
        raise app.UsageError("--prompt must not be empty.")
    if chat:
        return [list(tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                   add_generation_prompt=True, tokenize=True,
                                                   return_dict=False)) for p in prompts]
    return [tokenizer(p)["input_ids"] for p in prompts]


def main(argv: list[str]) -> None:
    del argv
    from spellm_jax import decoding, tokenizers
    from spellm_jax.models.llama import fused_for_inference
    from spellm_jax.pretrained import load_pretrained, spellm_from_pretrained
    from spellm_jax.runs import load_spellm
    from spellm_jax.sampling import Sampling
    from spellm_jax.spelling import Respeller

    if FLAGS.checkpoint:
        model, tokenizer, spelling = load_spellm(FLAGS.checkpoint)
    elif FLAGS.mode == "lm_head":
        (model, tokenizer), spelling = load_pretrained(FLAGS.source), None
    else:
        model, tokenizer, spelling = spellm_from_pretrained(FLAGS.source, k=FLAGS.k)
        print("note: no --checkpoint, so the character heads are untrained (initialised from "
              "the LM head); expect rough text.")
    model = fused_for_inference(model)
    prompts = encode_prompts(tokenizer, FLAGS.prompt, FLAGS.chat)
    sampling = Sampling(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
    respeller = None if spelling is None else Respeller(spelling, tokenizer)
    rule = decoding.rule_for(FLAGS.mode, sampling, respeller, FLAGS.beam, FLAGS.respell)
    start = time.time()
    outputs = decoding.generate(model, prompts, FLAGS.max_new_tokens, rule,
                                eos_ids=list(model.config.eos_token_ids),
                                pad_id=tokenizers.pad_id(tokenizer), seed=FLAGS.seed).tokens
    elapsed = time.time() - start
    for text, new in zip(FLAGS.prompt, outputs, strict=True):
        print(f"\n>>> {text}\n{tokenizer.decode(new, skip_special_tokens=True)}")
    total = sum(len(o) for o in outputs)
    print(f"\n[{total} tokens in {elapsed:.1f}s including compilation]")


if __name__ == "__main__":
    cli.run(main)
