"""Tensor parallelism on a 2x2 mesh (data=2, model=2) of logical CPU devices equals one device:
training (loss, gradients, AdamW update), evaluation, greedy KV-cache generation; each device
holds 1/M of every split weight; checkpoints are a one-device run's, resumable both ways.

Logical devices must be configured before TensorFlow initialises, so each comparison runs in a
fresh interpreter (as tests/test_distribution.py does) and reports JSON; arrays go through .npz.

Tolerances: the mesh computes the same float32 math as one device in another summation order
(partial sums over the model axis all-reduced, the two data halves' gradients summed), which is
what tests/test_distribution.py bounds for a mirrored run: losses within LOSS_RTOL
(tests/test_weight_streaming.py), weights within adam_weight_atol (tests/numerics.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.numerics import U32, adam_weight_atol, float32_atol, forward_reductions
from tests.test_weight_streaming import LOSS_RTOL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR = 3e-3                     # tests/runtime_helpers.raw_params
MESH = {"data": 2, "model": 2}

PRELUDE = textwrap.dedent("""
    import json, os, shutil, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 4)
    from runtime.estimator import Estimator
    from tests.runtime_helpers import tiny_params
    root, out = sys.argv[1], {}
    MESH = {"data": 2, "model": 2}

    def train(directory, steps, mesh, model=None):
        run = {"max_steps": steps, "jit_compile": False, **({"mesh": MESH} if mesh else {})}
        estimator = Estimator(tiny_params(root, runconfig=run, model=model or {}), directory)
        losses = {}
        estimator.train(on_step=lambda step, logs: losses.__setitem__(step, logs["loss"]))
        return estimator, losses

    def checkpoint_arrays(directory):
        reader = tf.train.load_checkpoint(directory)
        return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map() if k.startswith(("model/", "optimizer/"))}
""")

TRAIN = PRELUDE + textwrap.dedent("""
    from tensorflow.experimental import dtensor
    from config.params import ParamsError
    from layers.tree import flatten_weights
    from runtime.mesh_layouts import local_shapes, weight_sharding
    # GPT-NeoX-style switches (q/k/v and output biases, two LayerNorms, sequential residual, the
    # head tied to the embedding): the GPT-J layout is covered by the resume and generation tests.
    neox = {"use_projection_bias_in_attention": True, "use_attention_output_bias": True,
            "use_untied_layer_norm": True, "use_parallel_residual": False, "share_embedding_weights": True,
            "rotary_style": "neox"}
    one, one_losses = train(f"{root}/one", 3, mesh=False, model=neox)
    mesh, mesh_losses = train(f"{root}/mesh", 3, mesh=True, model=neox)
    out["losses"] = [one_losses, mesh_losses]
    arrays = [checkpoint_arrays(f"{root}/one"), checkpoint_arrays(f"{root}/mesh")]
    out["keys"] = [{k: list(v.shape) for k, v in a.items()} for a in arrays]
    np.savez(f"{root}/one.npz", **arrays[0]); np.savez(f"{root}/mesh.npz", **arrays[1])
    weights = flatten_weights(mesh.model.weights_tree())
    out["local"] = {path: [list(weight.shape), list(weight_sharding(path, weight.shape.rank)), local_shapes(weight)]
                    for path, weight in weights.items()}
    slots = mesh.execution.optimizer._slots[[id(v) for v in mesh.model.trainable_variables].index(
        id(weights["blocks/0/mlp/fc_in/kernel"]))]
    out["fc_in_slot_local"] = local_shapes(slots["velocity"])
    try:
        Estimator(tiny_params(root, runconfig={"mesh": {"data": 2, "model": 1}}), f"{root}/bad")
        out["bad_mesh"] = None
    except ParamsError as err:
        out["bad_mesh"] = [str(err), os.path.exists(f"{root}/bad")]
    print("RESULT " + json.dumps(out))
""")

RESUME = PRELUDE + textwrap.dedent("""
    one, _ = train(f"{root}/one", 2, mesh=False)
    shutil.copytree(f"{root}/one", f"{root}/mesh")
    reference = {}
    one.train(max_steps=4, on_step=lambda step, logs: reference.__setitem__(step, logs["loss"]))
    # run.py --mode train on the mesh resumes the one-device step 2.
    import yaml, run
    from tests.runtime_helpers import raw_params
    with open(f"{root}/mesh.yaml", "w") as f:
        yaml.safe_dump(raw_params(root, runconfig={"jit_compile": False, "mesh": MESH}), f)
    assert run.main(["--mode", "train", "--params", f"{root}/mesh.yaml", "--model-dir", f"{root}/mesh",
                     "--max-steps", "3"]) == 0
    with open(f"{root}/mesh/train_metrics.jsonl") as f:
        on_mesh = {json.loads(line)["step"]: json.loads(line)["loss"] for line in f}
    on_mesh = {step: loss for step, loss in on_mesh.items() if step > 2}
    shutil.copytree(f"{root}/mesh", f"{root}/back")
    _, back = train(f"{root}/back", 4, mesh=False)                      # resumes the mesh's step 3
    np.savez(f"{root}/one.npz", **checkpoint_arrays(f"{root}/one"))
    np.savez(f"{root}/back.npz", **checkpoint_arrays(f"{root}/back"))
    print("RESULT " + json.dumps({"reference": reference, "mesh": on_mesh, "back": back}))
""")

GENERATE = PRELUDE + textwrap.dedent("""
    from tensorflow.experimental import dtensor
    from generation.config import GenerationConfig
    from generation.generator import Generator
    from generation.mesh import MeshGenerator
    from model import GPTJModel
    from runtime.mesh_layouts import replicated
    # The mesh model warm starts (--checkpoint-path) from a one-device model's checkpoint.
    one = GPTJModel(tiny_params(root).model, seed=7)
    tf.train.Checkpoint(model=one).save(f"{root}/one/ckpt")
    estimator = Estimator(tiny_params(root, runconfig={"mesh": MESH, "checkpoint_path": f"{root}/one"},
                                      eval_input={"batch_size": 5}), f"{root}/mesh", training=False)
    estimator.restore()
    split, mesh = estimator.model, estimator.execution.mesh
    # Evaluation (run.py --mode eval) of the same weights on one device and on the mesh, in batches
    # of 5 (16 examples: the last batch of 1 does not split over data=2 and is replicated).
    reference = Estimator(tiny_params(root, runconfig={"checkpoint_path": f"{root}/one", "jit_compile": False},
                                      eval_input={"batch_size": 5}), f"{root}/reference", training=False)
    out["eval"] = [reference.evaluate()["loss"], estimator.evaluate(restore=False)["loss"]]
    prompts = [[5, 9, 2, 33, 17, 8, 61], [40, 3]]
    generation = GenerationConfig(max_new_tokens=8)
    out["one"] = [g.token_ids for g in Generator(one, "graph", length_multiple=8).generate(prompts, generation)]
    with dtensor.default_mesh(mesh):
        out["mesh"] = [g.token_ids for g in MeshGenerator(split, mesh, length_multiple=8).generate(prompts, generation)]
    # Logits of a cached decode step (prefill 6 tokens, then 2 more), both ways.
    ids = np.array([[5, 9, 2, 33, 17, 8, 61, 40], [40, 3, 11, 12, 13, 14, 15, 16]], np.int32)
    def cached(model, place):
        cache = tuple(tuple(place(t) for t in pair) for pair in model.empty_cache(2, 8))
        first = tf.function(lambda x, c: model(x, cache=c, cache_index=0))(place(ids[:, :6]), cache)
        return tf.function(lambda x, c: model(x, cache=c, cache_index=6).logits)(place(ids[:, 6:]), first.cache)
    np.save(f"{root}/one.npy", cached(one, tf.constant).numpy())
    with dtensor.default_mesh(mesh):
        logits = cached(split, lambda t: replicated(mesh, t))
    np.save(f"{root}/mesh.npy", dtensor.unpack(dtensor.relayout(logits, dtensor.Layout.replicated(mesh, 3)))[0].numpy())
    # The activations' layouts, op by op (eager): heads stay split through attention.
    from runtime.mesh_layouts import batch_to_mesh
    layouts = {}
    with dtensor.default_mesh(mesh):
        weights = tf.nest.map_structure(lambda v: v.read_value(), split.weights_tree())
        block, attention = weights["blocks"][0], split.blocks[0].attn
        x = split.blocks[0].ln_1.forward(block["ln_1"], split.embed(weights, batch_to_mesh(mesh, ids)))
        q = tf.reshape(attention.q_proj.forward(block["attn"]["q_proj"], x), [2, 8, 4, 8])    # [b, s, h, hd]
        scores = tf.einsum("bqhd,bkhd->bhqk", q, q)
        context = tf.reshape(tf.einsum("bhqk,bkhd->bqhd", scores, q), [2, 8, 32])
        for name, t in {"q": q, "scores": scores, "context": context,
                        "out_proj": attention.out_proj.forward(block["attn"]["out_proj"], context),
                        "fc_in": split.blocks[0].mlp.fc_in.forward(block["mlp"]["fc_in"], x)}.items():
            layouts[name] = dtensor.fetch_layout(t).sharding_specs
    out["layouts"] = layouts
    print("RESULT " + json.dumps(out))
""")


def _run(script: str, root) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-c", script, str(root)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])


def _assert_same_checkpoint(expected: dict, actual: dict, steps: int) -> None:
    """Model weights within the Adam bound; optimizer slots and counters by their own size."""
    assert sorted(expected) == sorted(actual)
    for key in expected:
        if key.startswith("model/"):
            np.testing.assert_allclose(actual[key], expected[key], rtol=2 * steps * U32,
                                       atol=adam_weight_atol(steps, LR), err_msg=key)
        else:
            # Slots are running means of gradients (momentum) and squared gradients (velocity): their
            # rounding is GRADIENT_ROUNDING-sized relative to the largest entry; 1e-4 of it holds 20x.
            scale = float(np.max(np.abs(expected[key]))) if expected[key].size else 0.0
            np.testing.assert_allclose(actual[key], expected[key], rtol=0, atol=1e-4 * scale + 1e-12, err_msg=key)


@pytest.mark.numerics
@pytest.mark.processes
def test_training_on_a_2x2_mesh_equals_one_device(tmp_path):
    """NeoX-style model (see TRAIN): losses, checkpoint, per-device pieces, device-count error."""
    result = _run(TRAIN, tmp_path)
    one, mesh = result["losses"]
    assert sorted(one) == sorted(mesh) == ["1", "2", "3"]
    for step in one:
        assert mesh[step] == pytest.approx(one[step], rel=LOSS_RTOL)
    # The checkpoint: a one-device run's keys and full shapes, and its values.
    assert result["keys"][0] == result["keys"][1]
    _assert_same_checkpoint(dict(np.load(tmp_path / "one.npz")), dict(np.load(tmp_path / "mesh.npz")), steps=3)
    # Each of the 4 devices holds 1/M of every split weight (and whole replicated ones).
    split = set()
    for path, (shape, sharding, pieces) in result["local"].items():
        local = [n // MESH["model"] if axis == "model" else n for n, axis in zip(shape, sharding)]
        assert pieces == [local] * 4, path
        if "model" in sharding:
            split.add(path.split("/", 2)[-1] if path.startswith("blocks/") else path)
    assert split == {"attn/q_proj/kernel", "attn/k_proj/kernel", "attn/v_proj/kernel", "attn/q_proj/bias",
                     "attn/k_proj/bias", "attn/v_proj/bias", "attn/out_proj/kernel", "mlp/fc_in/kernel",
                     "mlp/fc_in/bias", "mlp/fc_out/kernel", "embedding/embeddings", "lm_head_bias"}
    assert result["local"]["blocks/0/attn/q_proj/kernel"][2][0] == [32, 16]       # 2 of 4 heads, whole
    assert result["fc_in_slot_local"] == [[32, 32]] * 4                         # Adam's slots split as their weight
    message, created = result["bad_mesh"]
    assert "runconfig.mesh data=2 x model=1 = 2 devices, but this process has 4 CPU device(s)" in message
    assert not created


@pytest.mark.numerics
@pytest.mark.processes
def test_checkpoints_resume_across_mesh_and_one_device(tmp_path):
    """one device to step 2; run.py --mode train on the mesh to step 3; one device again to step 4."""
    result = _run(RESUME, tmp_path)
    reference, mesh, back = result["reference"], result["mesh"], result["back"]
    assert sorted(mesh) == ["3"] and sorted(back) == ["4"]
    for step, loss in {**mesh, **back}.items():
        assert loss == pytest.approx(reference[step], rel=LOSS_RTOL)
    _assert_same_checkpoint(dict(np.load(tmp_path / "one.npz")), dict(np.load(tmp_path / "back.npz")), steps=4)


@pytest.mark.numerics
@pytest.mark.processes
def test_greedy_generation_on_a_2x2_mesh_equals_one_device(tmp_path):
    """A mesh model warm started from a one-device checkpoint evaluates and decodes as that model does."""
    result = _run(GENERATE, tmp_path)
    expected, actual = np.load(tmp_path / "one.npy"), np.load(tmp_path / "mesh.npy")
    # Another summation order of the same float32 forward (2 blocks, sums of <= 64 terms).
    atol = float32_atol(forward_reductions(2), 64, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=atol)
    assert atol < 1e-5
    assert result["eval"][1] == pytest.approx(result["eval"][0], rel=LOSS_RTOL)
    assert result["mesh"] == result["one"]
    assert all(len(ids) == 8 for ids in result["one"])
    # Megatron's activations: q and the scores split by heads, the row-split out_proj's output whole
    # (all-reduced), fc_in's output split by columns; every one split by rows over `data`.
    assert result["layouts"] == {"q": ["data", "unsharded", "model", "unsharded"],
                                 "scores": ["data", "model", "unsharded", "unsharded"],
                                 "context": ["data", "unsharded", "model"],
                                 "out_proj": ["data", "unsharded", "unsharded"],
                                 "fc_in": ["data", "unsharded", "model"]}


@pytest.mark.parametrize("per_row", [False, True])
def test_blend_cache_writes_what_write_cache_writes(per_row):
    import tensorflow as tf

    from layers.attention import blend_cache, write_cache
    rng = np.random.default_rng(0)
    cache = tf.constant(rng.standard_normal([3, 2, 10, 4]), tf.float32)       # [b, h, L, d]
    new = tf.constant(rng.standard_normal([3, 4, 2, 4]), tf.float32)          # [b, s, h, d]
    index = tf.constant([0, 3, 6] if per_row else 5, tf.int32)
    # Both copy values (no arithmetic): exactly equal.
    np.testing.assert_array_equal(blend_cache(cache, new, index).numpy(), write_cache(cache, new, index).numpy())


@pytest.mark.parametrize("model", [
    {},                                                                      # GPT-J: no q/k/v biases, untied head
    {"use_projection_bias_in_attention": True, "use_attention_output_bias": True, "use_untied_layer_norm": True,
     "share_embedding_weights": True, "rotary_style": "neox"},                 # NeoX-style switches, tied head
])
def test_every_weight_has_its_megatron_layout(model):
    from config.params import ModelParams
    from model import weight_specs
    from runtime.mesh_layouts import weight_sharding
    config = ModelParams(**{"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1, "num_heads": 4,
                            "rotary_dim": 4, "filter_size": 64, **model})
    columns, rows = ("model",), ("model", "unsharded")
    expected = {"attn/q_proj/kernel": ("unsharded", "model"), "attn/k_proj/kernel": ("unsharded", "model"),
                "attn/v_proj/kernel": ("unsharded", "model"), "mlp/fc_in/kernel": ("unsharded", "model"),
                "attn/q_proj/bias": columns, "attn/k_proj/bias": columns, "attn/v_proj/bias": columns,
                "mlp/fc_in/bias": columns, "attn/out_proj/kernel": rows, "mlp/fc_out/kernel": rows,
                "embedding/embeddings": rows, "lm_head/kernel": ("unsharded", "model"), "lm_head/bias": columns,
                "lm_head_bias": columns}
    for spec in weight_specs(config):
        short = spec.path.split("/", 2)[-1] if spec.path.startswith("blocks/") else spec.path
        assert weight_sharding(spec.path, len(spec.shape)) == expected.get(short, ("unsharded",) * len(spec.shape)), \
            spec.path
