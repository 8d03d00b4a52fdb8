"""What trains and how the teacher is computed, for each trainable set, and the train step.

The teacher is always the original model. Its parameters are the student's *initial* values of
the trainable set (LoRA starts at zero, so for `lora` that is the backbone without LoRA) merged
with the shared frozen rest, so no trainable set needs a second full model in memory beyond the
copy it trains:

heads       one backbone pass serves teacher and student (the backbone is frozen);
top_layers  the frozen lower blocks run once; the original and the trained top blocks both run;
lora        the backbone runs with and without LoRA;
full        the backbone runs twice, the teacher from a frozen copy.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from spellm_jax.losses import LossConfig, chunked_distillation_loss
from spellm_jax.models.spellm import SpeLLM

TRAINABLE_SETS = ("heads", "top_layers", "lora", "full")


@dataclasses.dataclass(frozen=True)
class DistillSpec:
    """The static part of a train step."""

    trainable: str
    top_layers: int
    loss: LossConfig
    grad_accum: int = 1

    def __post_init__(self) -> None:
        if self.trainable not in TRAINABLE_SETS:
            raise ValueError(f"train.trainable={self.trainable!r}; choose one of {TRAINABLE_SETS}.")


def trainable_filter(spec: DistillSpec, num_layers: int,
                     fixed_in_decoder: tuple[tuple[str, ...], ...] = ()) -> Callable:
    """nnx filter selecting the parameters that train (always the character decoder's, except
    those it keeps fixed: `fixed_in_decoder`, paths inside it)."""
    first_trained = num_layers - spec.top_layers

    def is_trainable(path: tuple, variable) -> bool:
        if not isinstance(variable, nnx.Param):
            return False
        keys = tuple(str(p) for p in path)
        if keys[0] == "char_heads":
            return keys[1:] not in fixed_in_decoder
        if spec.trainable == "top_layers":
            return (keys[:2] == ("model", "norm")
                    or (keys[:2] == ("model", "layers") and int(keys[2]) >= first_trained))
        if spec.trainable == "lora":
            return keys[-1] in ("lora_a", "lora_b")
        return spec.trainable == "full" and keys[0] == "model"

    return is_trainable


def split_model(model: SpeLLM, spec: DistillSpec):
    """`(graphdef, trainable, rest)`: rest holds frozen parameters and spelling constants."""
    fixed = type(model.char_heads).FIXED_PARAMETERS
    return nnx.split(model, trainable_filter(spec, model.config.num_layers, fixed), ...)


def hidden_pair(student: SpeLLM, teacher: SpeLLM, input_ids: jax.Array, spec: DistillSpec
                ) -> tuple[jax.Array, jax.Array]:
    """Final hidden states `[B, T, d]` of the student and (gradient-free) of the teacher."""
    if spec.trainable == "heads":
        hidden = jax.lax.stop_gradient(student.model(input_ids)[0])
        return hidden, hidden
    if spec.trainable == "top_layers":
        split = student.config.num_layers - spec.top_layers
        lower = jax.lax.stop_gradient(student.model(input_ids, layers=(0, split))[0])
        student_hidden = student.model(input_ids, layers=(split, None), residual=lower)[0]
        teacher_hidden = teacher.model(input_ids, layers=(split, None), residual=lower)[0]
        return student_hidden, jax.lax.stop_gradient(teacher_hidden)
    student_hidden = student.model(input_ids)[0]
    teacher_hidden = jax.lax.stop_gradient(teacher.model(input_ids)[0])
    return student_hidden, teacher_hidden


def distillation_loss(graphdef, params, teacher_params, rest, batch: dict, spec: DistillSpec):
    """Mean loss over the batch's loss positions, and summed metrics (packed sequences: every
    position is a real token)."""
    student = nnx.merge(graphdef, params, rest)
    teacher = nnx.merge(graphdef, teacher_params, rest)
    student_hidden, teacher_hidden = hidden_pair(student, teacher, batch["input_ids"], spec)
    return chunked_distillation_loss(student_hidden, teacher_hidden, student.char_heads,
                                     teacher.lm_logits, student.spelling, batch["loss_mask"],
                                     spec.loss)


def make_optimizer(learning_rate: float, warmup_steps: int, total_steps: int, weight_decay: float,
                   grad_clip: float, fresh: tuple[str, ...] = (), fresh_lr_scale: float = 1.0
                   ) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay, after global-norm clipping; the decoder's
    parameters named in `fresh` (those that start from scratch) step `fresh_lr_scale` times
    further."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, max(warmup_steps, 1), max(total_steps, warmup_steps + 1),
        end_value=learning_rate * 0.1)
    parts = [optax.clip_by_global_norm(grad_clip), optax.adamw(schedule, weight_decay=weight_decay)]
    if fresh and fresh_lr_scale != 1.0:
        parts.append(_scale_decoder_updates(frozenset(fresh), fresh_lr_scale))
    return optax.chain(*parts)


def _scale_decoder_updates(names: frozenset[str], scale: float) -> optax.GradientTransformation:
    """Multiplies the updates of the character decoder's parameters called `names`."""

    def multiply(updates, params=None):
        def one(path, update):
            keys = {getattr(entry, "key", None) for entry in path}
            return update * scale if "char_heads" in keys and keys & names else update

        return jax.tree_util.tree_map_with_path(one, updates)

    return optax.stateless(multiply)


def train_step(graphdef, tx: optax.GradientTransformation, spec: DistillSpec, state: dict,
               teacher_params, rest, batch: dict) -> tuple[dict, dict]:
    """One optimizer update from `spec.grad_accum` micro-batches; returns the new state and the
    summed metrics (divide by `tokens` for means)."""
    grad_fn = jax.value_and_grad(
        functools.partial(distillation_loss, graphdef, spec=spec), has_aux=True)

    def micro_step(carry, micro):
        grads, sums = carry
        (_, micro_sums), micro_grads = grad_fn(state["params"], teacher_params, rest, micro)
        # Each micro-batch's gradient is of its mean loss: weight by its tokens.
        weight = micro_sums["tokens"]
        grads = jax.tree.map(lambda g, m: g + weight * m, grads, micro_grads)
        return (grads, jax.tree.map(jnp.add, sums, micro_sums)), None

    # Micro-batch i takes rows i, i + grad_accum, ...: every device's block of the sharded batch
    # splits evenly over the micro-batches, so each stays sharded like the batch. (Contiguous
    # blocks put a micro-batch on a fraction of the devices: measured on llama3_1b for a v4-8,
    # two such micro-batches took as much memory as the whole batch.)
    micro_batches = jax.tree.map(
        lambda x: x.reshape(x.shape[0] // spec.grad_accum, spec.grad_accum,
                            *x.shape[1:]).swapaxes(0, 1), batch)
    zero_grads = jax.tree.map(jnp.zeros_like, state["params"])
    zero_sums = jax.eval_shape(lambda: distillation_loss(
        graphdef, state["params"], teacher_params, rest,
        jax.tree.map(lambda x: x[0], micro_batches), spec)[1])
    zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_sums)
    (grads, sums), _ = jax.lax.scan(micro_step, (zero_grads, zero_sums), micro_batches)
    grads = jax.tree.map(lambda g: g / jnp.maximum(sums["tokens"], 1.0), grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    sums["grad_norm"] = optax.tree.norm(grads)
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, sums
