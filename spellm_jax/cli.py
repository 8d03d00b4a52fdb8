"""What every `python -m spellm_jax.X` entry point shares."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from absl import app, flags, logging

from spellm_jax.errors import USER_ERRORS


def run(main: Callable[[list[str]], None]) -> None:
    """absl `app.run`, with library INFO logs (Orbax, XLA) hidden unless `--verbosity` is given,
    and bad input reported as one clear line instead of a traceback."""

    def wrapped(argv: list[str]) -> None:
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        try:
            main(argv)
        except USER_ERRORS as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    app.run(wrapped)


def define_output_flags() -> None:
    """`--out` and `--overwrite`, for commands that write one directory."""
    flags.DEFINE_string("out", None, "Output directory (must be empty unless --overwrite).",
                        required=True)
    flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")


def checked_output_dir() -> Path:
    """`--out`, refused at once (before any slow loading) when it is taken and not `--overwrite`."""
    from spellm_jax.checkpointing import prepare_output_dir

    out = Path(flags.FLAGS.out)
    prepare_output_dir(out, flags.FLAGS.overwrite).rmdir()
    return out
