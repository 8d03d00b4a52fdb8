"""The conversion table both ways, the readers and writers, and their refusals of bad input."""

import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
import transformers

from spellm_jax import load_pretrained, sharding
from spellm_jax.conversion import gguf_file, hf_dir, mapping
from spellm_jax.conversion.errors import ConversionError
from spellm_jax.conversion.sharded_read import canonical_shardings
from spellm_jax.conversion.sources import read_source, write_converted
from spellm_jax.models.config import ModelConfig, UnsupportedModelError
from spellm_jax.models.params import ParamMismatchError, model_params
from tests.hf_configs import TINY_CONFIGS, build


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_round_trip_is_bit_identical_and_keys_match_transformers(name, tmp_path):
    reference = build(name)
    reference.save_pretrained(tmp_path)
    model, _ = load_pretrained(str(tmp_path), scan_layers=True)
    ours = {k: np.asarray(v) for k, v in model_params(model).items()}
    exported = mapping.to_hf(model.config, ours)
    assert set(exported) == set(reference.state_dict())
    back = mapping.from_hf(model.config, exported)
    assert set(back) == set(ours)
    for key, value in ours.items():
        assert back[key].dtype == value.dtype
        assert np.array_equal(back[key], value), key


def test_written_hf_dir_loads_in_transformers(tmp_path):
    reference = build("qwen2_bias_tied")
    reference.save_pretrained(tmp_path / "src")
    model, _ = load_pretrained(str(tmp_path / "src"))
    state = mapping.to_hf(model.config, {k: np.asarray(v) for k, v in model_params(model).items()})
    hf_dir.write_hf_dir(tmp_path / "out", model.config.to_hf(), state)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, reference(ids).logits)


def test_bf16_weights_keep_their_bits(tmp_path):
    reference = build("llama_gqa2").to(torch.bfloat16)
    reference.save_pretrained(tmp_path)
    tensors = hf_dir.read_hf_tensors(tmp_path)
    name = "model.layers.0.self_attn.q_proj.weight"
    want = reference.state_dict()[name].view(torch.int16).numpy()
    assert np.array_equal(tensors[name].view(np.int16), want)


def test_pytorch_bin_weights_are_read(tmp_path):
    reference = build("llama_gqa1")
    reference.config.save_pretrained(tmp_path)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    pretrained = read_source(str(tmp_path))
    assert np.array_equal(pretrained.params["model/layers/1/mlp/down_proj/kernel"],
                          reference.state_dict()["model.layers.1.mlp.down_proj.weight"].numpy().T)


def test_sharded_safetensors_with_index_are_read(tmp_path):
    reference = build("llama_gqa2")
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    pretrained = read_source(str(tmp_path))
    assert np.array_equal(pretrained.params["model/embed_tokens"],
                          reference.state_dict()["model.embed_tokens.weight"].numpy())


@pytest.mark.parametrize("name", ["qwen2_bias_tied", "llama3_scaled_untied"])
def test_sharded_reads_equal_the_whole_read_laid_out_by_the_rules(name, tmp_path):
    reference = build(name).to(torch.bfloat16)
    reference.save_pretrained(tmp_path / "hf", max_shard_size="20KB")  # several files
    whole = read_source(str(tmp_path / "hf"))
    write_converted(whole, tmp_path / "converted")
    mesh = sharding.make_mesh((2, 2, 2))
    layouts = canonical_shardings(whole.config, mesh)
    for source in ("hf", "converted"):
        sharded = read_source(str(tmp_path / source), mesh)
        assert sharded.params.keys() == whole.params.keys() and sharded.config == whole.config
        for key, value in sharded.params.items():
            assert value.sharding == layouts[key], key
            assert value.dtype == whole.params[key].dtype, key
            np.testing.assert_array_equal(np.asarray(value), whole.params[key], err_msg=key)
        split = [key for key, value in sharded.params.items()
                 if not value.sharding.is_fully_replicated]
        assert len(split) > len(sharded.params) // 2, split  # each device holds a part only


def test_a_gs_directory_is_read_whole_and_in_slices(tmp_path, monkeypatch, smollm2_tokenizer):
    """fsspec's in-memory filesystem stands in for gcsfs: safetensors are read by ranged reads,
    the tokenizer's small files copied to the cache."""
    from etils import epath
    from fsspec.implementations.memory import MemoryFileSystem

    for protocol in ("gs", "gcs"):
        monkeypatch.setitem(sys.modules["fsspec.registry"]._registry, protocol, MemoryFileSystem)
    monkeypatch.setenv("SPELLM_CACHE", str(tmp_path / "cache"))
    reference = build("llama_gqa2").to(torch.bfloat16)
    reference.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    smollm2_tokenizer.save_pretrained(tmp_path / "hf")
    remote = f"gs://spellm-teacher-{os.getpid()}/hf"
    for file in (tmp_path / "hf").iterdir():
        (epath.Path(remote) / file.name).write_bytes(file.read_bytes())
    local = read_source(str(tmp_path / "hf"))
    mesh = sharding.make_mesh((1, 8, 1))
    for pretrained in (read_source(remote), read_source(remote, mesh)):
        assert pretrained.params.keys() == local.params.keys()
        for key, value in pretrained.params.items():
            np.testing.assert_array_equal(np.asarray(value), local.params[key], err_msg=key)
        assert pretrained.tokenizer("Once upon a time")["input_ids"] == smollm2_tokenizer(
            "Once upon a time")["input_ids"]


def test_sharded_read_refuses_pickled_weights_with_the_fix(tmp_path):
    reference = build("llama_gqa2")
    reference.config.save_pretrained(tmp_path)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="cannot be read in slices; save it with safetensors"):
        read_source(str(tmp_path), sharding.make_mesh((8, 1, 1)))


def test_unknown_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        read_source(str(tmp_path))


def test_missing_weights_and_missing_paths_are_refused(tmp_path):
    build("llama_gqa1").config.save_pretrained(tmp_path)
    with pytest.raises(ConversionError, match="holds no weights"):
        read_source(str(tmp_path))
    with pytest.raises(ConversionError, match="does not exist"):
        read_source(str(tmp_path / "nowhere.gguf"))
    with pytest.raises(ConversionError, match="does not exist"):
        read_source(str(tmp_path / "nowhere"))


def test_shape_mismatch_and_leftover_tensors_are_named(tmp_path):
    reference = build("llama_gqa2")
    reference.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ParamMismatchError, match=r"gate_proj/kernel: got"):
        read_source(str(tmp_path))
    model_config = ModelConfig.from_hf(reference.config.to_dict())
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    state["model.layers.0.self_attn.rotary_extra"] = np.zeros(3)
    with pytest.raises(ParamMismatchError, match=r"unused: model\.layers\.0\.self_attn\.rotary_extra"):
        mapping.from_hf(model_config, state)
    del state["model.layers.0.self_attn.rotary_extra"], state["model.norm.weight"]
    with pytest.raises(ParamMismatchError, match=r"missing: model\.norm\.weight"):
        mapping.from_hf(model_config, state)


def test_unsupported_config_fields_are_refused():
    base = TINY_CONFIGS["llama_gqa2"].to_dict()
    with pytest.raises(UnsupportedModelError, match="yarn"):
        ModelConfig.from_hf({**base, "rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                          "rope_theta": 1e4}})
    with pytest.raises(UnsupportedModelError, match="not a multiple"):
        ModelConfig.from_hf({**base, "num_key_value_heads": 3})
    with pytest.raises(UnsupportedModelError, match="gelu"):
        ModelConfig.from_hf({**base, "hidden_act": "gelu"})


def test_sliding_window_shorter_than_the_sequence_is_refused(tmp_path):
    reference = build("mistral")
    reference.config.sliding_window = 8
    reference.save_pretrained(tmp_path)
    model, _ = load_pretrained(str(tmp_path))
    model(np.zeros((1, 8), np.int32))  # within the window: fine
    with pytest.raises(UnsupportedModelError, match="sliding attention window of 8"):
        model(np.zeros((1, 9), np.int32))


def test_old_transformers_rope_layout_is_read():
    base = TINY_CONFIGS["llama3_scaled_untied"].to_dict()
    rope = dict(base.pop("rope_parameters"))
    old = {**base, "rope_theta": rope.pop("rope_theta"), "rope_scaling": rope}
    assert ModelConfig.from_hf(old) == ModelConfig.from_hf(
        TINY_CONFIGS["llama3_scaled_untied"].to_dict())


def test_unsupported_gguf_tensor_type_is_named(tmp_path):
    path = tmp_path / "bad.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1][1]
    writer.add_tensor("blk.0.ffn_up.weight", np.zeros((2, block_bytes), np.uint8),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConversionError, match=r"blk\.0\.ffn_up\.weight.*Q8_1"):
        gguf_file.read_gguf_tensors(path, {"num_attention_heads": 4})


def test_converted_dir_round_trips_and_convert_never_overwrites(tmp_path):
    build("qwen2_bias_tied").save_pretrained(tmp_path / "hf")
    pretrained = read_source(str(tmp_path / "hf"))
    out = tmp_path / "converted"
    write_converted(pretrained, out)
    again = read_source(str(out))
    assert again.config == pretrained.config
    for key, value in pretrained.params.items():
        assert np.array_equal(again.params[key], value)
    marker = (out / "spellm_conversion.json").read_text()
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_converted(pretrained, out)
    assert (out / "spellm_conversion.json").read_text() == marker
    command = [sys.executable, "-m", "spellm_jax.convert", f"--source={tmp_path / 'hf'}",
               f"--out={out}"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2 and "--overwrite" in result.stderr
    result = subprocess.run([*command, "--overwrite"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert read_source(str(out)).config == pretrained.config
