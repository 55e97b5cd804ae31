"""Tensor parallelism on a 2x2 mesh (data=2, model=2) of logical CPU devices equals one device:
`run.py` with `runconfig.cpu_devices`, training (loss, gradients, AdamW update), a vocabulary the
mesh does not divide, evaluation, greedy KV-cache generation; each device holds 1/M of every
split weight; checkpoints are a one-device run's, resumable both ways.

Logical devices are fixed once TensorFlow starts, so every comparison runs in one fresh
interpreter (SCRIPT, started once for the module) whose first TensorFlow work is `run.main` with
`--set runconfig.cpu_devices=4`, as a user's command on a CPU machine; it reports JSON, arrays go
through .npz, and each test below checks one part.

Tolerances: the mesh computes the same float32 math as one device in another summation order
(partial sums over the model axis all-reduced, the two data halves' gradients summed), which is
what tests/test_distribution.py bounds for a mirrored run: losses within LOSS_RTOL
(tests/test_weight_streaming.py), weights within adam_weight_atol (tests/numerics.py).
"""
from __future__ import annotations

import textwrap

import numpy as np
import pytest

from tests.numerics import U32, adam_weight_atol, float32_atol, forward_reductions
from tests.runtime_helpers import run_result_script
from tests.test_weight_streaming import LOSS_RTOL

LR = 3e-3                     # tests/runtime_helpers.raw_params
MESH = {"data": 2, "model": 2}
ODD_VOCAB = 67                # model=2 does not divide it

SCRIPT = textwrap.dedent("""
    import json, os, shutil, sys
    import numpy as np
    import tensorflow as tf
    import yaml
    from tensorflow.experimental import dtensor
    import run
    from config.params import ParamsError
    from generation.config import GenerationConfig
    from generation.generator import Generator
    from generation.mesh import MeshGenerator
    from layers.tree import flatten_weights
    from model import GPTJModel
    from runtime.devices import set_cpu_devices
    from runtime.estimator import Estimator
    from runtime.mesh_layouts import batch_to_mesh, local_shapes, replicated
    from tests.runtime_helpers import raw_params, tiny_params
    root, odd_vocab = sys.argv[1], int(sys.argv[2])
    MESH = {"data": 2, "model": 2}

    def train(directory, steps, mesh, model=None):
        runconfig = {"max_steps": steps, "jit_compile": False, **({"mesh": MESH} if mesh else {})}
        estimator = Estimator(tiny_params(root, runconfig=runconfig, model=model or {}), directory)
        losses = {}
        estimator.train(on_step=lambda step, logs: losses.__setitem__(step, logs["loss"]))
        return estimator, losses

    def save_checkpoint_arrays(name, directory):
        reader = tf.train.load_checkpoint(directory)
        np.savez(f"{root}/{name}.npz", **{k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
                                          if k.startswith(("model/", "optimizer/"))})

    def pieces(weights, paths):          # path -> [full shape, its layout's sharding, each device's piece]
        return {path: [list(weights[path].shape), dtensor.fetch_layout(weights[path]).sharding_specs,
                       local_shapes(weights[path])] for path in paths}

    def run_py():
        # run.py --mode train on the mesh, as typed on a machine of one CPU device: the first thing to
        # start TensorFlow in this process, so its runconfig.cpu_devices=4 makes the mesh's devices.
        with open(f"{root}/tiny.yaml", "w") as f:
            yaml.safe_dump(raw_params(root, runconfig={"jit_compile": False}), f)
        assert run.main(["--mode", "train", "--params", f"{root}/tiny.yaml", "--model-dir", f"{root}/run_py",
                         "--max-steps", "2", "--set", "runconfig.mesh={data: 2, model: 2}",
                         "--set", "runconfig.cpu_devices=4"]) == 0
        with open(f"{root}/run_py/train_metrics.jsonl") as f:
            fresh = {json.loads(line)["step"]: json.loads(line)["loss"] for line in f}
        devices = len(tf.config.list_logical_devices("CPU"))
        _, reference = train(f"{root}/one", 4, mesh=False)               # uninterrupted, steps 1-4
        shutil.copytree(f"{root}/run_py", f"{root}/back")
        _, back = train(f"{root}/back", 4, mesh=False)                   # one device resumes the mesh's step 2
        save_checkpoint_arrays("one", f"{root}/one")
        save_checkpoint_arrays("back", f"{root}/back")
        return {"devices": devices, "reference": reference, "fresh": fresh, "back": back}

    def neox():
        # GPT-NeoX-style switches (q/k/v and output biases, two LayerNorms, sequential residual, the
        # head tied to the embedding); run_py and generation cover the GPT-J layout.
        switches = {"use_projection_bias_in_attention": True, "use_attention_output_bias": True,
                    "use_untied_layer_norm": True, "use_parallel_residual": False, "share_embedding_weights": True,
                    "rotary_style": "neox"}
        _, one_losses = train(f"{root}/neox_one", 3, mesh=False, model=switches)
        mesh, mesh_losses = train(f"{root}/neox_mesh", 3, mesh=True, model=switches)
        save_checkpoint_arrays("neox_one", f"{root}/neox_one")
        save_checkpoint_arrays("neox_mesh", f"{root}/neox_mesh")
        weights = flatten_weights(mesh.model.weights_tree())
        slots = mesh.execution.optimizer._slots[[id(v) for v in mesh.model.trainable_variables].index(
            id(weights["blocks/0/mlp/fc_in/kernel"]))]
        return {"losses": [one_losses, mesh_losses], "local": pieces(weights, weights),
                "fc_in_slot_local": local_shapes(slots["velocity"])}

    def odd_vocabulary():
        # GPT-J (untied head), one block, a vocabulary model=2 does not divide: the mesh resumes a
        # one-device step 2 (optimizer state included) and trains step 3 as one device does.
        model = {"vocab_size": odd_vocab, "num_hidden_layers": 1}
        one, reference = train(f"{root}/odd_one", 2, mesh=False, model=model)
        shutil.copytree(f"{root}/odd_one", f"{root}/odd_mesh")
        one.train(max_steps=3, on_step=lambda step, logs: reference.__setitem__(step, logs["loss"]))
        mesh, resumed = train(f"{root}/odd_mesh", 3, mesh=True, model=model)
        save_checkpoint_arrays("odd_one", f"{root}/odd_one")
        save_checkpoint_arrays("odd_mesh", f"{root}/odd_mesh")
        return {"reference": reference, "resumed": resumed,
                "local": pieces(flatten_weights(mesh.model.weights_tree()),
                                ["embedding/embeddings", "lm_head/kernel", "lm_head/bias"])}

    def errors():
        out = {}
        try:
            Estimator(tiny_params(root, runconfig={"mesh": {"data": 2, "model": 1}}), f"{root}/bad")
            out["bad_mesh"] = None
        except ParamsError as err:
            out["bad_mesh"] = [str(err), os.path.exists(f"{root}/bad")]
        # TensorFlow has started with 4 CPU devices: asking for 4 again is a no-op, for 2 an error.
        set_cpu_devices(4)
        try:
            set_cpu_devices(2)
            out["recount"] = None
        except ParamsError as err:
            out["recount"] = str(err)
        return out

    def generation():
        out = {}
        # The mesh model warm starts (--checkpoint-path) from a one-device model's checkpoint.
        one = GPTJModel(tiny_params(root).model, seed=7)
        tf.train.Checkpoint(model=one).save(f"{root}/generation_one/ckpt")
        estimator = Estimator(tiny_params(root, runconfig={"mesh": MESH, "checkpoint_path": f"{root}/generation_one"},
                                          eval_input={"batch_size": 5}), f"{root}/generation_mesh", training=False)
        estimator.restore()
        split, mesh = estimator.model, estimator.execution.mesh
        # Evaluation (run.py --mode eval) of the same weights on one device and on the mesh, in batches
        # of 5 (16 examples: the last batch of 1 does not split over data=2 and is replicated).
        reference = Estimator(tiny_params(root, runconfig={"checkpoint_path": f"{root}/generation_one",
                                                           "jit_compile": False},
                                          eval_input={"batch_size": 5}), f"{root}/generation_reference", training=False)
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
        np.save(f"{root}/one_logits.npy", cached(one, tf.constant).numpy())
        with dtensor.default_mesh(mesh):
            logits = cached(split, lambda t: replicated(mesh, t))
        np.save(f"{root}/mesh_logits.npy", dtensor.unpack(dtensor.relayout(logits, dtensor.Layout.replicated(mesh, 3)))[0].numpy())
        # The activations' layouts, op by op (eager): heads stay split through attention.
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
        return out

    out = {"run_py": run_py(), "neox": neox(), "odd": odd_vocabulary(), "errors": errors(),
           "generation": generation()}
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory) -> tuple[dict, object]:
    """(SCRIPT's results, its directory): one interpreter for every comparison of this module."""
    root = tmp_path_factory.mktemp("mesh")
    return run_result_script(SCRIPT, str(root), str(ODD_VOCAB), timeout=900), root


def _load(root, name: str) -> dict:
    return dict(np.load(root / f"{name}.npz"))


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
def test_run_py_trains_on_a_cpu_mesh_as_one_device(mesh_run):
    """`run.py --mode train ... --set runconfig.mesh='{data: 2, model: 2}' --set runconfig.cpu_devices=4`
    in a fresh process trains steps 1-2 as one device does, and one device resumes its step 2 as an
    uninterrupted run."""
    result, root = mesh_run
    run_py = result["run_py"]
    assert run_py["devices"] == 4
    reference, fresh, back = run_py["reference"], run_py["fresh"], run_py["back"]
    assert sorted(reference) == ["1", "2", "3", "4"] and sorted(fresh) == ["1", "2"] and sorted(back) == ["3", "4"]
    for step, loss in {**fresh, **back}.items():
        assert loss == pytest.approx(reference[step], rel=LOSS_RTOL)
    _assert_same_checkpoint(_load(root, "one"), _load(root, "back"), steps=4)


@pytest.mark.numerics
@pytest.mark.processes
def test_training_on_a_2x2_mesh_equals_one_device(mesh_run):
    """NeoX-style model: losses, checkpoint, per-device pieces."""
    result, root = mesh_run
    neox = result["neox"]
    one, mesh = neox["losses"]
    assert sorted(one) == sorted(mesh) == ["1", "2", "3"]
    for step in one:
        assert mesh[step] == pytest.approx(one[step], rel=LOSS_RTOL)
    # The checkpoint: a one-device run's keys and full shapes, and its values.
    _assert_same_checkpoint(_load(root, "neox_one"), _load(root, "neox_mesh"), steps=3)
    # Each of the 4 devices holds 1/M of every split weight (and whole replicated ones).
    split = set()
    for path, (shape, sharding, pieces) in neox["local"].items():
        local = [n // MESH["model"] if axis == "model" else n for n, axis in zip(shape, sharding)]
        assert pieces == [local] * 4, path
        if "model" in sharding:
            split.add(path.split("/", 2)[-1] if path.startswith("blocks/") else path)
    assert split == {"attn/q_proj/kernel", "attn/k_proj/kernel", "attn/v_proj/kernel", "attn/q_proj/bias",
                     "attn/k_proj/bias", "attn/v_proj/bias", "attn/out_proj/kernel", "mlp/fc_in/kernel",
                     "mlp/fc_in/bias", "mlp/fc_out/kernel", "embedding/embeddings", "lm_head_bias"}
    assert neox["local"]["embedding/embeddings"][1] == ["model", "unsharded"]        # by vocabulary rows
    assert neox["local"]["blocks/0/attn/q_proj/kernel"][2][0] == [32, 16]           # 2 of 4 heads, whole
    assert neox["fc_in_slot_local"] == [[32, 32]] * 4                             # Adam's slots split as their weight


@pytest.mark.numerics
@pytest.mark.processes
def test_a_vocabulary_the_mesh_does_not_divide_splits_over_hidden_and_trains_as_one_device(mesh_run):
    """Vocabulary 67 on model=2: the mesh resumes a one-device step 2 and trains step 3 as one device."""
    result, root = mesh_run
    odd = result["odd"]
    assert sorted(odd["reference"]) == ["1", "2", "3"] and sorted(odd["resumed"]) == ["3"]
    assert odd["resumed"]["3"] == pytest.approx(odd["reference"]["3"], rel=LOSS_RTOL)
    # The same checkpoint (keys, full shapes: nothing padded), every weight and slot within the bounds.
    _assert_same_checkpoint(_load(root, "odd_one"), _load(root, "odd_mesh"), steps=3)
    # The embedding by hidden columns, the head by input rows, its bias whole.
    v = ODD_VOCAB
    assert odd["local"] == {"embedding/embeddings": [[v, 32], ["unsharded", "model"], [[v, 16]] * 4],
                            "lm_head/kernel": [[32, v], ["model", "unsharded"], [[16, v]] * 4],
                            "lm_head/bias": [[v], ["unsharded"], [[v]] * 4]}


@pytest.mark.processes
def test_device_count_errors_name_the_fix(mesh_run):
    errors = mesh_run[0]["errors"]
    message, created = errors["bad_mesh"]
    assert ("runconfig.mesh data=2 x model=1 = 2 devices, but this process has 4 CPU device(s); set "
            "runconfig.cpu_devices=2 (logical CPU devices) or choose data x model = 4") in message
    assert not created
    assert errors["recount"].startswith("runconfig.cpu_devices=2: TensorFlow has already started in this process "
                                        "with 4 CPU device(s)")


@pytest.mark.numerics
@pytest.mark.processes
def test_greedy_generation_on_a_2x2_mesh_equals_one_device(mesh_run):
    """A mesh model warm started from a one-device checkpoint evaluates and decodes as that model does."""
    result, root = mesh_run[0]["generation"], mesh_run[1]
    expected, actual = np.load(root / "one_logits.npy"), np.load(root / "mesh_logits.npy")
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


@pytest.mark.parametrize("vocab_size", [64, 67])
@pytest.mark.parametrize("model", [
    {},                                                                      # GPT-J: no q/k/v biases, untied head
    {"use_projection_bias_in_attention": True, "use_attention_output_bias": True, "use_untied_layer_norm": True,
     "share_embedding_weights": True, "rotary_style": "neox"},                 # NeoX-style switches, tied head
])
def test_every_weight_has_its_megatron_layout(model, vocab_size):
    """On a model axis of 2: Megatron's splits; a vocabulary of 67, which 2 does not divide, splits the
    embedding and the head over hidden_size instead."""
    from config.params import ModelParams
    from model import weight_specs
    from runtime.mesh_layouts import weight_sharding
    config = ModelParams(**{"vocab_size": vocab_size, "hidden_size": 32, "num_hidden_layers": 1, "num_heads": 4,
                            "rotary_dim": 4, "filter_size": 64, **model})
    columns, rows, whole = ("model",), ("model", "unsharded"), ("unsharded",)
    expected = {"attn/q_proj/kernel": ("unsharded", "model"), "attn/k_proj/kernel": ("unsharded", "model"),
                "attn/v_proj/kernel": ("unsharded", "model"), "mlp/fc_in/kernel": ("unsharded", "model"),
                "attn/q_proj/bias": columns, "attn/k_proj/bias": columns, "attn/v_proj/bias": columns,
                "mlp/fc_in/bias": columns, "attn/out_proj/kernel": rows, "mlp/fc_out/kernel": rows,
                "embedding/embeddings": rows, "lm_head/kernel": ("unsharded", "model"), "lm_head/bias": columns,
                "lm_head_bias": columns}
    if vocab_size % 2:
        expected.update({"embedding/embeddings": ("unsharded", "model"), "lm_head/kernel": rows,
                         "lm_head/bias": whole, "lm_head_bias": whole})
    for spec in weight_specs(config):
        short = spec.path.split("/", 2)[-1] if spec.path.startswith("blocks/") else spec.path
        assert weight_sharding(spec.path, spec.shape, 2) == expected.get(short, whole * len(spec.shape)), spec.path
