"""Launchers that run SpeLLM self-distillation on Cloud TPU VM slices."""
