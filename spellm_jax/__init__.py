"""spellm_jax: convert a pretrained LLM into a SpeLLM (input tokens, output characters)."""

__all__ = ["load_pretrained"]


def __getattr__(name: str):
    if name == "load_pretrained":  # imported lazily: `import spellm_jax` stays cheap
        from spellm_jax.pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(name)
