"""One transformer decoder block.

parallel residual (GPT-J, GPT-NeoX):   x + attn(ln_1(x)) + mlp(ln_2(x))   (ln_2 is ln_1 for GPT-J)
sequential residual (needs ln_2):       h = x + attn(ln_1(x)); h + mlp(ln_2(h))
"""
from __future__ import annotations

from typing import Callable

import tensorflow as tf

from layers.attention import KVCache, SelfAttention
from layers.base import Layer
from layers.dropout import ATTENTION_OUTPUT, MLP_OUTPUT, dropout
from layers.layer_norm import LayerNorm
from layers.mlp import MLP
from config.params import ModelParams


class DecoderBlock(Layer):
    def __init__(self, config: ModelParams, kernel_init: Callable, output_init: Callable,
                 name: str | None = None):
        super().__init__(name=name)
        self.parallel_residual = config.use_parallel_residual
        self.residual_dropout_rate = config.residual_dropout_rate
        self.untied_layer_norm = config.use_untied_layer_norm
        self.ln_1 = LayerNorm(config.hidden_size, config.layer_norm_epsilon, name="ln_1")
        if config.use_untied_layer_norm:
            self.ln_2 = LayerNorm(config.hidden_size, config.layer_norm_epsilon, name="ln_2")
        self.attn = SelfAttention(config, kernel_init, output_init, name="attn")
        self.mlp = MLP(config, kernel_init, output_init, name="mlp")

    def forward(self, weights: dict, x: tf.Tensor, sin: tf.Tensor, cos: tf.Tensor,
                bias: tf.Tensor, cache: KVCache | None = None, cache_index: tf.Tensor | None = None,
                dropout_seed: tf.Tensor | None = None) -> tuple[tf.Tensor, KVCache | None]:
        """x [b, s, D] -> ([b, s, D], updated cache)."""
        attn_in = self.ln_1.forward(weights["ln_1"], x)
        attn_out, new_cache = self.attn.forward(weights["attn"], attn_in, sin, cos, bias,
                                                cache, cache_index, dropout_seed)
        attn_out = dropout(attn_out, self.residual_dropout_rate, dropout_seed, ATTENTION_OUTPUT)
        if self.parallel_residual:
            # GPT-J: the one LayerNorm output feeds both attention and MLP.
            mlp_in = self.ln_2.forward(weights["ln_2"], x) if self.untied_layer_norm else attn_in
            mlp_out = self.mlp.forward(weights["mlp"], mlp_in, dropout_seed)
            mlp_out = dropout(mlp_out, self.residual_dropout_rate, dropout_seed, MLP_OUTPUT)
            return x + attn_out + mlp_out, new_cache
        hidden = x + attn_out
        mlp_out = self.mlp.forward(weights["mlp"], self.ln_2.forward(weights["ln_2"], hidden), dropout_seed)
        mlp_out = dropout(mlp_out, self.residual_dropout_rate, dropout_seed, MLP_OUTPUT)
        return hidden + mlp_out, new_cache
