"""Learning-rate list values, and what weight decay touches."""
from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from model import GPTJModel
from runtime.optimizer import build_optimizer, decay_exempt
from config.params import LearningRateSegment, ModelParams, OptimizerParams
from runtime.schedules import learning_rate_schedule

pytestmark = pytest.mark.numerics

SEGMENTS = (
    LearningRateSegment("Linear", initial_learning_rate=0.0, end_learning_rate=2e-3, steps=40),
    LearningRateSegment("Cosine", initial_learning_rate=2e-3, alpha=0.1, decay_steps=100),
    LearningRateSegment("Constant", learning_rate=5e-5),
)


def expected(step: int) -> float:
    if step < 40:
        return 2e-3 * step / 40
    if step < 140:
        t = (step - 40) / 100
        return 2e-3 * ((1 - 0.1) * 0.5 * (1 + math.cos(math.pi * t)) + 0.1)
    return 5e-5


@pytest.mark.parametrize("step", [0, 1, 20, 39, 40, 41, 90, 139, 140, 10_000])
def test_segmented_schedule_values(step):
    schedule = learning_rate_schedule(OptimizerParams(learning_rate=SEGMENTS))
    # float32 against a float64 formula: <= 6 float32 operations and a cosine (a few ulp), so
    # <= ~10 u = 6e-7 relative; 1e-5 leaves room for any CPU's cosine. abs: the rate 0 at step 0
    assert float(schedule(tf.constant(step))) == pytest.approx(expected(step), rel=1e-5, abs=1e-9)


def test_exponential_and_constant_float():
    exp = learning_rate_schedule(OptimizerParams(learning_rate=(
        LearningRateSegment("Exponential", initial_learning_rate=1.0, decay_rate=0.5, decay_steps=10),)))
    assert float(exp(tf.constant(20))) == pytest.approx(0.25, rel=1e-6)   # float32 pow: a few ulp (u = 6e-8)
    assert learning_rate_schedule(OptimizerParams(learning_rate=3e-4)) == 3e-4


def test_adamw_decays_kernels_not_biases_or_layernorms():
    config = ModelParams(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_heads=2, rotary_dim=2,
                         filter_size=16, max_position_embeddings=8)
    model = GPTJModel(config)
    variables = model.trainable_variables
    optimizer = build_optimizer(OptimizerParams(learning_rate=0.1, weight_decay_rate=0.5), variables)
    exempt = {id(v) for v in decay_exempt(variables)}
    assert {v.name.split(":")[0] for v in variables if id(v) in exempt} == {"gamma", "beta", "bias"}
    before = [v.numpy().copy() for v in variables]
    optimizer.apply_gradients([(tf.zeros_like(v), v) for v in variables])  # zero grads: only decay moves
    for v, old in zip(variables, before):
        if id(v) in exempt:
            np.testing.assert_array_equal(v.numpy(), old)
        else:
            # v - v * (lr * decay) in float32: 3 roundings, 3u = 1.8e-7 relative
            np.testing.assert_allclose(v.numpy(), old * (1 - 0.1 * 0.5), rtol=1e-6)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_other_optimizers_do_not_decay(kind):
    config = ModelParams(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_heads=2, rotary_dim=2,
                         filter_size=16, max_position_embeddings=8)
    variables = GPTJModel(config).trainable_variables
    optimizer = build_optimizer(OptimizerParams(optimizer_type=kind, learning_rate=0.1, momentum=0.9), variables)
    before = [v.numpy().copy() for v in variables]
    optimizer.apply_gradients([(tf.zeros_like(v), v) for v in variables])
    for v, old in zip(variables, before):
        np.testing.assert_array_equal(v.numpy(), old)
