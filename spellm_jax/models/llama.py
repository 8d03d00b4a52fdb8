"""Flax NNX Llama-family decoder: GQA, RoPE (HF `rotate_half` layout), RMSNorm, SwiGLU, KV cache.

Covers Llama 2/3/3.x, Mistral, Qwen2 (q/k/v bias) and SmolLM. The backbone returns the final
normed hidden state, so output layers (the LM head, the character heads) sit on top of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from spellm_jax import sharding
from spellm_jax.models.config import ModelConfig, UnsupportedModelError, rope_inverse_frequencies

RematPolicy = Literal["none", "full", "dots"]
REMAT_POLICIES = ("none", "full", "dots")
ModelT = TypeVar("ModelT", bound=nnx.Module)

_kernel_init = jax.nn.initializers.normal(0.02)
_zeros = jax.nn.initializers.zeros
_ones = jax.nn.initializers.ones


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """How the model computes, independent of what it computes."""

    dtype: jnp.dtype = jnp.float32  # activations / matmul inputs
    param_dtype: jnp.dtype = jnp.float32
    scan_layers: bool = False
    remat: RematPolicy = "none"
    lora_rank: int = 0  # > 0 adds LoRA factors to every attention and MLP projection
    lora_alpha: float = 16.0

    @property
    def lora_scale(self) -> float:
        """LoRA's update is `lora_scale * A @ B` (alpha / rank; 0 without LoRA)."""
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0


@struct.dataclass
class KVCache:
    """Static-size key/value cache for every layer: `[layers, batch, kv_heads, max_len, head_dim]`
    (slots after the heads, so a layer's keys feed the attention dots without a transpose)."""

    SLOT_AXIS = 3  # (not a field)

    keys: jax.Array
    values: jax.Array

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def max_len(self) -> int:
        return self.keys.shape[self.SLOT_AXIS]

    def grow(self, extra: int) -> KVCache:
        """The same cache with `extra` more (empty) slots."""
        widths = [(0, 0)] * self.keys.ndim
        widths[self.SLOT_AXIS] = (0, extra)
        return KVCache(jnp.pad(self.keys, widths), jnp.pad(self.values, widths))


class Dense(nnx.Module):
    """`x @ kernel (+ bias)` with kernel `[in, out]` (HF weight transposed) and logical axes, plus
    optional LoRA factors (`options.lora_rank`)."""

    def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], *, use_bias: bool,
                 options: RuntimeOptions, rngs: nnx.Rngs, kernel_init=_kernel_init,
                 lora: bool = True):
        self.kernel = sharding.param(rngs.params(), kernel_init, (d_in, d_out), axes,
                                     options.param_dtype)
        self.bias = (sharding.param(rngs.params(), _zeros, (d_out,), axes[1:], options.param_dtype)
                     if use_bias else None)
        self.dtype = options.dtype
        rank = options.lora_rank if lora else 0
        # LoRA: kernel + (alpha / rank) A B, with B zero so training starts from the original.
        self.lora_a = (sharding.param(rngs.params(), jax.nn.initializers.normal(1 / d_in**0.5),
                                      (d_in, rank), (axes[0], "lora_rank"), options.param_dtype)
                       if rank else None)
        self.lora_b = (sharding.param(rngs.params(), _zeros, (rank, d_out), ("lora_rank", axes[1]),
                                      options.param_dtype) if rank else None)
        self.lora_scale = options.lora_scale if rank else 0.0

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = x @ self.kernel[...].astype(self.dtype)
        if self.lora_a is not None:
            low_rank = x @ self.lora_a[...].astype(self.dtype)
            y = y + self.lora_scale * (low_rank @ self.lora_b[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y

    def merged_kernel(self) -> jax.Array:
        """The kernel with the LoRA update folded in."""
        if self.lora_a is None:
            return self.kernel[...]
        return fold_lora_update(self.kernel[...], self.lora_a[...], self.lora_b[...],
                                self.lora_scale)


def fold_lora_update(kernel, lora_a, lora_b, scale: float):
    """`kernel + scale * lora_a @ lora_b`, computed in fp32 and kept in the kernel's dtype (numpy
    or JAX arrays alike)."""
    low_rank = lora_a.astype("float32") @ lora_b.astype("float32")
    return (kernel.astype("float32") + scale * low_rank).astype(kernel.dtype)


def side_by_side(parts: Sequence[Dense]) -> Dense:
    """One Dense whose output is the outputs of `parts` concatenated, LoRA folded in: one larger
    matmul instead of several small ones. Its kernel keeps the first part's logical axes."""
    first = parts[0]
    if any((p.bias is None) != (first.bias is None) for p in parts):
        raise ValueError("side_by_side needs every part with a bias or none with one.")
    fused = nnx.clone(first)
    kernels = [p.merged_kernel() for p in parts]  # a single part without LoRA is not copied
    fused.kernel = sharding.like(
        first.kernel, kernels[0] if len(parts) == 1 else jnp.concatenate(kernels, axis=-1))
    if first.bias is not None and len(parts) > 1:
        fused.bias = sharding.like(first.bias, jnp.concatenate([p.bias[...] for p in parts], -1))
    fused.lora_a = fused.lora_b = None
    fused.lora_scale = 0.0
    return fused


class RMSNorm(nnx.Module):
    """Root-mean-square norm computed in fp32, cast back before the scale (as transformers does)."""

    def __init__(self, dim: int, eps: float, *, options: RuntimeOptions, rngs: nnx.Rngs):
        self.weight = sharding.param(rngs.params(), _ones, (dim,), ("norm",), options.param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope_tables(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin `[B, T, head_dim]` for integer positions `[B, T]`."""
    inv_freq = jnp.asarray(np.asarray(rope_inverse_frequencies(config), np.float32))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x `[B, T, heads, head_dim]`."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = x.astype(jnp.float32) * cos + rotate_half(x.astype(jnp.float32)) * sin
    return out.astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query causal self-attention with an optional static KV cache."""

    def __init__(self, config: ModelConfig, options: RuntimeOptions, rngs: nnx.Rngs):
        d, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_heads, config.num_kv_heads, hd)
        self.q_proj = Dense(d, config.num_heads * hd, ("embed", "heads"),
                            use_bias=config.qkv_bias, options=options, rngs=rngs)
        self.k_proj = Dense(d, config.num_kv_heads * hd, ("embed", "kv_heads"),
                            use_bias=config.qkv_bias, options=options, rngs=rngs)
        self.v_proj = Dense(d, config.num_kv_heads * hd, ("embed", "kv_heads"),
                            use_bias=config.qkv_bias, options=options, rngs=rngs)
        self.o_proj = Dense(config.num_heads * hd, d, ("heads", "embed"),
                            use_bias=config.o_bias, options=options, rngs=rngs)
        self.qkv_proj: Dense | None = nnx.data(None)  # q, k and v side by side, once fused

    def fuse_projections(self) -> None:
        """From now on q, k and v come from one matmul, LoRA folded in (`fused_for_inference`)."""
        if self.qkv_proj is not None:
            return
        self.qkv_proj = side_by_side([self.q_proj, self.k_proj, self.v_proj])
        self.q_proj = self.k_proj = self.v_proj = None
        self.o_proj = side_by_side([self.o_proj])

    def _project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = jnp.split(self.qkv_proj(x), [q_width, q_width + kv_width], axis=-1)
        return q, k, v

    def __call__(self, x, cos, sin, key_valid, write_index, cache_kv):
        """x `[B, T, d]`; key_valid `[B, S]`; cache_kv None or `(keys, values, layer)`: the
        stacked `[L, B, kv, S, hd]` caches of every layer and this block's index in them.

        Without a cache S = T. With one, this call's keys are written in place at slots
        `write_index .. write_index + T` of its layer, and queries attend to every valid slot up
        to their own.
        """
        b, t, _ = x.shape
        q, k, v = self._project(x)
        q = q.reshape(b, t, self.num_heads, self.head_dim)
        k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
        v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, kv, T, hd]
        if cache_kv is not None:
            cache_k, cache_v, layer = cache_kv
            start = (layer, 0, 0, write_index, 0)
            cache_k = jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), start)
            cache_v = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), start)
            cache_kv, k, v = (cache_k, cache_v, layer), cache_k[layer], cache_v[layer]
        query_slots = write_index + jnp.arange(t)
        key_slots = jnp.arange(k.shape[2])
        allowed = (key_slots[None, :] <= query_slots[:, None])[None] & key_valid[:, None, :]
        groups = self.num_heads // self.num_kv_heads
        q = q.reshape(b, t, self.num_kv_heads, groups, self.head_dim)
        scores = jnp.einsum("btkgd,bksd->bkgts", q, k.astype(q.dtype),
                            preferred_element_type=jnp.float32) * self.head_dim**-0.5
        scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        out = jnp.einsum("bkgts,bksd->btkgd", probs, v.astype(q.dtype))
        out = self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))
        return out, cache_kv


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, options: RuntimeOptions, rngs: nnx.Rngs):
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Dense(d, f, ("embed", "mlp"), use_bias=bias, options=options, rngs=rngs)
        self.up_proj = Dense(d, f, ("embed", "mlp"), use_bias=bias, options=options, rngs=rngs)
        self.down_proj = Dense(f, d, ("mlp", "embed"), use_bias=bias, options=options, rngs=rngs)
        self.gate_up_proj: Dense | None = nnx.data(None)  # gate and up side by side, once fused

    def fuse_projections(self) -> None:
        """From now on gate and up come from one matmul, LoRA folded in (`fused_for_inference`)."""
        if self.gate_up_proj is not None:
            return
        self.gate_up_proj = side_by_side([self.gate_proj, self.up_proj])
        self.gate_proj = self.up_proj = None
        self.down_proj = side_by_side([self.down_proj])

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(jax.nn.silu(gate) * up)


class Block(nnx.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: ModelConfig, options: RuntimeOptions, rngs: nnx.Rngs):
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, options=options, rngs=rngs)
        self.self_attn = Attention(config, options, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, options=options, rngs=rngs)
        self.mlp = MLP(config, options, rngs)

    def __call__(self, x, cos, sin, key_valid, write_index, cache_kv):
        attn_out, cache_kv = self.self_attn(
            self.input_layernorm(x), cos, sin, key_valid, write_index, cache_kv)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, cache_kv


def _remat(fn, policy: RematPolicy):
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)
    if policy == "dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.checkpoint_dots)
    raise ValueError(f"remat={policy!r}; choose one of 'none', 'full', 'dots'.")


def _run_block(graphdef, block_state, x, cos, sin, key_valid, write_index, cache_kv):
    return nnx.merge(graphdef, block_state)(x, cos, sin, key_valid, write_index, cache_kv)


def fused_for_inference(model: ModelT) -> ModelT:
    """A copy of `model` that computes the same function faster at small batch: every submodule
    with a `fuse_projections` method lays its weights out for inference (q/k/v and gate/up as
    one matmul each, LoRA folded in; the character heads as one plain matmul).

    At small batch, decoding streams every weight once per token: a few larger matrices stream
    closer to memory bandwidth than many small ones (5-15% per token for SmolLM2-135M on a CPU),
    and heads the matmul reads as they are need no transposed copy per call. The other weights
    are shared, not copied; drop the original to save the memory of the fused ones. For
    inference only: the parameter names no longer match checkpoints. Fusing a fused model again
    changes nothing.
    """
    fused = nnx.clone(model)
    for _, module in list(nnx.iter_modules(fused)):
        if hasattr(module, "fuse_projections"):
            module.fuse_projections()
    return fused


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position of each token counted over real (mask=1) tokens only; padding gets 0."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


class Llama(nnx.Module):
    """Token embedding, the decoder blocks and the final norm; returns normed hidden states."""

    def __init__(self, config: ModelConfig, options: RuntimeOptions, rngs: nnx.Rngs):
        self.config, self.options = config, options
        self.embed_tokens = sharding.param(
            rngs.params(), _kernel_init, (config.vocab_size, config.hidden_size),
            ("vocab", "embed"), options.param_dtype)
        if options.scan_layers:
            @nnx.split_rngs(splits=config.num_layers)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata=sharding.STACKED_LAYERS_METADATA)
            def stacked_blocks(rngs: nnx.Rngs) -> Block:
                return Block(config, options, rngs)

            self.layers = stacked_blocks(rngs)
        else:
            self.layers = nnx.List([Block(config, options, rngs) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, options=options, rngs=rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        write_index: jax.Array | int = 0,
        key_valid: jax.Array | None = None,
        layers: tuple[int, int | None] = (0, None),
        residual: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Hidden states `[B, T, d]` and the updated cache.

        attention_mask `[B, T]` marks real tokens (left padding is 0). With a cache, `key_valid`
        `[B, S]` marks the cache slots holding real tokens after this call's write. `layers =
        (start, end)` runs only those blocks: from `residual` (the stream entering block start;
        the embedded ids when None), and without the final norm unless end is the last block.
        """
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.bool_)
        attention_mask = attention_mask.astype(jnp.bool_)
        if positions is None:
            positions = positions_from_mask(attention_mask)
        if key_valid is None:
            if cache is not None:
                raise ValueError("decoding with a cache needs key_valid for every cache slot.")
            key_valid = attention_mask
        num_keys = t if cache is None else cache.max_len
        window = self.config.sliding_window
        if window is not None and num_keys > window:
            raise UnsupportedModelError(
                f"this {self.config.model_type} model uses a sliding attention window of {window} "
                f"tokens, but {num_keys} keys were asked for; spellm_jax implements full causal "
                f"attention only, so keep sequences (and KV caches) at most {window} long.")
        start, end = layers[0], self.config.num_layers if layers[1] is None else layers[1]
        cos, sin = rope_tables(self.config, positions)
        x = self.embed(input_ids) if residual is None else residual
        x, new_cache = self.run_layers(x, cos, sin, key_valid, write_index, cache, start, end)
        return (self.norm(x) if end == self.config.num_layers else x), new_cache

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.options.dtype)

    def run_layers(self, x, cos, sin, key_valid, write_index, cache: KVCache | None, start: int,
                   end: int) -> tuple[jax.Array, KVCache | None]:
        """Blocks `start..end` on the residual stream `x`, without final norm."""
        run = _remat(_run_block, self.options.remat)
        if self.options.scan_layers:
            graphdef, stacked = nnx.split(self.layers)
            if (start, end) != (0, self.config.num_layers):
                stacked = jax.tree.map(lambda a: a[start:end], stacked)

            def body(h, layer):
                block_state, layer_kv = layer
                if layer_kv is not None:  # this layer's slices, as a stack of one
                    layer_kv = (layer_kv[0][None], layer_kv[1][None], 0)
                h, layer_kv = run(graphdef, block_state, h, cos, sin, key_valid, write_index,
                                  layer_kv)
                return h, (None if layer_kv is None else (layer_kv[0][0], layer_kv[1][0]))

            per_layer_cache = None if cache is None else (cache.keys, cache.values)
            x, new_kv = jax.lax.scan(body, x, (stacked, per_layer_cache))
            return x, (None if cache is None else KVCache(*new_kv))
        kv = None if cache is None else (cache.keys, cache.values)
        for i in range(start, end):  # the caches are threaded through and updated in place
            graphdef, block_state = nnx.split(self.layers[i])
            x, layer_kv = run(graphdef, block_state, x, cos, sin, key_valid, write_index,
                              None if kv is None else (*kv, i))
            kv = None if layer_kv is None else layer_kv[:2]
        return x, (None if kv is None else KVCache(*kv))


class LlamaForCausalLM(nnx.Module):
    """The backbone plus the ordinary LM head (tied to the embedding or a separate matrix)."""

    def __init__(self, config: ModelConfig, options: RuntimeOptions | None = None, *,
                 rngs: nnx.Rngs):
        options = options or RuntimeOptions()
        self.config, self.options = config, options
        self.model = Llama(config, options, rngs)
        self.lm_head = None if config.tie_word_embeddings else Dense(
            config.hidden_size, config.vocab_size, ("embed", "vocab"),
            use_bias=False, options=options, rngs=rngs, lora=False)

    def lm_logits(self, hidden: jax.Array) -> jax.Array:
        """Token logits `[..., V]` (fp32) from final hidden states."""
        if self.lm_head is None:
            weight = self.model.embed_tokens[...].astype(self.options.dtype)
            logits = jnp.einsum("...d,vd->...v", hidden.astype(self.options.dtype), weight,
                                preferred_element_type=jnp.float32)
        else:
            logits = self.lm_head(hidden)
        return logits.astype(jnp.float32)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Logits `[B, T, V]` of a (left-padded) batch."""
        hidden, _ = self.model(input_ids, attention_mask=attention_mask)
        return self.lm_logits(hidden)
