"""Mirrored over 2 logical CPU devices equals one device at the same global batch.

Logical devices must be configured before TensorFlow initialises, so the comparison runs in a
fresh interpreter."""
from __future__ import annotations

import textwrap

import pytest

from tests.runtime_helpers import run_result_script

SCRIPT = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    from runtime.devices import set_cpu_devices
    set_cpu_devices(2)
    from runtime.estimator import Estimator
    from tests.runtime_helpers import saved_random_model, tiny_params
    root = sys.argv[1]
    base = saved_random_model(f"{root}/base", seed=2)[2].rsplit("/", 1)[0]
    lora = {"model": {"lora": {"rank": 4, "targets": ["q_proj", "v_proj", "fc_out"], "base_dtype": "int8"}}}
    out = {}
    for name, strategy in (("one_device", "one_device"), ("mirrored", "mirrored"),
                           ("lora_one_device", "one_device"), ("lora_mirrored", "mirrored")):
        sections = lora if name.startswith("lora") else {}
        params = tiny_params(root, **sections, runconfig={"max_steps": 2 if sections else 4, "strategy": strategy,
                                                          "checkpoint_path": base if sections else None})
        estimator = Estimator(params, f"{root}/{name}")
        losses = {}
        estimator.train(on_step=lambda step, logs: losses.__setitem__(step, logs["loss"]))
        out[name] = {"replicas": estimator.strategy.num_replicas_in_sync,
                         "losses": [losses[s] for s in sorted(losses)],
                         "eval": estimator.evaluate(restore=False)["loss"],
                         "weights": float(sum(tf.reduce_sum(tf.abs(v)) for v in estimator.model.trainable_variables))}
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.parametrize("run", ["", "lora_"])
def test_mirrored_two_devices_matches_one_device(mirrored_runs, run):
    """Full training, and LoRA on a frozen int8 base (runtime/lora.py): the same on 2 replicas."""
    single, mirrored = mirrored_runs[f"{run}one_device"], mirrored_runs[f"{run}mirrored"]
    assert (single["replicas"], mirrored["replicas"]) == (1, 2)
    # Two replicas' gradients summed by an all-reduce: a summation order. Losses (~4) as in
    # test_weight_streaming.LOSS_RTOL; the weights, each within adam_weight_atol(4, 3e-3) = 1.2e-5
    # with random signs, change sum|w| (~400 over 21k weights) by ~sqrt(21k) * 1.2e-5 = 2e-3 at
    # most: 5e-6 relative.
    for a, b in zip(single["losses"], mirrored["losses"]):
        assert abs(a - b) <= 1e-5 * abs(a)
    assert abs(single["eval"] - mirrored["eval"]) <= 1e-5 * abs(single["eval"])
    assert abs(single["weights"] - mirrored["weights"]) <= 1e-5 * single["weights"]


@pytest.fixture(scope="module")
def mirrored_runs(tmp_path_factory):
    return run_result_script(SCRIPT, str(tmp_path_factory.mktemp("mirrored")))


def test_a_step_over_several_cpu_replicas_compiles_in_graph_mode():
    """A step over several replicas all-reduces across devices (and XLA:CPU has no collectives in
    TF 2.21): a mirrored or multi-worker step takes graph mode under `auto` and refuses `true`
    with one error; one replica keeps the per-dtype choice (XLA for float32 on CPU and on GPU,
    graph mode for bfloat16 on CPU)."""
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
