"""Errors that mean "bad input": entry points print their message instead of a traceback."""

from __future__ import annotations

from spellm_jax.assets import AssetError
from spellm_jax.checkpointing import CheckpointMismatchError
from spellm_jax.conversion.errors import ConversionError
from spellm_jax.models.config import UnsupportedModelError
from spellm_jax.models.params import ParamMismatchError
from spellm_jax.spelling import SpellingTableMismatchError, UnsupportedTokenizerError


class ConfigError(ValueError):
    """A training config that cannot run; raised before any compute."""


USER_ERRORS = (ConfigError, AssetError, ConversionError, UnsupportedModelError, ParamMismatchError,
               FileExistsError, FileNotFoundError, SpellingTableMismatchError,
               UnsupportedTokenizerError, CheckpointMismatchError)
