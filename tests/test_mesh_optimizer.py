"""The TF-ops optimizer of the mesh backend equals Keras' Adam, AdamW and SGD on one device, and
holds the same variables in the same order (so their checkpoints are interchangeable)."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from config.params import LearningRateSegment, OptimizerParams
from runtime.mesh_optimizer import TensorOpsOptimizer
from runtime.optimizer import build_optimizer
from tests.numerics import U32

STEPS = 5
SCHEDULE = (LearningRateSegment("Linear", initial_learning_rate=0.0, end_learning_rate=0.02, steps=2),
            LearningRateSegment("Cosine", initial_learning_rate=0.02, decay_steps=10))
CASES = {
    "adamw": OptimizerParams(optimizer_type="adamw", learning_rate=0.01, weight_decay_rate=0.1),
    "adamw_schedule": OptimizerParams(optimizer_type="adamw", learning_rate=SCHEDULE, weight_decay_rate=0.05),
    "adam": OptimizerParams(optimizer_type="adam", learning_rate=0.01),
    "sgd_momentum": OptimizerParams(optimizer_type="sgd", learning_rate=0.1, momentum=0.9),
    "sgd": OptimizerParams(optimizer_type="sgd", learning_rate=0.1),
}


def _weights(seed: int) -> list[tf.Variable]:
    rng = np.random.default_rng(seed)
    return [tf.Variable(rng.standard_normal([4, 3]).astype(np.float32), name="kernel"),
            tf.Variable(rng.standard_normal([3]).astype(np.float32), name="bias")]


@pytest.mark.same_kernels
@pytest.mark.numerics
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_keras(case):
    config = CASES[case]
    keras_weights, ours_weights = _weights(0), _weights(0)
    keras_opt = build_optimizer(config, keras_weights)
    ours = TensorOpsOptimizer(config, ours_weights)
    assert [tuple(v.shape) for v in ours.variables] == [tuple(v.shape) for v in keras_opt.variables]
    assert [v.dtype for v in ours.variables] == [tf.as_dtype(v.dtype) for v in keras_opt.variables]
    rng = np.random.default_rng(1)
    for _ in range(STEPS):
        grads = [tf.constant(rng.standard_normal(v.shape).astype(np.float32)) for v in keras_weights]
        assert float(ours.learning_rate) == pytest.approx(float(keras_opt.learning_rate), rel=U32)
        keras_opt.apply_gradients(zip(grads, keras_weights))
        ours.apply_gradients(zip(grads, ours_weights))
    assert int(ours.iterations.numpy()) == int(keras_opt.iterations.numpy()) == STEPS
    # The same float32 ops in the same order, up to how a fused expression rounds: a step changes a
    # weight of size ~1 by <= lr and rounds it a few times (<= 4u relative); 5 steps: 20u, 1e-6 with margin.
    for ours_var, keras_var in zip(ours_weights + ours.variables[1:], keras_weights + keras_opt.variables[1:]):
        np.testing.assert_allclose(ours_var.numpy(), np.asarray(keras_var.numpy()), rtol=1e-6, atol=1e-6)
