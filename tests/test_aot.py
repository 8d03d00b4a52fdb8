"""Ahead-of-time compilation for TPU slices on this CPU: the slice table, and the tiny preset's
real train step compiled by libtpu, its memory table and its shardings."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from configs import llama
from spellm_jax import sharding
from spellm_jax.aot import slices, train_compile
from spellm_jax.aot.architectures import architecture_named, teacher_architecture
from spellm_jax.aot.topology import LIBTPU_HINT, compile_only_devices, libtpu_available
from spellm_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(not libtpu_available(), reason=f"libtpu is absent: {LIBTPU_HINT}")


@pytest.mark.parametrize("name, chips, hosts, topology", [
    ("v4-8", 4, 1, "v4:2x2x1"), ("v4-16", 8, 2, "v4:2x2x2"), ("v4-32", 16, 4, "v4:2x2x4"),
    ("v5p-128", 64, 16, "v5p:4x4x4"), ("v5litepod-1", 1, 1, "v5e:1x1"),
    ("v5litepod-8", 8, 1, "v5e:2x4"), ("v5litepod-16", 16, 4, "v5e:4x4"),
    ("v6e-64", 64, 16, "v6e:8x8"), ("v5e:2x2", 4, 1, "v5e:2x2"), ("v4:2x2x1", 4, 1, "v4:2x2x1")])
def test_slice_names_map_to_chips_hosts_and_topologies(name, chips, hosts, topology):
    shape = slices.named_slice(name)
    assert (shape.chips, shape.num_hosts, shape.topology_name) == (chips, hosts, topology)


@pytest.mark.parametrize("name, message", [
    ("v5e-16", "unsupported accelerator type"), ("v4-24", "power-of-two"),
    ("v4:2x2", "unsupported topology"), ("v4:4x2x1", "use that name")])
def test_unknown_slices_are_refused(name, message):
    with pytest.raises(ValueError, match=message):
        slices.named_slice(name)


def test_preset_teachers_have_their_public_architectures():
    config = llama.get_config("llama3_8b")
    architecture = teacher_architecture(config)
    assert architecture.config.num_params == 8_030_261_248  # Llama-3.1-8B's published count
    assert architecture.num_symbols == 514
    with config.unlocked():
        config.teacher = "some-org/unknown-model"
    with pytest.raises(ConfigError, match=r"config\.json"):
        teacher_architecture(config)


@pytest.mark.parametrize("vocabulary, teachers", [
    ("llama3", ["meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.1-8B"]), ("qwen2", ["Qwen/Qwen2-7B"])])
def test_recorded_alphabets_are_those_of_the_real_tokenizers(vocabulary, teachers):
    from spellm_jax.spelling import SpellingTable
    from spellm_jax.tokenizers import load_tokenizer

    table = SpellingTable.from_tokenizer(load_tokenizer(vocabulary), 16)
    for teacher in teachers:
        assert architecture_named(teacher).num_symbols == table.num_symbols


def _tiny(mesh: tuple[int, int, int], **overrides) -> object:
    config = llama.get_config("tiny")
    with config.unlocked():
        config.mesh.shape = mesh
        for name, value in overrides.items():
            section, field = name.split(".")
            config[section][field] = value
    return config


def _is_spec(x) -> bool:
    return isinstance(x, jax.sharding.PartitionSpec)


def _expected_bytes(tree, mesh) -> int:
    """Parameters x dtype size / shards, each tensor's shards read off the rules table."""
    total = 0
    specs = jax.tree.leaves(sharding.partition_specs(tree), is_leaf=_is_spec)
    for leaf, spec in zip(jax.tree.leaves(tree), specs, strict=True):
        shards = math.prod(mesh.shape[axis] for entry in spec if entry is not None
                           for axis in ((entry,) if isinstance(entry, str) else entry))
        total += math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize // shards
    return total


@needs_libtpu
@pytest.mark.parametrize("topology, mesh", [("v5e:2x2", (1, 2, 2)), ("v4:2x2x1", (2, 2, 1))])
def test_tiny_preset_compiles_for_a_slice_with_its_rules(topology, mesh):
    config = _tiny(mesh, **{"loss.chunk_size": 32})  # the whole sequence in one loss chunk
    compilation = train_compile.compile_train_step(config, topology)
    assert compilation.fits and compilation.mesh_shape == mesh
    run = compilation.run
    devices = run.mesh.devices
    assert devices.size == 4 and {d.platform for d in devices.flat} == {"tpu"}
    state, _, rest, _ = run.args
    assert compilation.parts["trained parameters"] == _expected_bytes(state["params"], run.mesh)
    assert compilation.parts["frozen parameters and spelling tables"] == _expected_bytes(
        rest, run.mesh)
    # The compiled step takes its parameters laid out exactly as the rules table says.
    compiled_params = compilation.compiled.input_shardings[0][0]["params"]
    expected = sharding.partition_specs(state["params"])
    pairs = zip(jax.tree.leaves(compiled_params), jax.tree.leaves(state["params"]),
                jax.tree.leaves(expected, is_leaf=_is_spec), strict=True)
    for layout, leaf, spec in pairs:
        assert layout.is_equivalent_to(jax.sharding.NamedSharding(run.mesh, spec), len(leaf.shape))
    assert any(spec != jax.sharding.PartitionSpec() for spec in jax.tree.leaves(
        expected, is_leaf=_is_spec))  # something is sharded, so the comparison can fail
    # Unscanned, in one loss chunk, without accumulation, XLA's FLOPs are the whole step (it
    # counts a loop's body once): the count agrees.
    assert 0.75 < compilation.flops * 4 / compilation.model_flops < 1.33
    assert compilation.step_seconds > 0
    assert "fits" in compilation.table()


@needs_libtpu
def test_a_step_too_big_for_the_chips_is_refused_with_its_numbers():
    config = _tiny((4, 1, 1))
    with config.unlocked():  # 4 blocks of 956M fp32 parameters and Adam's moments, replicated
        config.model.tiny.hidden_size = 8192
        config.model.tiny.intermediate_size = 32768
        config.model.tiny.num_heads = 64
        config.model.tiny.num_kv_heads = 8
        config.model.tiny.num_layers = 4
    with pytest.raises(train_compile.StepDoesNotFit) as error:
        train_compile.check(config, "v5e:2x2")
    message = str(error.value)
    assert "DOES NOT FIT" in message and "| HBM of one v5e chip | 16.000 |" in message
    run = train_compile.abstract_run(config, compile_only_devices(slices.named_slice("v5e:2x2")))
    expected = _expected_bytes(run.args[0]["params"], run.mesh)
    assert f"| trained parameters | {expected / slices.GIB:.3f} |" in message
    assert expected > slices.GIB * 15
    assert "fsdp" in message and "remat" in message


@needs_libtpu
def test_accumulated_micro_batches_stay_sharded_and_need_less_memory():
    """Each micro-batch keeps the batch's layout over the data axis, so accumulating 4 of them
    takes far less activation memory than the whole batch at once (here mostly the teacher's
    logits of a sequence chunk)."""
    temps = {}
    for accum in (1, 4):
        config = _tiny((4, 1, 1), **{"train.batch_size": 128, "train.seq_len": 64,
                                     "loss.chunk_size": 64, "train.grad_accum": accum})
        temps[accum] = train_compile.compile_train_step(config, "v5e:2x2").temp_bytes
    assert temps[4] < 0.5 * temps[1]


@pytest.mark.parametrize("flags, message", [
    (["--compile_only", "--topology=v5e-16"], "error: --topology: unsupported accelerator type"),
    (["--compile_only"], "error: --compile_only needs --topology"),
    (["--topology=v4-8"], "error: --topology is only read with --compile_only")])
def test_bad_compile_only_command_lines_are_refused(flags, message, tmp_path):
    command = [sys.executable, "-m", "spellm_jax.train", "--config=configs/llama.py:tiny",
               f"--workdir={tmp_path / 'run'}", *flags]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written
