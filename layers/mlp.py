"""Feed-forward block: fc_out(act(fc_in(x))) with GPT-J's tanh gelu or the exact erf gelu."""
from __future__ import annotations

from typing import Callable

import tensorflow as tf

from layers.base import Layer
from layers.dense import Dense
from layers.lora import adapter_seed
from config.params import ModelParams


def activation(name: str, x: tf.Tensor) -> tf.Tensor:
    if name == "gelu_new":   # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        return tf.nn.gelu(x, approximate=True)
    if name == "gelu":       # 0.5 x (1 + erf(x / sqrt(2)))
        return tf.nn.gelu(x, approximate=False)
    raise ValueError(f"unknown nonlinearity {name!r}; use 'gelu_new' or 'gelu'")


class MLP(Layer):
    def __init__(self, config: ModelParams, kernel_init: Callable, output_init: Callable,
                 name: str | None = None):
        super().__init__(name=name)
        self.nonlinearity = config.nonlinearity
        self.fc_in = Dense(config.hidden_size, config.filter_size, config.use_ffn_bias,
                           kernel_init, name="fc_in")
        self.fc_out = Dense(config.filter_size, config.hidden_size, config.use_ffn_bias,
                            output_init, name="fc_out")

    def forward(self, weights: dict, x: tf.Tensor, dropout_seed: tf.Tensor | None = None) -> tf.Tensor:
        # x [b, s, D] -> [b, s, F] -> [b, s, D]; dropout_seed: the block's, for adapters' input dropout
        hidden = activation(self.nonlinearity,
                            self.fc_in.forward(weights["fc_in"], x, adapter_seed(dropout_seed, "fc_in")))
        return self.fc_out.forward(weights["fc_out"], hidden, adapter_seed(dropout_seed, "fc_out"))
