"""Convert weights into spellm_jax's format (Orbax params + model config + tokenizer).

    python -m spellm_jax.convert --source=<HF dir | hub name | file.gguf | smollm2> --out=DIR
"""

from __future__ import annotations

import time
from pathlib import Path

from absl import flags

from spellm_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("source", None, "HF dir, hub name (org/model), .gguf file, or smollm2.",
                    required=True)
flags.DEFINE_string("out", None, "Output directory (must be empty unless --overwrite).",
                    required=True)
flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")


def main(argv: list[str]) -> None:
    del argv
    from spellm_jax.checkpointing import prepare_output_dir
    from spellm_jax.conversion.sources import read_source, write_converted

    out = Path(FLAGS.out)
    prepare_output_dir(out, FLAGS.overwrite).rmdir()  # refuse early, before any reading
    start = time.time()
    pretrained = read_source(FLAGS.source)
    write_converted(pretrained, out, overwrite=FLAGS.overwrite)
    config = pretrained.config
    print(f"converted {FLAGS.source} ({config.model_type}, {config.num_params / 1e6:.1f}M params, "
          f"{config.num_layers} layers) into {out} in {time.time() - start:.1f}s")


if __name__ == "__main__":
    cli.run(main)
