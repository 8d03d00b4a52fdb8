"""What every `python -m spellm_jax.X` entry point shares."""

from __future__ import annotations

import sys
from collections.abc import Callable

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
