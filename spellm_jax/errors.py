"""Errors that mean "bad input": entry points print their message instead of a traceback."""

from __future__ import annotations

from spellm_jax.assets import AssetError
from spellm_jax.conversion.errors import ConversionError
from spellm_jax.models.config import UnsupportedModelError
from spellm_jax.models.params import ParamMismatchError

USER_ERRORS = (AssetError, ConversionError, UnsupportedModelError, ParamMismatchError,
               FileExistsError, FileNotFoundError)
