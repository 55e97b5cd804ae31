"""The optimizer named in `optimizer:` params, as a Keras optimizer over the model's variables."""
from __future__ import annotations

import keras
import tensorflow as tf

from config.params import OptimizerParams
from runtime.schedules import learning_rate_schedule


def decay_exempt(variables) -> list[tf.Variable]:
    """Variables that weight decay skips: LayerNorm scales/offsets and biases, i.e. every
    rank-1 variable (kernels and embedding tables are rank 2)."""
    return [v for v in variables if v.shape.rank == 1]


def build_optimizer(config: OptimizerParams, variables) -> keras.optimizers.Optimizer:
    """A built Keras optimizer for `variables` (its slots exist, so a checkpoint restores into it)."""
    lr = learning_rate_schedule(config)
    if config.optimizer_type == "adamw":
        optimizer = keras.optimizers.AdamW(learning_rate=lr, weight_decay=config.weight_decay_rate,
                                           beta_1=config.beta1, beta_2=config.beta2, epsilon=config.epsilon)
        optimizer.exclude_from_weight_decay(var_list=decay_exempt(variables))
    elif config.optimizer_type == "adam":
        optimizer = keras.optimizers.Adam(learning_rate=lr, beta_1=config.beta1, beta_2=config.beta2,
                                          epsilon=config.epsilon)
    else:
        optimizer = keras.optimizers.SGD(learning_rate=lr, momentum=config.momentum)
    optimizer.build(list(variables))
    return optimizer


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> tf.Tensor:
    """The rate the next update uses (schedules are evaluated at optimizer.iterations)."""
    return tf.cast(optimizer.learning_rate, tf.float32)
