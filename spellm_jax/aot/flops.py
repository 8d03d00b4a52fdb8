"""Model FLOPs of one distillation step, counted from the architecture: XLA's cost analysis
visits a loop's body once, so for scanned layers and gradient accumulation it counts a fraction
of the work (and of the bytes)."""

from __future__ import annotations

import ml_collections

from spellm_jax.models.char_decoders import HeadsConfig
from spellm_jax.models.char_decoders.chain import PREFIX_SUM_BLOCK
from spellm_jax.models.char_decoders.independent import head_cost
from spellm_jax.models.config import ModelConfig

VOCAB_PASSES = 6  # mask, scale, max, argmax, subtract, exponentiate


def block_flops(config: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one block: its matmuls and causal attention (T/2 keys on
    average)."""
    d, hd = config.hidden_size, config.head_dim
    matmul = d * hd * (2 * config.num_heads + 2 * config.num_kv_heads) + 3 * d * config.intermediate_size
    attention = 2 * 2 * (seq_len / 2) * config.num_heads * hd
    return 2 * matmul + attention


def step_flops(config: ml_collections.ConfigDict, model: ModelConfig, heads: HeadsConfig) -> float:
    """FLOPs of one train step of `config` (every micro-batch): the teacher's forward and
    targets, the student's forward and backward, remat's recomputation. A backward pass costs
    twice its forward where weights train, once where only activations carry gradients."""
    train, layers = config.train, model.num_layers
    block = block_flops(model, train.seq_len)
    logits = 2 * model.hidden_size * model.vocab_size
    decoder = 2 * head_cost(model.hidden_size, model.vocab_size, heads)["heads_macs"]
    if heads.kind == "chain":
        decoder += 2 * heads.k * heads.recurrent_width * (heads.recurrent_width + heads.num_symbols)
        if heads.hidden_every_step:
            decoder += 2 * (heads.k - 1) * heads.recurrent_width * model.hidden_size
    trained = {"heads": 0, "top_layers": train.top_layers, "lora": layers, "full": layers}[
        train.trainable]
    weights_train = train.trainable in ("top_layers", "full")
    teacher = (layers - trained) * block + trained * block  # the shared lower blocks run once
    student = trained * block * (1 + (2 if weights_train else 1))
    if config.model.remat != "none":
        student += trained * block
    # Beyond the logits, vocabulary-wide work per position: the softmax and argmax (a few
    # element-wise passes) and the soft targets, k segment-sums (independent) or the blocked prefix
    # sums' triangular matmul (chain). It matters beside the logits only for narrow models.
    over_vocab = VOCAB_PASSES + (2 * PREFIX_SUM_BLOCK if heads.kind == "chain" else heads.k)
    targets = (logits + over_vocab * model.vocab_size) * (1 if config.loss.save_targets else 2)
    per_token = teacher + student + targets + 3 * decoder
    return per_token * train.batch_size * train.seq_len
