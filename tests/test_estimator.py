"""The estimator: training, resume, accumulation, precision, warm start, eval outputs."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf

import model as model_module
from checkpoint_utils.convert_hf import convert
from runtime.estimator import Estimator, NonFiniteLossError
from tests.hf_models import make_hf_model, save_hf_model
from tests.numerics import LOGITS_VS_TRANSFORMERS, U_BF16, U_FP16, adam_weight_atol, assert_weights_close
from tests.runtime_helpers import SEQ, make_data, tiny_params


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    make_data(root)
    return root


def losses_of(estimator, max_steps=None):
    seen = {}
    estimator.train(max_steps, on_step=lambda step, logs: seen.__setitem__(step, logs["loss"]))
    return seen


def weights_of(estimator):
    return [v.numpy() for v in estimator.model.trainable_variables]


def test_training_lowers_loss_and_writes_outputs(data_root, tmp_path):
    estimator = Estimator(tiny_params(data_root, runconfig={"max_steps": 12}), str(tmp_path / "m"))
    before = estimator.evaluate(restore=False)["loss"]
    losses = losses_of(estimator)
    after = estimator.evaluate()
    assert after["loss"] < before - 0.5 and losses[12] < losses[1]
    assert after["perplexity"] == pytest.approx(np.exp(after["loss"]), rel=1e-12)  # exp of the same float64
    files = set(os.listdir(tmp_path / "m"))
    assert {"params.yaml", "checkpoint", "eval_results.json", "train_metrics.jsonl", "train", "eval"} <= files
    kept = sorted(int(f[5:-6]) for f in files if f.startswith("ckpt-") and f.endswith(".index"))
    assert kept == [4, 6, 8, 10, 12]  # every 2 steps, keep_checkpoint_max 5
    results = json.loads((tmp_path / "m" / "eval_results.json").read_text())
    assert results["latest"]["step"] == 12 and [h["step"] for h in results["history"]] == [0, 12]
    # the padded last eval example counts 3 labels, not 16: the mask reaches the loss
    assert results["latest"]["tokens"] == 15 * SEQ + 3
    events = [f for f in os.listdir(tmp_path / "m" / "train") if "tfevents" in f]
    assert events


def test_resume_continues_exactly_like_an_uninterrupted_run(data_root, tmp_path):
    params = tiny_params(data_root, runconfig={"max_steps": 6})
    straight = Estimator(params, str(tmp_path / "straight"))
    expected = losses_of(straight)
    first = Estimator(params, str(tmp_path / "resumed"))
    losses_of(first, max_steps=3)  # checkpoints at 2 and 3
    second = Estimator(params, str(tmp_path / "resumed"))
    resumed = losses_of(second)
    assert sorted(resumed) == [4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == [expected[s] for s in (4, 5, 6)]  # bit-identical
    for a, b in zip(weights_of(straight), weights_of(second)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.same_kernels
@pytest.mark.numerics
def test_gradient_accumulation_equals_the_larger_batch(data_root, tmp_path):
    whole = Estimator(tiny_params(data_root, runconfig={"max_steps": 3}), str(tmp_path / "a"))
    accumulated = Estimator(tiny_params(data_root, runconfig={"max_steps": 3}, optimizer={"grad_accum_steps": 4}),
                            str(tmp_path / "b"))
    la, lb = losses_of(whole), losses_of(accumulated)
    # losses (~4, means over 128 tokens): forward rounding ~2e-6 relative plus |grad L| * RMS(dw) ~ 1e-7
    np.testing.assert_allclose([la[s] for s in (1, 2, 3)], [lb[s] for s in (1, 2, 3)], rtol=1e-5)
    # four micro-batch gradients summed vs one batch: a summation order, bounded through Adam's step size
    assert_weights_close(whole.model.trainable_variables, accumulated.model.trainable_variables,
                         adam_weight_atol(3, whole.params.optimizer.learning_rate), steps=3)


@pytest.mark.numerics
@pytest.mark.mixed_precision
@pytest.mark.parametrize("dtype,scaling,unit_roundoff,runconfig", [
    ("bfloat16", 1.0, U_BF16, {}), ("float16", "dynamic", U_FP16, {}),
    # weight streaming keeps float32 weights on the host and copies them in the compute dtype
    ("bfloat16", 1.0, U_BF16, {"execution": "weight_streaming"}),
    ("float16", "dynamic", U_FP16, {"execution": "weight_streaming"}),
    ("bfloat16", 1.0, U_BF16, {"execution": "weight_streaming", "weight_streaming": {"host_store": "disk"}})],
    ids=["bfloat16", "float16", "bfloat16-streaming", "float16-streaming", "bfloat16-streaming-disk"])
def test_mixed_precision_runs_finite_and_close_to_float32(data_root, tmp_path, dtype, scaling, unit_roundoff,
                                                          runconfig):
    reference = losses_of(Estimator(tiny_params(data_root), str(tmp_path / "fp32")))
    mixed = Estimator(tiny_params(data_root, model={"mixed_precision": True, "mixed_precision_dtype": dtype},
                                  optimizer={"loss_scaling_factor": scaling}, runconfig=runconfig),
                      str(tmp_path / dtype))
    losses = losses_of(mixed)
    assert all(np.isfinite(v) for v in losses.values())
    # ~23 low-precision roundings on the way to a logit (2 blocks x 10, embedding, final norm, head)
    # bound |dz| by 23 u |z| with |z| <= 0.5 at init (std 0.02 weights); a token's loss moves by
    # <= |p - y|_1 |dz| <= 2 |dz|, and 6 steps lower the loss by <= 0.5, each step's direction off
    # by <= 23 u: |dL| <= 23 u (2 * 0.5 + 0.5) = 34.5 u, i.e. <= 10 u relative to L >= 3.5.
    np.testing.assert_allclose([losses[s] for s in range(1, 7)], [reference[s] for s in range(1, 7)],
                               rtol=10 * unit_roundoff)
    if dtype == "float16":
        assert float(mixed.loss_scale.scale.numpy()) == 2.0 ** 15  # no overflow: scale kept


@pytest.mark.numerics
def test_warm_start_first_loss_equals_transformers(data_root, tmp_path, capsys):
    import torch
    hf = make_hf_model("gptj_basic")  # vocab 101 >= our records' 64 ids
    converted = str(tmp_path / "converted")
    model_params = convert(save_hf_model(hf, str(tmp_path / "hf")), converted, progress=False)
    from config.schema import to_dict
    params = tiny_params(data_root, model=to_dict(model_params),
                         runconfig={"max_steps": 1, "checkpoint_path": converted},
                         train_input={"max_sequence_length": SEQ})
    estimator = Estimator(params, str(tmp_path / "run"))
    first = {}
    dataset = iter(__import__("data").input_fn(params, "train"))
    features, labels = next(dataset)
    estimator.train(on_step=lambda s, logs: first.setdefault(s, logs["loss"]))
    with torch.no_grad():
        logits = hf(torch.tensor(features["input_ids"].numpy(), dtype=torch.long)).logits
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                               torch.tensor(labels.numpy(), dtype=torch.long).reshape(-1),
                                               reduction="none")
        mask = torch.tensor(features["input_mask"].numpy(), dtype=torch.float32).reshape(-1)
        reference = float((ce * mask).sum() / mask.sum())
    # a token's cross-entropy moves by <= |p - y|_1 * max|dz| <= 2 * max|dz|, logits agreeing to
    # LOGITS_VS_TRANSFORMERS (tests/numerics.py); the mean over tokens keeps that bound
    assert first[1] == pytest.approx(reference, abs=2 * LOGITS_VS_TRANSFORMERS)
    assert "35 variables loaded, 0 missing (kept at initialisation), 0 skipped" in capsys.readouterr().out


def test_warm_start_reports_and_rejects_wrong_shapes(data_root, tmp_path, capsys):
    hf = make_hf_model("gptj_basic")
    converted = str(tmp_path / "converted")
    convert(save_hf_model(hf, str(tmp_path / "hf")), converted, progress=False)
    params = tiny_params(data_root, runconfig={"checkpoint_path": converted})
    from checkpoint_utils.load import CheckpointMismatchError
    with pytest.raises(CheckpointMismatchError, match=r"blocks/0/mlp/fc_in/bias has shape \[128\] but model "
                                                      r"params imply \[64\]; use the model: section"):
        Estimator(params, str(tmp_path / "run")).restore()


def test_non_finite_loss_names_the_step_and_keeps_the_checkpoint(data_root, tmp_path):
    def poisoned_model_fn(features, labels, mode, params, model, dropout_seed=None):
        spec = model_module.model_fn(features, labels, mode, params, model, dropout_seed)
        poison = tf.where(tf.equal(estimator.step, 3), float("nan"), 0.0)  # the 4th step's loss
        sums = dict(spec.sums, loss=spec.sums["loss"] + poison)
        return spec._replace(sums=sums)

    params = tiny_params(data_root, runconfig={"max_steps": 6})
    estimator = Estimator(params, str(tmp_path / "m"), model_fn=poisoned_model_fn)
    with pytest.raises(NonFiniteLossError, match=r"not finite at step 4 .*last good checkpoint is kept .*ckpt-2"):
        estimator.train()
    assert estimator.latest_checkpoint.endswith("ckpt-2")
    restored = Estimator(params, str(tmp_path / "m"))
    assert restored.restore() == 2


def test_ctrl_c_saves_a_checkpoint_and_the_rerun_continues(data_root, tmp_path):
    params = tiny_params(data_root, runconfig={"max_steps": 6, "save_checkpoints_steps": 100})
    expected = losses_of(Estimator(params, str(tmp_path / "straight")))

    def interrupt_at_3(step, logs):
        if step == 3:
            raise KeyboardInterrupt

    first = Estimator(params, str(tmp_path / "m"))
    with pytest.raises(KeyboardInterrupt):
        first.train(on_step=interrupt_at_3)
    assert first.latest_checkpoint.endswith("ckpt-3")
    resumed = losses_of(Estimator(params, str(tmp_path / "m")))
    assert [resumed[s] for s in (4, 5, 6)] == [expected[s] for s in (4, 5, 6)]
    logged = [json.loads(line)["step"] for line in open(tmp_path / "m" / "train_metrics.jsonl")]
    assert logged == [1, 2, 4, 5, 6]  # step 3 was interrupted before its log line; no duplicates


def test_a_runs_checkpoint_holds_model_keys_for_export_and_warm_start(data_root, tmp_path):
    """Export to HF and warm start read `model/<path>` keys: a trained run's checkpoint has them all."""
    from checkpoint_utils.export_hf import export
    from checkpoint_utils.load import load_model
    from checkpoint_utils.tf_checkpoint import variable_shapes
    params = tiny_params(data_root, runconfig={"max_steps": 2})
    trained = Estimator(params, str(tmp_path / "run"))
    trained.train()
    assert len(variable_shapes(trained.latest_checkpoint)) == len(trained.model.trainable_variables)
    loaded = load_model(params.model, str(tmp_path / "run"))
    for a, b in zip(trained.model.trainable_variables, loaded.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    export(str(tmp_path / "run" / "params.yaml"), str(tmp_path / "run"), str(tmp_path / "hf"), progress=False)
    assert (tmp_path / "hf" / "model.safetensors").exists()
    warm = Estimator(tiny_params(data_root, runconfig={"max_steps": 1, "checkpoint_path": str(tmp_path / "run")}),
                     str(tmp_path / "warm"))
    warm.restore()
    for a, b in zip(trained.model.trainable_variables, warm.model.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_eval_builds_no_optimizer_and_train_and_evaluate_restores_once(data_root, tmp_path):
    params = tiny_params(data_root, runconfig={"max_steps": 4, "eval_every_steps": 2, "eval_steps": 1})
    trainer = Estimator(params, str(tmp_path / "m"))
    restores = []
    original = trainer.execution.restore
    trainer.execution.restore = lambda require: restores.append(require) or original(require)
    trainer.train_and_evaluate()
    assert restores == [False]          # one read of model_dir, none after its own saves
    history = json.loads((tmp_path / "m" / "eval_results.json").read_text())["history"]
    assert [h["step"] for h in history] == [2, 4]
    evaluator = Estimator(params, str(tmp_path / "m"), training=False)
    assert evaluator.execution.optimizer is None
    model_variables = len(evaluator.model.variables)
    assert len(evaluator.execution.checkpoint._trackable_children()) == 3    # model, loss_scale, step
    # Same weights, batches and graph: only a different op schedule could reorder the float32 sums of
    # ~250 token losses (relative error <= 250 x 2^-24 = 1.5e-5 in the worst case; 2e-5 bounds it).
    assert evaluator.evaluate()["loss"] == pytest.approx(history[-1]["loss"], rel=2e-5)
    assert len(evaluator.model.variables) == model_variables
    with pytest.raises(RuntimeError, match="built for evaluation"):
        evaluator.train()


def test_the_update_island_is_traced_once_over_several_traces_of_the_step(data_root, tmp_path, monkeypatch):
    """Graph mode (islands on): three batch shapes trace the step three times; the update's XLA
    island, built once by the backend, is traced (and compiled) once, its inputs being the same
    gradients and sums each time. Counted by the Python calls a trace makes: step_logs once per
    trace of the step, gradient_factor once per trace of the island."""
    from config import modes
    from runtime import steps
    counts = {"step": 0, "island": 0}

    def counting(name, function):
        def call(*args):
            counts[name] += 1
            return function(*args)
        return call

    monkeypatch.setattr(steps, "step_logs", counting("step", steps.step_logs))
    monkeypatch.setattr(steps, "gradient_factor", counting("island", steps.gradient_factor))
    execution = Estimator(tiny_params(data_root, runconfig={"jit_compile": False}), str(tmp_path / "m")).execution
    features, labels = next(iter(execution.dataset(modes.TRAIN, 0)))
    for length in (SEQ, SEQ - 4, SEQ - 8):
        logs = execution.train_step({k: v[:, :length] for k, v in features.items()}, labels[:, :length])
        assert np.isfinite(logs["loss"].numpy())
    assert counts == {"step": 3, "island": 1}
