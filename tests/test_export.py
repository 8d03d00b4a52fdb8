"""Export to PyTorch: transformers loads the backbone, the PyTorch module decodes exactly as JAX
does, and the exported directory converts back to Orbax bit for bit."""

import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open

from spellm_jax import runs, trainer
from spellm_jax.conversion import spellm_files
from spellm_jax.conversion.sources import read_converted, read_source, write_converted
from spellm_jax.export import export_spellm, fold_lora, parity_with_torch, split_spellm_params
from spellm_jax.models.char_decoders import fixed_tensors
from spellm_jax.spelling import Respeller
from spellm_jax.torch_spellm import TorchSpeLLM
from tests.test_distill import tiny_config

PROMPTS = ["The quick brown fox", "To be, or not to be, that is the question:"]
VARIANTS = {  # trained briefly so that every tensor differs from its initial value; and
    "full": {},  # "chain": the session's `tiny_chain_run`
    "lora_shared_adapter": {"train.trainable": "lora", "heads.adapter": "shared",
                            "train.learning_rate": 3e-2},
    "chain_hidden_every_step": {"heads.kind": "chain", "heads.hidden_every_step": True,
                                "train.learning_rate": 3e-2},
}


@pytest.fixture(scope="module", params=[*VARIANTS, "chain"])
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "chain":  # the session's shared chain run
        config, workdir = request.getfixturevalue("tiny_chain_run")
    else:
        config, workdir = tiny_config(**{"train.steps": 4, "train.eval_every": 100,
                                         **VARIANTS[request.param]}), root / "run"
        trainer.run(config, workdir)
    model, tokenizer, spelling = runs.load_spellm(workdir)
    out = export_spellm(model, tokenizer, spelling, root / "exported", base_model=config.teacher)
    return model, tokenizer, spelling, out


def test_transformers_loads_the_backbone_with_exactly_its_keys(exported):
    from transformers import AutoModelForCausalLM

    model, _, _, out = exported
    lm, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        stored = set(handle.keys())
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    assert stored == set(lm.state_dict()) - tied
    assert not any(k.endswith(("lora_a", "lora_b")) for k in stored)


def test_pytorch_module_matches_jax_logits_and_greedy_decoding(exported):
    model, tokenizer, spelling, out = exported
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    beams = (1, 4) if model.heads_config.kind == "chain" else (1,)
    parity = parity_with_torch(model, Respeller(spelling, tokenizer),
                               TorchSpeLLM.from_pretrained(out), prompts, 32, beams)
    assert parity["lm_max_diff"] <= 1e-5 and parity["chars_max_diff"] <= 1e-5, parity
    assert parity["same_masks"] and all(parity["identical"].values()), parity
    assert "free_respell_tokenizer" in parity["identical"]
    # The host path is exercised, so not vacuously equal (the 4-step LoRA model emits only
    # tokens here, and so does the shortlist's run, whose free choices are its word rows).
    if model.heads_config.adapter == "none" and not model.heads_config.shortlist_tokens:
        assert parity["respelled_on_host"] > 0


def test_exported_dir_converts_back_bit_for_bit(exported, tmp_path):
    model, _, _, out = exported
    backbone, heads = split_spellm_params(model)
    write_converted(read_source(str(out)), tmp_path / "converted")
    converted = read_converted(tmp_path / "converted")
    assert converted.params.keys() == backbone.keys()
    for key, value in backbone.items():
        np.testing.assert_array_equal(converted.params[key], value, err_msg=key, strict=True)
    assert converted.spellm.tensors.keys() == heads.keys() | fixed_tensors(model.char_heads).keys()
    for key, value in heads.items():
        np.testing.assert_array_equal(converted.spellm.tensors[key], value, strict=True)
    reloaded, _, _ = runs.load_spellm(tmp_path / "converted")
    again_backbone, again_heads = split_spellm_params(reloaded)
    for ours, theirs in ((backbone, again_backbone), (heads, again_heads)):
        for key, value in ours.items():
            np.testing.assert_array_equal(theirs[key], value, strict=True)


def test_fold_lora_equals_the_low_rank_forward():
    rng = np.random.default_rng(0)
    kernel, a, b = rng.normal(size=(6, 5)), rng.normal(size=(6, 2)), rng.normal(size=(2, 5))
    flat = {"x/kernel": kernel.astype(np.float32), "x/lora_a": a.astype(np.float32),
            "x/lora_b": b.astype(np.float32), "y": np.ones(3, np.float32)}
    folded = fold_lora(flat, scale=0.5)
    assert folded.keys() == {"x/kernel", "y"}
    inputs = rng.normal(size=(4, 6)).astype(np.float32)
    np.testing.assert_allclose(inputs @ folded["x/kernel"],
                               inputs @ kernel + 0.5 * (inputs @ a) @ b, rtol=1e-5, atol=1e-5)


def test_export_refuses_a_non_empty_out_and_keeps_it(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = subprocess.run([sys.executable, "-m", "spellm_jax.export", "--checkpoint=/nowhere",
                             f"--out={out}"], capture_output=True, text=True)
    assert result.returncode != 0 and "--overwrite" in result.stderr
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_pytorch_module_imports_no_jax():
    code = ("import sys, spellm_jax.torch_spellm; "
            "sys.exit(1 if any(m.split('.')[0] in ('jax', 'flax') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_symbol_mask_is_exported_as_the_heads_use_it(exported):
    model, _, spelling, out = exported
    parts = spellm_files.read_spellm_parts(out)
    np.testing.assert_array_equal(parts.tensors[spellm_files.SYMBOL_MASK],
                                  np.asarray(model.char_heads.symbol_mask[...]))
    assert parts.config["spelling_table_hash"] == spelling.content_hash  # the run's own table
    assert parts.config["k"] == model.heads_config.k
    assert parts.config["heads"]["kind"] == model.heads_config.kind
