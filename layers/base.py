"""`Layer`: a tf.Module whose math takes its weights as an argument.

Each layer keeps its tf.Variables as attributes and implements `forward(weights, ...)`,
where `weights` is a nested dict of tensors shaped like `weights_tree()`. Calling the
layer passes its own variables; weight streaming passes device copies instead, so one
piece of layer code serves both execution modes.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import tensorflow as tf


class Layer(tf.Module):
    def weights_tree(self) -> dict:
        """Nested dict {attribute: tf.Variable | subtree | [subtree, ...]} of this layer's weights."""
        tree = {}
        for name, value in vars(self).items():
            if name.startswith("_"):
                continue
            if isinstance(value, tf.Variable):
                tree[name] = value
            elif isinstance(value, Layer):
                tree[name] = value.weights_tree()
            elif isinstance(value, Sequence) and value and all(isinstance(v, Layer) for v in value):
                tree[name] = [v.weights_tree() for v in value]
        return tree

    def forward(self, weights: dict, *args, **kwargs):
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        return self.forward(self.weights_tree(), *args, **kwargs)


def weight_variable(init: Callable[[list[int]], tf.Tensor], shape: list[int], name: str) -> tf.Variable:
    """A float32 weight drawn from init(shape). The draw is a callable initial value, and shape,
    dtype and name are given up front: a variable creator scope (model.build_model_with) then sees
    which weight is created and may supply the variable itself, so a loader runs no initialiser."""
    return tf.Variable(lambda: init(shape), name=name, shape=shape, dtype=tf.float32)
