"""Causal multi-head self-attention with rotary positions and an optional key/value cache."""
from __future__ import annotations

import math
from typing import Callable

import tensorflow as tf
# Public since TF 2.3 under this path (transformers' TF generate used it); runs eagerly, in graphs and under XLA.
from tensorflow.compiler.tf2xla.python.xla import dynamic_update_slice

from layers.base import Layer
from layers.dense import Dense
from layers.dropout import ATTENTION_PROBS, dropout
from layers.lora import adapter_seed
from layers.rotary import apply_rotary
from config.params import ModelParams

# (keys, values), each [b, h, cache_len, head_dim] in the compute dtype: heads before slots,
# so a decode step's attention reads each head's keys contiguously and needs no transpose.
KVCache = tuple[tf.Tensor, tf.Tensor]


def write_cache(cache: tf.Tensor, new: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    """Place new [b, s, h, d] at slots [index, index + s) of cache [b, h, L, d].

    A scalar index is a dynamic update slice: the cache keeps its static shape (one compiled
    decode step serves every position) and XLA updates it in place, touching s slots rather
    than all L. An index [b] (one start per row, as a serving batch whose rows joined at
    different steps has) is a scatter of b*h*s vectors of d: the same bytes written, where a
    one-hot blend would rewrite all L slots of every row. The caller keeps index + s <= L
    (out-of-range starts are clamped by the slice; the scatter drops them)."""
    new = tf.cast(tf.transpose(new, [0, 2, 1, 3]), cache.dtype)           # [b, h, s, d]
    index = tf.cast(index, tf.int32)
    if index.shape.rank == 0:
        zero = tf.constant(0, tf.int32)
        return dynamic_update_slice(cache, new, tf.stack([zero, zero, index, zero]))
    b, h, s = tf.shape(new)[0], tf.shape(new)[1], tf.shape(new)[2]
    rows = tf.broadcast_to(tf.range(b)[:, None, None], [b, h, s])
    heads = tf.broadcast_to(tf.range(h)[None, :, None], [b, h, s])
    slots = tf.broadcast_to(index[:, None, None] + tf.range(s)[None, None, :], [b, h, s])
    return tf.tensor_scatter_nd_update(cache, tf.stack([rows, heads, slots], axis=-1), new)   # indices [b, h, s, 3]


def blend_cache(cache: tf.Tensor, new: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    """write_cache's result as a select over all L slots: every slot reads new's token at its offset
    from the row's start, or keeps its old value. It rewrites the whole cache (L/s times the bytes of
    write_cache), but its ops (gather, where) have DTensor layout rules: on a device mesh, where
    the cache is split by heads, XLA's update slice has none and the scatter loses the split."""
    new = tf.cast(tf.transpose(new, [0, 2, 1, 3]), cache.dtype)           # [b, h, s, d]
    index = tf.cast(index, tf.int32)
    s = tf.shape(new)[2]
    slots = tf.range(tf.shape(cache)[2])                                   # [L]
    # (no index[..., None] on a scalar: DTensor fails to lay out a new axis on a rank-0 slice)
    offsets = slots - index if index.shape.rank == 0 else slots[None, :] - index[:, None]   # [L] or [b, L]
    hit = tf.logical_and(offsets >= 0, offsets < s)
    taken = tf.clip_by_value(offsets, 0, s - 1)
    if index.shape.rank == 0:
        moved = tf.gather(new, taken, axis=2)                                # [b, h, L, d]
        return tf.where(hit[None, None, :, None], moved, cache)
    moved = tf.gather(new, taken, axis=2, batch_dims=1)                      # [b, h, L, d]
    return tf.where(hit[:, None, :, None], moved, cache)


class SelfAttention(Layer):
    def __init__(self, config: ModelParams, kernel_init: Callable, output_init: Callable,
                 name: str | None = None):
        super().__init__(name=name)
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.rotary_style = config.rotary_style
        self.dropout_rate = config.attention_dropout_rate
        qkv_bias = config.use_projection_bias_in_attention
        self.fused_qkv = config.fused_qkv
        if config.fused_qkv:
            # One [D, 3D] kernel whose columns are [q | k | v]: one matmul instead of three.
            self.qkv_proj = Dense(d, 3 * d, qkv_bias, kernel_init, name="qkv_proj")
        else:
            self.q_proj = Dense(d, d, qkv_bias, kernel_init, name="q_proj")
            self.k_proj = Dense(d, d, qkv_bias, kernel_init, name="k_proj")
            self.v_proj = Dense(d, d, qkv_bias, kernel_init, name="v_proj")
        self.out_proj = Dense(d, d, config.use_attention_output_bias, output_init, name="out_proj")
        # How new keys/values enter the cache: write_cache, or blend_cache on a device mesh.
        self.cache_writer = write_cache

    def _project_qkv(self, weights: dict, x: tf.Tensor, seed: tf.Tensor | None):
        if self.fused_qkv:
            return tf.split(self.qkv_proj.forward(weights["qkv_proj"], x, adapter_seed(seed, "qkv_proj")), 3, axis=-1)
        return tuple(getattr(self, name).forward(weights[name], x, adapter_seed(seed, name))
                     for name in ("q_proj", "k_proj", "v_proj"))

    def forward(self, weights: dict, x: tf.Tensor, sin: tf.Tensor, cos: tf.Tensor,
                bias: tf.Tensor, cache: KVCache | None = None, cache_index: tf.Tensor | None = None,
                dropout_seed: tf.Tensor | None = None) -> tuple[tf.Tensor, KVCache | None]:
        """x [b, s, D]; sin/cos [b, s, 1, r]; bias [b, 1, s, s_k] -> ([b, s, D], updated cache)."""
        batch, length = tf.shape(x)[0], tf.shape(x)[1]
        heads = [tf.reshape(t, [batch, length, self.num_heads, self.head_dim])
                 for t in self._project_qkv(weights, x, dropout_seed)]                   # 3 x [b, s, h, hd]
        q, k, v = heads
        q = apply_rotary(q, sin, cos, self.rotary_style)
        k = apply_rotary(k, sin, cos, self.rotary_style)
        new_cache = None
        key_layout = "bkhd"                                                # k, v [b, s, h, hd]
        if cache is not None:
            k = self.cache_writer(cache[0], k, cache_index)                # [b, h, L, hd]
            v = self.cache_writer(cache[1], v, cache_index)
            new_cache, key_layout = (k, v), "bhkd"
        # Scores and softmax in float32 (fp16 q.k overflows easily), as the reference does.
        scores = tf.einsum(f"bqhd,{key_layout}->bhqk", tf.cast(q, tf.float32), tf.cast(k, tf.float32))
        scores = scores / math.sqrt(self.head_dim) + bias                   # [b, h, s, s_k]
        probs = tf.cast(tf.nn.softmax(scores, axis=-1), v.dtype)
        probs = dropout(probs, self.dropout_rate, dropout_seed, ATTENTION_PROBS)
        context = tf.einsum(f"bhqk,{key_layout}->bqhd", probs, v)           # [b, s, h, hd]
        context = tf.reshape(context, [batch, length, self.num_heads * self.head_dim])
        return self.out_proj.forward(weights["out_proj"], context, adapter_seed(dropout_seed, "out_proj")), new_cache
