"""Self-distillation: `python -m spellm_jax.train --config=configs/llama.py[:PRESET] --workdir=DIR`.

Override any config field with `--config.train.steps=100` etc. Rerunning with the same workdir
resumes from its latest checkpoint.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from spellm_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "workdir/smollm2", "Checkpoints, metrics and the spelling table.")


def define_config_flag() -> None:
    """`--config`; ml_collections applies `--config.x.y=` overrides from the command line as it
    defines the flag, so `cli.run` defines it where it reports bad input."""
    config_flags.DEFINE_config_file("config", "configs/llama.py", "Training config file[:preset].",
                                    lock_config=True)


def main(argv: list[str]) -> None:
    del argv
    from spellm_jax import trainer

    trainer.run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    cli.run(main, define_flags=define_config_flag)
