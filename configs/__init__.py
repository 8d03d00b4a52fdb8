"""Training configs as code: `--config=configs/llama.py:PRESET` (run from the repository root)."""
