"""The sharded train step: same numbers on every mesh, expected layouts, no recompilation."""

import dataclasses

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from configs import llama as llama_configs
from spellm_jax import runs, sharding, trainer
from spellm_jax.models.char_decoders import HeadsConfig
from spellm_jax.spelling import SpellingTable

MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2)]


def tiny_config(**overrides):
    config = llama_configs.get_config("tiny").unlock()
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config.lock()


@pytest.fixture(scope="module")
def tiny_teacher():
    config = tiny_config()
    teacher = runs.load_teacher(config)
    spelling = SpellingTable.from_tokenizer(teacher.tokenizer, 8, teacher.config.vocab_size)
    heads = HeadsConfig(k=8, num_symbols=spelling.num_symbols)
    return teacher, spelling, heads


def run_steps(config, tiny_teacher, mesh_shape, batches):
    teacher, spelling, heads = tiny_teacher
    devices = jax.devices()[:int(np.prod(mesh_shape))]
    mesh = sharding.make_mesh(mesh_shape, devices=devices)
    setup = trainer.prepare(config, teacher, spelling, heads, mesh)
    state, losses = setup.state, []
    for batch in batches:
        placed = {k: jax.device_put(v, setup.batch_sharding) for k, v in batch.items()}
        state, sums = setup.step_fn(state, setup.teacher_params, setup.rest, placed)
        losses.append(float(sums["loss"] / sums["tokens"]))
    return setup, state, losses


def random_batches(config, count=2, seed=0):
    rng = np.random.RandomState(seed)
    shape = (config.train.batch_size, config.train.seq_len)
    return [{"input_ids": rng.randint(0, 49152, shape).astype(np.int32),
             "loss_mask": rng.rand(*shape) > 0.1} for _ in range(count)]


@pytest.mark.parametrize(("trainable", "kind", "meshes"), [
    ("full", "independent", MESHES), ("top_layers", "chain", MESHES),
    # The other trainables shard the same parameters: against the mesh that splits every axis.
    ("heads", "independent", MESHES[::3]), ("lora", "independent", MESHES[::3])])
def test_train_step_is_the_same_on_every_mesh(tiny_teacher, trainable, kind, meshes):
    config = tiny_config(**{"train.trainable": trainable, "train.top_layers": 1,
                            "train.grad_accum": 1 if trainable != "lora" else 2})
    teacher, spelling, heads = tiny_teacher
    shortlist = tuple(np.flatnonzero(spelling.valid)[:64]) if kind == "chain" else ()
    tiny_teacher = teacher, spelling, dataclasses.replace(heads, kind=kind, recurrent_width=16,
                                                          shortlist_tokens=shortlist)
    batches = random_batches(config, count=3 if kind == "chain" else 2)
    _, reference, reference_losses = run_steps(config, tiny_teacher, meshes[0], batches)
    assert reference_losses[1] < reference_losses[0] * 1.5  # a sane, finite step
    want = jax.tree.map(np.asarray, reference["params"])
    for mesh_shape in meshes[1:]:
        setup, state, losses = run_steps(config, tiny_teacher, mesh_shape, batches)
        np.testing.assert_allclose(losses, reference_losses, rtol=1e-5, atol=1e-5)
        got = jax.tree.map(np.asarray, state["params"])
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                                strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"{mesh_shape} {path}")
        assert setup.step_fn._cache_size() == 1  # both steps used one compilation


def test_parameters_carry_the_expected_partition_specs(tiny_teacher):
    config = tiny_config(**{"train.trainable": "full"})
    teacher, spelling, heads = tiny_teacher
    setup = trainer.prepare(config, teacher, spelling, heads, sharding.make_mesh((2, 2, 2)))
    params = setup.state["params"]
    layer = params["model"]["layers"][0]
    assert layer["self_attn"]["q_proj"]["kernel"].sharding.spec == PartitionSpec("fsdp", "tensor")
    assert layer["mlp"]["down_proj"]["kernel"].sharding.spec == PartitionSpec("tensor", "fsdp")
    assert params["model"]["embed_tokens"].sharding.spec == PartitionSpec("tensor", "fsdp")
    assert params["char_heads"]["kernel"].sharding.spec == PartitionSpec(None, "fsdp", None)
    for moments in (optax.tree.get(setup.state["opt_state"], name) for name in ("mu", "nu")):
        for moment, param in zip(jax.tree.leaves(moments), jax.tree.leaves(params), strict=True):
            assert moment.sharding.spec == param.sharding.spec  # Adam's state sharded alike
    assert setup.batch_sharding.spec == PartitionSpec(("data", "fsdp"), None)


def test_bfloat16_compute_trains(tiny_teacher):
    config = tiny_config(**{"model.dtype": "bfloat16", "train.trainable": "full"})
    batch = random_batches(config, count=1)
    _, state, losses = run_steps(config, tiny_teacher, (1, 1, 1), batch * 4)  # fit one batch
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert jax.tree.leaves(state["params"])[0].dtype == np.float32  # master weights stay fp32


def test_lora_student_with_a_teacher_token_prior(tiny_teacher):
    """LoRA factors exist (B = 0, so the teacher is unchanged) before the head init samples the
    teacher's own continuation, as the smollm2 preset does with heads.prior_tokens > 0."""
    teacher, spelling, heads = tiny_teacher
    config = tiny_config(**{"train.trainable": "lora"})
    _, _, params, _, _ = trainer.build_student(config, teacher, spelling, heads, prior_tokens=8)
    lora_b = [v.get_value() for path, v in nnx.to_flat_state(params) if path[-1] == "lora_b"]
    assert lora_b and all(not np.asarray(v).any() for v in lora_b)
