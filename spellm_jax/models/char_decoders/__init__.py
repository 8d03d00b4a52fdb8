"""Character decoders: the `CharDecoder` interface and its kinds (`independent`: the paper's
heads; `chain`: head i sees the symbols chosen before it)."""

from spellm_jax.models.char_decoders import chain, independent
from spellm_jax.models.char_decoders.base import (
    ADAPTERS,
    DECODER_KINDS,
    INITS,
    MASKED_LOGIT,
    CharDecoder,
    HeadsConfig,
    SymbolMask,
    build_decoder,
    fixed_tensors,
    register_decoder,
    symbol_mask_of,
)

__all__ = [
    "ADAPTERS", "DECODER_KINDS", "INITS", "MASKED_LOGIT", "CharDecoder", "HeadsConfig",
    "SymbolMask", "build_decoder", "chain", "fixed_tensors", "independent", "register_decoder",
    "symbol_mask_of",
]
