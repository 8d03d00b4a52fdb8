"""Convert weights into spellm_jax's format (Orbax params + model config + tokenizer).

    python -m spellm_jax.convert --source=<HF dir | hub name | file.gguf | smollm2> --out=DIR

A directory written by `python -m spellm_jax.export` converts back with its character heads
(`spellm_heads/`, `spellm_config.json`, `spelling_table.json`), bit for bit.
"""

from __future__ import annotations

import time

from absl import flags

from spellm_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("source", None, "HF dir, hub name (org/model), .gguf file, or smollm2.",
                    required=True)
cli.define_output_flags()


def main(argv: list[str]) -> None:
    del argv
    from spellm_jax.conversion.sources import read_source, write_converted

    out = cli.checked_output_dir()
    start = time.time()
    pretrained = read_source(FLAGS.source)
    write_converted(pretrained, out, overwrite=FLAGS.overwrite)
    config = pretrained.config
    print(f"converted {FLAGS.source} ({config.model_type}, {config.num_params / 1e6:.1f}M params, "
          f"{config.num_layers} layers) into {out} in {time.time() - start:.1f}s")


if __name__ == "__main__":
    cli.run(main)
