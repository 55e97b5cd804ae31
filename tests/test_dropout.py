"""Dropout masks are the same bits on every compile path and backend.

A dropout call's mask is a function of its seed only: eager, graph mode and XLA draw the same
bits (XLA maps random bits to floats differently from TensorFlow's kernels, so a mask compared
as a float would not be), and a mirrored step's replicas draw what one device draws for the
same slice of the global batch. Weight streaming against standard execution with dropout on:
tests/test_weight_streaming.py."""
from __future__ import annotations

import textwrap

import numpy as np
import pytest
import tensorflow as tf

from layers.dropout import dropout
from tests.numerics import adam_weight_atol, assert_weights_close, binomial_atol
from tests.runtime_helpers import run_result_script
from tests.test_weight_streaming import LOSS_RTOL

RATE = 0.1
SHAPE = [3, 4, 17, 16]          # [b, h, s, s_k]: odd sizes, so no path can assume a vector width


def on_every_path(function, *args):
    """{path: function(*args)} run eagerly, as a graph-mode tf.function and compiled by XLA."""
    return {"eager": function(*args), "graph": tf.function(function)(*args),
            "xla": tf.function(function, jit_compile=True)(*args)}


def dropped_with_gradient(x, seed):
    """A dropout call and its gradient (the mask times 1 / (1 - rate)): (y, dy/dx)."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = dropout(x, RATE, seed, 1)
    return y, tape.gradient(y, x)


def test_mask_bits_are_the_same_eager_in_graph_mode_and_under_xla():
    """The same seed drops the same elements on every path; the values kept are the same bits too
    (one multiplication by the same float32 scale)."""
    x = tf.random.stateless_normal(SHAPE, seed=[1, 2])                  # [b, h, s, s_k]
    seed = tf.constant([9, 4], tf.int64)
    results = on_every_path(dropped_with_gradient, x, seed)
    y, grad = (t.numpy() for t in results["eager"])
    for path in ("graph", "xla"):
        np.testing.assert_array_equal(results[path][0].numpy(), y, err_msg=path)
        np.testing.assert_array_equal(results[path][1].numpy(), grad, err_msg=path)
    kept = grad != 0
    np.testing.assert_array_equal(y != 0, kept)
    np.testing.assert_array_equal(y[kept], x.numpy()[kept] * np.float32(1 / (1 - RATE)))
    # a mask that keeps 1 - rate of the elements (4.5 standard errors: fails a right mask 7e-6 of runs)
    assert abs(kept.mean() - (1 - RATE)) <= binomial_atol(1 - RATE, kept.size)


def test_seed_derivation_is_the_same_on_every_path():
    """The seed of one dropout call, derived from (run seed, step, replica, micro-batch, layer, site)
    inside the compiled function, is the same on every path; each of those indices changes the mask."""
    from layers.dropout import fold_seed
    from runtime.steps import dropout_seed
    # (run seed, step offset, replica, micro-batch, layer, site): the first, then each index moved
    calls = [(9, 0, 0, 0, 1, 1), (8, 0, 0, 0, 1, 1), (9, 1, 0, 0, 1, 1), (9, 0, 1, 0, 1, 1),
             (9, 0, 0, 1, 1, 1), (9, 0, 0, 0, 2, 1), (9, 0, 0, 0, 1, 2)]

    def masks(step):                                                    # [calls, 1024]
        return tf.stack([dropout(tf.ones([1024]), RATE, fold_seed(dropout_seed(run_seed, step + offset, replica,
                                                                                 micro, micro_count=2), layer), site)
                         for run_seed, offset, replica, micro, layer, site in calls]) != 0
    results = on_every_path(masks, tf.constant(3, tf.int64))
    for path in ("graph", "xla"):
        np.testing.assert_array_equal(results[path].numpy(), results["eager"].numpy(), err_msg=path)
    drawn = results["eager"].numpy()
    for i in range(1, len(calls)):
        # independent masks differ in 2 p (1 - p) = 18% of places; 10% is 6.7 standard errors below (n = 1024)
        assert (drawn[0] != drawn[i]).mean() > 0.1, calls[i]


MIRRORED = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from runtime.estimator import Estimator
    from tests.runtime_helpers import tiny_params
    root, out = sys.argv[1], {}
    dropout = {"embedding_dropout_rate": 0.1, "attention_dropout_rate": 0.1, "residual_dropout_rate": 0.1}
    for strategy, accum in (("one_device", 2), ("mirrored", 1)):
        params = tiny_params(root, model=dropout, optimizer={"grad_accum_steps": accum},
                             runconfig={"max_steps": 3, "seed": 9, "strategy": strategy})
        estimator = Estimator(params, f"{root}/{strategy}")
        losses = {}
        estimator.train(on_step=lambda step, logs: losses.__setitem__(step, float(logs["loss"])))
        np.savez(f"{root}/{strategy}.npz", **{v.name: v.numpy() for v in estimator.model.trainable_variables})
        out[strategy] = {"replicas": estimator.strategy.num_replicas_in_sync,
                         "xla": estimator.execution.compile_path.jit_compile,
                         "losses": [losses[s] for s in sorted(losses)]}
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.same_kernels
@pytest.mark.numerics
@pytest.mark.processes
def test_each_replica_draws_the_masks_one_device_draws_for_its_slice(tmp_path):
    """Mirrored over 2 logical CPUs (graph mode) against one device (XLA) accumulating 2 micro-batches
    of the same rows: replica r's rows are micro-batch r's, and both draw slice r's masks, so the runs
    differ by summation order only (losses: LOSS_RTOL's argument; weights: the Adam bound). A replica
    drawing another slice's masks moves the loss by ~1e-3 relative."""
    result = run_result_script(MIRRORED, str(tmp_path))
    single, mirrored = result["one_device"], result["mirrored"]
    assert (single["replicas"], mirrored["replicas"]) == (1, 2)
    assert single["xla"] and not mirrored["xla"]       # float32 on one CPU: XLA; over two replicas: graph mode
    for step, (a, b) in enumerate(zip(single["losses"], mirrored["losses"]), start=1):
        assert b == pytest.approx(a, rel=LOSS_RTOL), f"step {step}"
    expected, actual = (np.load(tmp_path / f"{name}.npz") for name in ("one_device", "mirrored"))
    assert_weights_close([tf.Variable(expected[k], name=k) for k in expected.files],
                         [tf.Variable(actual[k], name=k) for k in expected.files],
                         adam_weight_atol(3, 3e-3), 3)
