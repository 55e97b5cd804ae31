"""Mirrored over 2 logical CPU devices equals one device at the same global batch.

Logical devices must be configured before TensorFlow initialises, so the comparison runs in a
fresh interpreter."""
from __future__ import annotations

import textwrap

from tests.runtime_helpers import run_result_script

SCRIPT = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    from runtime.devices import set_cpu_devices
    set_cpu_devices(2)
    from runtime.estimator import Estimator
    from tests.runtime_helpers import tiny_params
    root = sys.argv[1]
    out = {}
    for strategy in ("one_device", "mirrored"):
        params = tiny_params(root, runconfig={"max_steps": 4, "strategy": strategy})
        estimator = Estimator(params, f"{root}/{strategy}")
        losses = {}
        estimator.train(on_step=lambda step, logs: losses.__setitem__(step, logs["loss"]))
        out[strategy] = {"replicas": estimator.strategy.num_replicas_in_sync,
                         "losses": [losses[s] for s in sorted(losses)],
                         "eval": estimator.evaluate(restore=False)["loss"],
                         "weights": float(sum(tf.reduce_sum(tf.abs(v)) for v in estimator.model.trainable_variables))}
    print("RESULT " + json.dumps(out))
""")


def test_mirrored_two_devices_matches_one_device(tmp_path):
    result = run_result_script(SCRIPT, str(tmp_path))
    single, mirrored = result["one_device"], result["mirrored"]
    assert (single["replicas"], mirrored["replicas"]) == (1, 2)
    # Two replicas' gradients summed by an all-reduce: a summation order. Losses (~4) as in
    # test_weight_streaming.LOSS_RTOL; the weights, each within adam_weight_atol(4, 3e-3) = 1.2e-5
    # with random signs, change sum|w| (~400 over 21k weights) by ~sqrt(21k) * 1.2e-5 = 2e-3 at
    # most: 5e-6 relative.
    for a, b in zip(single["losses"], mirrored["losses"]):
        assert abs(a - b) <= 1e-5 * abs(a)
    assert abs(single["eval"] - mirrored["eval"]) <= 1e-5 * abs(single["eval"])
    assert abs(single["weights"] - mirrored["weights"]) <= 1e-5 * single["weights"]


def test_a_step_over_several_cpu_replicas_compiles_in_graph_mode():
    """A step over several replicas all-reduces across devices (and XLA:CPU has no collectives in
    TF 2.21): a mirrored or multi-worker step takes graph mode under `auto` and refuses `true`
    with one error; one replica keeps the per-dtype choice (XLA for float32 on CPU and on GPU,
    graph mode for bfloat16 on CPU)."""
    import pytest

    from config.params import ParamsError
    from runtime.compile_path import choose_compile_path
    assert choose_compile_path("auto", "float32", "CPU", replicas=2).jit_compile is False
    assert choose_compile_path("auto", "float32", "CPU", replicas=1).jit_compile is True
    assert choose_compile_path("auto", "float32", "GPU", replicas=2).jit_compile is False
    assert choose_compile_path("auto", "bfloat16", "GPU", replicas=1).jit_compile is True
    assert choose_compile_path("auto", "bfloat16", "CPU", replicas=1).jit_compile is False
    assert choose_compile_path(False, "float32", "CPU", replicas=2).jit_compile is False
    with pytest.raises(ParamsError, match="runconfig.jit_compile=true cannot compile a step over 2 replicas"):
        choose_compile_path(True, "float32", "CPU", replicas=2)
