"""Ahead-of-time compilation for TPU slices on a host without one: does a preset's train step fit
its slice, and what do the compiled programs cost (`python -m spellm_jax.train --compile_only`).
Importing this package (and `slices`) needs no JAX."""
