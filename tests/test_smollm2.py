"""The real bundled teacher (SmolLM2-135M-Instruct GGUF) against transformers."""

import numpy as np
import pytest
import torch

from spellm_jax import decoding, load_pretrained
from spellm_jax.conversion.sources import read_source

PROMPTS = [
    "Once upon a time, there was a little",
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Photosynthesis converts light energy into",
]


@pytest.fixture(scope="module")
def smollm2():
    return load_pretrained("smollm2")


def test_gguf_reader_equals_transformers_hf_dir(smollm2_gguf, smollm2_hf_dir):
    from_gguf = read_source(str(smollm2_gguf))
    from_hf = read_source(str(smollm2_hf_dir))
    assert from_gguf.config == from_hf.config
    assert set(from_gguf.params) == set(from_hf.params)
    for key, value in from_gguf.params.items():
        assert np.array_equal(value, from_hf.params[key]), key


def test_logits_match_transformers_on_real_prompts(smollm2, smollm2_torch, smollm2_tokenizer):
    model, tokenizer = smollm2
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        assert ids == smollm2_tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            want = smollm2_torch(torch.tensor([ids])).logits.numpy()[0]
        got = np.asarray(model(np.asarray([ids])))[0]
        assert np.abs(got - want).max() <= 1e-4, prompt
        assert np.array_equal(got.argmax(-1), want.argmax(-1)), prompt


def test_greedy_generation_equals_transformers(smollm2, smollm2_torch):
    model, tokenizer = smollm2
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    ours = decoding.generate(model, prompts, 20, eos_ids=model.config.eos_token_ids).tokens
    for prompt, new in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = smollm2_torch.generate(torch.tensor([prompt]), max_new_tokens=20,
                                         do_sample=False, eos_token_id=None, pad_token_id=0)
        assert new == out[0, len(prompt):].tolist()


def test_a_gguf_tokenizer_and_config_are_kept_as_transformers_reads_them(smollm2_gguf,
                                                                         smollm2_tokenizer):
    """transformers parses a GGUF's metadata in Python for seconds; spellm_jax keeps its readings
    beside the file (per size and mtime), and what it reads back is what transformers reads."""
    import transformers

    from spellm_jax.conversion.gguf_file import read_gguf_config, read_gguf_tokenizer

    text = "Once upon a time: naïve café, 日本語 <|im_start|>user\n  two  spaces\t1234</s>"
    direct = transformers.AutoConfig.from_pretrained(str(smollm2_gguf.parent),
                                                     gguf_file=smollm2_gguf.name).to_dict()
    for _ in range(2):  # read (and kept), then read back
        kept = read_gguf_tokenizer(smollm2_gguf)
        assert kept(text)["input_ids"] == smollm2_tokenizer(text)["input_ids"]
        assert kept.get_vocab() == smollm2_tokenizer.get_vocab()
        assert kept.all_special_ids == smollm2_tokenizer.all_special_ids
        assert kept.chat_template == smollm2_tokenizer.chat_template
        assert (kept.bos_token_id, kept.eos_token_id, kept.pad_token_id) == (
            smollm2_tokenizer.bos_token_id, smollm2_tokenizer.eos_token_id,
            smollm2_tokenizer.pad_token_id)
        config = read_gguf_config(smollm2_gguf)
        assert config["num_hidden_layers"] == direct["num_hidden_layers"] == 30
        assert config["vocab_size"] == direct["vocab_size"]
    kept_dir = next(smollm2_gguf.parent.glob(f".{smollm2_gguf.name}.transformers"))
    assert (kept_dir / f"{smollm2_gguf.stat().st_size}-{smollm2_gguf.stat().st_mtime_ns}"
            / "tokenizer" / "tokenizer.json").exists()
