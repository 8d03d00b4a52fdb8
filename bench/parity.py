"""Max-abs logit difference against transformers for every tiny test config and the bundled model.

    python bench/parity.py      (XLA_FLAGS is set here as in tests/conftest.py)
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_experimental_ynn_fusion_type="

import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spellm_jax import load_pretrained
from tests.hf_configs import TINY_CONFIGS, build


def tiny_parity() -> None:
    ids = np.random.RandomState(0).randint(0, 128, (2, 23))
    print("| config | scan_layers=False | scan_layers=True |\n| --- | --- | --- |")
    for name in sorted(TINY_CONFIGS):
        reference = build(name)
        with torch.no_grad():
            want = reference(torch.tensor(ids)).logits.numpy()
        with tempfile.TemporaryDirectory() as path:
            reference.save_pretrained(path)
            diffs = [np.abs(np.asarray(load_pretrained(path, scan_layers=s)[0](ids)) - want).max()
                     for s in (False, True)]
        print(f"| {name} | {diffs[0]:.2e} | {diffs[1]:.2e} |")


def forward_speed(batch: int = 4, length: int = 256, repeats: int = 3) -> None:
    model, _ = load_pretrained("smollm2")
    forward = nnx.jit(lambda m, x: m(x))
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 49152, (batch, length)))
    forward(model, ids).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward(model, ids).block_until_ready()
        times.append(time.perf_counter() - start)
    print(f"SmolLM2-135M fp32 forward, B={batch} T={length}: "
          f"{batch * length / np.median(times):.0f} tokens/s on {jax.devices()[0].device_kind}")


if __name__ == "__main__":
    tiny_parity()
    forward_speed()
