"""Weight streaming: same updates as standard execution, blocks on the compute device, weights
on the host, at most prefetch_blocks + 1 blocks resident, interchangeable checkpoints."""
from __future__ import annotations

import json
import os
import textwrap

import pytest

from runtime.estimator import Estimator
from config.params import ParamsError
from tests.numerics import adam_weight_atol, assert_weights_close, sgd_weight_atol
from tests.runtime_helpers import make_data, run_result_script, tiny_params


# Per-step losses (about 4, a mean over 128 tokens) of two executions that differ by summation
# order: the forward pass rounds at ~sqrt(21 * 64) * u = 2e-6 relative, and the weights' earlier
# differences (random signs, RMS ~1e-7) shift the loss by ~|grad L| * RMS(dw) <= 1.5 * 1e-7.
# 1e-5 relative holds with a 5x margin.
LOSS_RTOL = 1e-5


# Dropout on every site of a GPT-NeoX-style model (fused qkv, untied LayerNorms): the streamed
# pieces (the forward, block 0's recomputation in the backward pass, the last block run with the
# head; with prefetch_blocks 0 every block recomputed) must draw standard execution's masks, so the
# runs still differ by summation order only: a mask keeps or zeroes a value and scales it by one
# constant, adding no reduction, so LOSS_RTOL's argument holds. One other mask moves the loss by
# ~1e-3 relative.
DROPOUT_MODEL = {"rotary_style": "neox", "use_untied_layer_norm": True, "fused_qkv": True,
                 "embedding_dropout_rate": 0.1, "attention_dropout_rate": 0.1, "residual_dropout_rate": 0.1}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    make_data(root)
    return root


def train(params, model_dir, max_steps=None):
    estimator = Estimator(params, model_dir)
    losses = {}
    estimator.train(max_steps, on_step=lambda step, logs: losses.__setitem__(step, logs["loss"]))
    return estimator, losses


def assert_same_weights(a, b, params):
    assert_same_model_weights(a.model, b.model, params)


def assert_same_model_weights(a, b, params):
    """Two executions' weights after `max_steps` updates on gradients that differ by summation
    order only: the bound follows from the optimizer's update size (tests/numerics.py)."""
    config, steps = params.optimizer, params.runconfig.max_steps
    if config.optimizer_type == "sgd":
        atol = sgd_weight_atol(steps, config.learning_rate, config.momentum)
    else:
        atol = adam_weight_atol(steps, config.learning_rate)
    assert_weights_close(a.trainable_variables, b.trainable_variables, atol, steps)


@pytest.mark.same_kernels
@pytest.mark.numerics
@pytest.mark.parametrize("sections", [
    {},
    {"optimizer": {"grad_accum_steps": 2}},
    # SGD here: the tied embedding sums two gradient contributions in another order (1e-7
    # relative); AdamW can turn such a difference on a near-zero gradient into an lr-sized step.
    {"model": {"share_embedding_weights": True, "use_untied_layer_norm": True, "rotary_style": "neox"},
     "optimizer": {"optimizer_type": "sgd", "momentum": 0.9, "learning_rate": 0.1, "weight_decay_rate": 0.0}},
    {"model": DROPOUT_MODEL, "optimizer": {"grad_accum_steps": 2}, "runconfig": {"seed": 9}},
    # every block recomputed in the backward pass, the last one too
    {"model": DROPOUT_MODEL, "runconfig": {"seed": 9, "weight_streaming": {"prefetch_blocks": 0}}},
], ids=["adamw", "accumulated", "tied_sgd", "dropout_accumulated", "dropout_prefetch_0"])
def test_same_losses_and_weights_as_standard(data_root, tmp_path, sections):
    def params(execution):
        merged = {k: dict(v) for k, v in sections.items()}
        merged.setdefault("runconfig", {}).update(execution=execution, max_steps=4)
        return tiny_params(data_root, **merged)

    standard, expected = train(params("standard"), str(tmp_path / "standard"))
    streamed, losses = train(params("weight_streaming"), str(tmp_path / "streamed"))
    for step in expected:
        assert losses[step] == pytest.approx(expected[step], rel=LOSS_RTOL)
    assert_same_weights(standard, streamed, standard.params)


@pytest.mark.same_kernels
@pytest.mark.numerics
def test_checkpoints_are_interchangeable(data_root, tmp_path):
    standard, expected = train(tiny_params(data_root, runconfig={"max_steps": 4}), str(tmp_path / "a"))
    # streamed for 2 steps, then standard to 4; and the reverse
    for first, second, name in (("weight_streaming", "standard", "b"), ("standard", "weight_streaming", "c")):
        train(tiny_params(data_root, runconfig={"execution": first, "max_steps": 2}), str(tmp_path / name))
        resumed, losses = train(tiny_params(data_root, runconfig={"execution": second, "max_steps": 4}),
                                str(tmp_path / name))
        assert sorted(losses) == [3, 4]
        assert losses[4] == pytest.approx(expected[4], rel=LOSS_RTOL)
        assert_same_weights(standard, resumed, standard.params)


DISK = {"execution": "weight_streaming", "weight_streaming": {"host_store": "disk"}}


def disk_params(data_root, max_steps, **sections):
    runconfig = dict(DISK, max_steps=max_steps, **sections.pop("runconfig", {}))
    return tiny_params(data_root, runconfig=runconfig, **sections)


@pytest.mark.same_kernels
@pytest.mark.numerics
@pytest.mark.parametrize("sections", [
    # decay 0.1: a decay the disk store forgot or misplaced moves a weight by steps * lr * 0.1 * |w|
    # = 1.8e-5 at |w| = 0.02, twice the Adam bound (9e-6); with the default 0.01 it would hide in it
    {"optimizer": {"weight_decay_rate": 0.1}},
    {"optimizer": {"optimizer_type": "adam", "weight_decay_rate": 0.0, "grad_accum_steps": 2}},
    {"optimizer": {"optimizer_type": "sgd", "momentum": 0.9, "learning_rate": 0.1, "weight_decay_rate": 0.0}},
    {"model": DROPOUT_MODEL, "optimizer": {"grad_accum_steps": 2}, "runconfig": {"seed": 9}}],
    ids=["adamw", "adam_accumulated", "sgd_momentum", "dropout_accumulated"])
def test_disk_store_matches_standard(data_root, tmp_path, sections):
    sections = dict(sections)
    runconfig = sections.pop("runconfig", {})
    standard, expected = train(tiny_params(data_root, runconfig={"max_steps": 3, **runconfig}, **sections),
                               str(tmp_path / "a"))
    disk, losses = train(disk_params(data_root, 3, runconfig=runconfig, **sections), str(tmp_path / "b"))
    for step in expected:
        assert losses[step] == pytest.approx(expected[step], rel=LOSS_RTOL)
    from checkpoint_utils.load import load_model
    assert_same_model_weights(standard.model, load_model(standard.params.model, str(tmp_path / "b")),
                              standard.params)
    store = os.listdir(tmp_path / "b" / "weight_store")
    assert sorted(store) == ["grad", "m", "param", "state.json", "v"]


@pytest.mark.same_kernels
@pytest.mark.numerics
def test_disk_checkpoints_are_interchangeable_and_a_dirty_store_is_rebuilt(data_root, tmp_path):
    standard, expected = train(tiny_params(data_root, runconfig={"max_steps": 4}), str(tmp_path / "a"))
    train(disk_params(data_root, 2), str(tmp_path / "b"))
    resumed, losses = train(tiny_params(data_root, runconfig={"max_steps": 4}), str(tmp_path / "b"))
    assert losses[4] == pytest.approx(expected[4], rel=LOSS_RTOL)
    train(tiny_params(data_root, runconfig={"max_steps": 2}), str(tmp_path / "c"))
    _, losses = train(disk_params(data_root, 4), str(tmp_path / "c"))
    assert sorted(losses) == [3, 4] and losses[4] == pytest.approx(expected[4], rel=LOSS_RTOL)
    # a kill mid-step leaves the store marked dirty: the next run rebuilds it from ckpt-4
    state_file = tmp_path / "c" / "weight_store" / "state.json"
    state = json.loads(state_file.read_text())
    state["clean"] = False
    state_file.write_text(json.dumps(state))
    (tmp_path / "c" / "weight_store" / "param" / "ln_f__gamma.f32").write_bytes(b"\0" * 4 * 32)
    _, more = train(disk_params(data_root, 5), str(tmp_path / "c"))
    straight, reference = train(tiny_params(data_root, runconfig={"max_steps": 5}), str(tmp_path / "d"))
    assert more[5] == pytest.approx(reference[5], rel=LOSS_RTOL)


@pytest.mark.same_kernels
@pytest.mark.numerics
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_disk_sgd_checkpoints_resume_in_standard_mode(data_root, tmp_path, momentum):
    """SGD's slots (a momentum per variable, or none) land under the keys Keras's SGD restores."""
    sgd = {"optimizer_type": "sgd", "momentum": momentum, "learning_rate": 0.1, "weight_decay_rate": 0.0}
    _, expected = train(tiny_params(data_root, runconfig={"max_steps": 4}, optimizer=sgd), str(tmp_path / "a"))
    train(disk_params(data_root, 2, optimizer=sgd), str(tmp_path / "b"))
    # step 4's loss follows update 3, the first to use the restored momentum
    _, losses = train(tiny_params(data_root, runconfig={"max_steps": 4}, optimizer=sgd), str(tmp_path / "b"))
    assert sorted(losses) == [3, 4] and losses[4] == pytest.approx(expected[4], rel=LOSS_RTOL)


def test_mixed_precision_copies_weights_in_the_compute_dtype(data_root, tmp_path):
    """bfloat16 streaming: float32 weights on the host, copied in bfloat16 except LayerNorm's (used in float32)."""
    params = tiny_params(data_root, model={"mixed_precision": True, "mixed_precision_dtype": "bfloat16"},
                         runconfig={"execution": "weight_streaming"})
    estimator = Estimator(params, str(tmp_path))
    streamer = estimator.execution.streamer
    assert {v.dtype.name for v in estimator.model.trainable_variables} == {"float32"}
    block = streamer.new_stream().get(1, [1])
    assert block["attn"]["q_proj"]["kernel"].dtype.name == "bfloat16"
    assert block["mlp"]["fc_in"]["bias"].dtype.name == "bfloat16"
    assert block["ln_1"]["gamma"].dtype.name == "float32" and block["ln_1"]["beta"].dtype.name == "float32"
    assert streamer.new_stream().get(0, [0])["embedding"]["embeddings"].dtype.name == "bfloat16"


def test_unsupported_settings_are_rejected(data_root, tmp_path):
    with pytest.raises(ParamsError, match="runs on one compute device; runconfig.strategy='mirrored'"):
        Estimator(tiny_params(data_root, runconfig={"execution": "weight_streaming", "strategy": "mirrored"}),
                  str(tmp_path))


PLACEMENT = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    from runtime.devices import set_cpu_devices
    set_cpu_devices(2)
    from runtime.estimator import Estimator
    from tests.runtime_helpers import tiny_params
    root, out = sys.argv[1], {}
    for prefetch, jit in ((0, "auto"), (1, "auto"), (2, "auto"), (1, False)):
        params = tiny_params(root, model={"num_hidden_layers": 4}, runconfig={
            "execution": "weight_streaming", "max_steps": 2, "jit_compile": jit,
            "weight_streaming": {"compute_device": "/CPU:1", "prefetch_blocks": prefetch}})
        estimator = Estimator(params, f"{root}/m{prefetch}{jit}")
        estimator.train()
        step = estimator.execution.streamer
        out[f"{prefetch} {jit}"] = {
            "max_resident": step.last_stream.max_resident, "copies": step.last_stream.copies_made,
            "activations": step.last_activation_devices,
            "variables": sorted({v.device for v in estimator.model.trainable_variables}),
            "xla": step.compile_path.jit_compile, "traces": step.compiled.tracing_counts()}
    print("RESULT " + json.dumps(out))
""")


def test_placement_on_two_logical_devices(data_root):
    """Compiled pieces (XLA and graph mode) on a second logical CPU: at most prefetch + 1 pieces resident,
    every activation on the compute device, every variable on the host, one trace per piece kind."""
    result = run_result_script(PLACEMENT, data_root)
    for key, seen in result.items():
        prefetch = int(key.split()[0])
        assert seen["max_resident"] <= prefetch + 1
        # forward: embedding, 4 blocks, head; backward: 4 blocks (3 when the last block runs with the
        # head, prefetch >= 1), embedding
        assert seen["copies"] == 6 + (5 if prefetch == 0 else 4)
        assert seen["activations"] and all(d.endswith("CPU:1") for d in seen["activations"])
        assert seen["variables"] and all(d.endswith("CPU:0") for d in seen["variables"])
        # two steps of 4 blocks: each piece's function traced once (blocks share theirs)
        assert seen["traces"]["block_forward"] == 1 and seen["traces"]["block_backward"] == 1
        assert seen["traces"]["head_backward"] == 1 and seen["traces"]["embed_backward"] == 1
    assert result["0 auto"]["max_resident"] == 1 and result["2 auto"]["max_resident"] == 3
    assert result["1 auto"]["xla"] and not result["1 False"]["xla"]     # float32 on CPU: XLA under auto
