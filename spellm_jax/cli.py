"""What every `python -m spellm_jax.X` entry point shares."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from absl import app, flags, logging

from spellm_jax.errors import USER_ERRORS


def run(main: Callable[[list[str]], None], define_flags: Callable[[], None] | None = None
        ) -> None:
    """absl `app.run`, with library INFO logs (Orbax, XLA) hidden unless `--verbosity` is given,
    and bad input reported as one clear line instead of a traceback. `define_flags` defines the
    flags that read the command line as they are defined (ml_collections' config flags)."""
    if define_flags is not None:
        try:
            define_flags()
        except (flags.Error, ValueError, AttributeError, KeyError) as error:
            _refuse_flags(error)

    def wrapped(argv: list[str]) -> None:
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        try:
            main(argv)
        except USER_ERRORS as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    app.run(wrapped, flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with bad flags (an unknown config preset or field, a value of the
    wrong type) reported as one `error:` line and exit status 2, as `run` reports bad input.
    Every flag's value is read here, so config overrides are applied (and refused) at once."""
    try:
        remaining = flags.FLAGS(argv)
        for name in flags.FLAGS:
            flags.FLAGS[name].value  # noqa: B018 (applies --config.x.y= overrides)
    except (flags.Error, ValueError, AttributeError, KeyError) as error:
        _refuse_flags(error)
    return remaining


def _refuse_flags(error: Exception) -> None:
    print(f"error: {_flag_error_message(error)}\nPass --helpfull to see the flags.", file=sys.stderr)
    sys.exit(2)


def _flag_error_message(error: Exception) -> str:
    """One line: a config file's own exception without its traceback, a config field lookup
    without the quoting of its KeyError."""
    if isinstance(error, AttributeError | KeyError) and error.args:
        text = str(error.args[0])
        while len(text) > 1 and text[0] == text[-1] == "'":  # KeyError inside AttributeError
            text = text[1:-1].replace("\\'", "'").replace("\\n", "\n")
        return "unknown config field " + " ".join(text.split())
    text = str(error)
    if "Traceback (most recent call last)" in text:
        lines = [line for line in text.splitlines() if line.strip()]
        return f"{lines[0].split(': Error', 1)[0]}: {lines[-1].strip()}"
    return " ".join(text.split())


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
