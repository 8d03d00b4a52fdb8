"""Our logits equal transformers' PyTorch logits for every supported Llama-family variant."""

import numpy as np
import pytest
import torch

from spellm_jax import load_pretrained
from tests.hf_configs import TINY_CONFIGS, build

TOLERANCE = 1e-4  # fp32 logits vs transformers (README, Numerics)


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def saved_model(request, tmp_path_factory):
    model = build(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return model, path


@pytest.mark.parametrize("scan_layers", [False, True], ids=["loop", "scan"])
def test_logits_match_transformers(saved_model, scan_layers):
    reference, path = saved_model
    ids = np.random.RandomState(0).randint(0, reference.config.vocab_size, (2, 23))
    with torch.no_grad():
        want = reference(torch.tensor(ids)).logits.numpy()
    model, _ = load_pretrained(str(path), scan_layers=scan_layers)
    got = np.asarray(model(ids))
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= TOLERANCE


def test_left_padded_batch_matches_transformers_mask(saved_model):
    reference, path = saved_model
    rng = np.random.RandomState(1)
    ids = rng.randint(0, reference.config.vocab_size, (2, 12))
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        want = reference(torch.tensor(ids), attention_mask=torch.tensor(mask),
                         position_ids=torch.tensor(positions)).logits.numpy()
    model, _ = load_pretrained(str(path))
    got = np.asarray(model(ids, attention_mask=mask))
    real = mask.astype(bool)
    assert np.abs(got[real] - want[real]).max() <= TOLERANCE
