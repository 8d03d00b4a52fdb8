"""Self-distillation: `python -m spellm_jax.train --config=configs/llama.py[:PRESET] --workdir=DIR`.

Override any config field with `--config.train.steps=100` etc. Rerunning with the same workdir
resumes from its latest checkpoint. `--compile_only --topology=v5litepod-16` compiles the train
step for a TPU slice on this host instead (no weights read, nothing trained; needs libtpu) and
prints its memory per device against the chip's HBM and its estimated step time.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from spellm_jax import cli
from spellm_jax.errors import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "workdir/smollm2", "Checkpoints, metrics and the spelling table.")
flags.DEFINE_bool("compile_only", False, "Compile the train step for --topology and report its "
                  "memory and cost per device; train nothing.")
flags.DEFINE_string("topology", None, "With --compile_only: a TPU slice as gcloud names it "
                    "(v4-8, v5litepod-16, v5p-32, v6e-8) or a topology (v5e:4x4).")


def define_config_flag() -> None:
    """`--config`; ml_collections applies `--config.x.y=` overrides from the command line as it
    defines the flag, so `cli.run` defines it where it reports bad input."""
    config_flags.DEFINE_config_file("config", "configs/llama.py", "Training config file[:preset].",
                                    lock_config=True)


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.compile_only:
        return compile_only()
    if FLAGS.topology:
        raise ConfigError("--topology is only read with --compile_only.")
    from spellm_jax import trainer

    trainer.run(FLAGS.config, FLAGS.workdir)


def compile_only() -> None:
    """`--compile_only`: the host's own computations stay on its CPU; libtpu only compiles."""
    import jax

    if not FLAGS.topology:
        raise ConfigError("--compile_only needs --topology, e.g. --topology=v5litepod-16.")
    jax.config.update("jax_platforms", "cpu")
    from spellm_jax.aot import train_compile
    from spellm_jax.aot.slices import named_slice

    try:
        shape = named_slice(FLAGS.topology)
    except ValueError as error:
        raise ConfigError(f"--topology: {error}") from error
    train_compile.check(FLAGS.config, shape)


if __name__ == "__main__":
    cli.run(main, define_flags=define_config_flag)
