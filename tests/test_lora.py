"""LoRA (config/lora.py, layers/lora.py, runtime/lora.py, checkpoint_utils/peft_adapter.py):
against the base, against PEFT, across checkpoints, merges and base formats.

Tolerances: two float32 evaluations of the same math in another summation order differ by
rounding only (checkpoint_utils/rounding.py). An adapter adds two more reductions (x A, then
(x A) B) beside each targeted projection, so the chain of a block grows by 2 per target:
`lora_atol` counts them on top of the model's forward reductions.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from checkpoint_utils.rounding import float32_atol, forward_reductions, int8_logits_error, longest_sum
from config.lora import LoraParams
from config.params import ParamsError, Params, RunConfig, parse_params
from tests.runtime_helpers import raw_params, saved_random_model

TARGETS = ["q_proj", "v_proj", "fc_in", "out_proj"]


def lora_atol(model, sequence: int, scale: float) -> float:
    reductions = forward_reductions(model.num_hidden_layers) + 2 * model.num_hidden_layers * len(model.lora.targets)
    return float32_atol(reductions, longest_sum(model, sequence), scale)


def tiny_lora_params(root, base: str, **lora) -> Params:
    settings = {"rank": 4, "alpha": 8.0, "targets": TARGETS, **lora}
    return parse_params(raw_params(str(root), model={"lora": settings},
                                   runconfig={"checkpoint_path": base, "max_steps": 4, "save_checkpoints_steps": 2}))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(root, base directory, the base GPTJModel): a tiny random float32 checkpoint."""
    root = tmp_path_factory.mktemp("lora_base")
    _, model, prefix = saved_random_model(root, seed=3)
    return root, os.path.dirname(prefix), model


def randomize_adapters(model, seed: int = 5) -> None:
    """Adapters with B != 0 (a trained adapter's shape): values of the size training reaches."""
    rng = np.random.default_rng(seed)
    model.adapters.assign({path: (rng.normal(0, 0.3, a.shape).astype(np.float32),
                                  rng.normal(0, 0.05, b.shape).astype(np.float32))
                           for path, (a, b) in model.adapters.arrays().items()}, "test")


def ids(vocab: int, batch: int = 2, length: int = 12, seed: int = 0) -> tf.Tensor:
    return tf.constant(np.random.default_rng(seed).integers(0, vocab, (batch, length)), tf.int32)


# ---- params --------------------------------------------------------------------------------

@pytest.mark.parametrize("lora, message", [
    ({"rank": 0}, "model.lora.rank=0 must be positive"),
    ({"targets": ["q_proj", "wq"]}, "'wq' is not a projection"),
    ({"targets": ["qkv_proj"]}, "model.fused_qkv=false has separate projections"),
    ({"targets": ["out_proj", "dense"]}, "names 'out_proj' twice"),
    ({"dropout": 1.0}, "model.lora.dropout=1.0 must be in [0, 1)"),
    ({"base_dtype": "int4"}, "model.lora.base_dtype='int4' is not allowed"),
    ({"ranks": 8}, "model.lora.ranks is not a known key; did you mean model.lora.rank?"),
])
def test_bad_lora_keys_get_one_line_naming_the_key(tmp_path, lora, message):
    with pytest.raises(ParamsError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        parse_params(raw_params(str(tmp_path), model={"lora": lora}))


def test_lora_refuses_the_mesh_and_weight_streaming_in_one_line(tmp_path):
    with pytest.raises(ParamsError, match="model.lora does not run on runconfig.mesh"):
        parse_params(raw_params(str(tmp_path), model={"lora": {}}, runconfig={"mesh": {"data": 1, "model": 2}}))
    with pytest.raises(ParamsError, match="model.lora runs with runconfig.execution=standard"):
        parse_params(raw_params(str(tmp_path), model={"lora": {}}, runconfig={"execution": "weight_streaming"}))


def test_neox_names_select_the_same_projections():
    lora = LoraParams(targets=("query_key_value", "dense", "dense_h_to_4h"))
    assert lora.projections() == ("qkv_proj", "out_proj", "fc_in")
    assert lora.scale == 2.0     # alpha 16 / rank 8, PEFT's scaling


# ---- the model -----------------------------------------------------------------------------

def test_fresh_adapters_leave_the_base_unchanged_and_start_as_peft_does(base):
    from runtime.lora import build_lora_model
    root, directory, reference = base
    params = tiny_lora_params(root, directory)
    model, record = build_lora_model(params)
    tokens = ids(params.model.vocab_size)
    # B = 0: every update is an exact 0 added to the base's product, so the logits are the same bits
    np.testing.assert_array_equal(model(tokens).logits.numpy(), reference(tokens).logits.numpy())
    for path, (a, b) in model.adapters.arrays().items():
        assert not b.any()
        bound = 1 / np.sqrt(a.shape[0])         # kaiming_uniform(a=sqrt(5)) on fan_in: U(-1/sqrt(in), 1/sqrt(in))
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
    assert [v.name.split(":")[0] for v in model.trainable_variables] == ["lora_a", "lora_b"] * (2 * len(TARGETS))
    assert json.loads(record.numpy())["path"] == os.path.abspath(directory)


def test_training_moves_only_the_adapters_and_checkpoints_hold_only_them(base, tmp_path):
    from checkpoint_utils.load import load_model
    from runtime.estimator import Estimator
    root, directory, reference = base
    params = tiny_lora_params(root, directory)
    estimator = Estimator(params, str(tmp_path / "run"))
    before = estimator.model.adapters.arrays()
    estimator.train()
    after = estimator.model.adapters.arrays()
    assert all(np.abs(after[p][1]).max() > 0 for p in after)                # every B trained
    assert any(not np.array_equal(after[p][0], before[p][0]) for p in after)
    # the base is bit-identical to the checkpoint it came from
    fresh = load_model(params.model, directory)
    from layers.tree import flatten_weights
    ours = flatten_weights(estimator.model.base)
    for path, variable in flatten_weights(fresh.weights_tree()).items():
        np.testing.assert_array_equal(ours[path].numpy(), variable.numpy())
        assert not ours[path].trainable
    keys = [k for k, _ in tf.train.list_variables(estimator.latest_checkpoint)]
    assert not any(k.startswith("model/") for k in keys)
    assert any(k.startswith("lora/tree/blocks/1/mlp/fc_in/lora_b") for k in keys) and "lora_base/.ATTRIBUTES/VARIABLE_VALUE" in keys


@pytest.mark.same_kernels
def test_resume_is_exact(base, tmp_path):
    from runtime.estimator import Estimator
    root, directory, _ = base
    params = tiny_lora_params(root, directory)
    straight = Estimator(params, str(tmp_path / "straight"))
    straight.train(4)
    first = Estimator(params, str(tmp_path / "resumed"))
    first.train(2)
    second = Estimator(params, str(tmp_path / "resumed"))        # a new process would build this anew
    assert second.restore() == 2
    second.train(4)
    for path, (a, b) in straight.model.adapters.arrays().items():
        resumed = second.model.adapters.arrays()[path]
        np.testing.assert_array_equal(resumed[0], a)
        np.testing.assert_array_equal(resumed[1], b)


def test_a_resume_on_another_base_is_refused_naming_both(base, tmp_path):
    from checkpoint_utils.lora_checkpoint import LoraBaseMismatchError
    from runtime.estimator import Estimator
    root, directory, _ = base
    Estimator(tiny_lora_params(root, directory), str(tmp_path / "run")).train(2)
    _, _, other = saved_random_model(tmp_path / "other", seed=4)
    params = tiny_lora_params(root, os.path.dirname(other))
    with pytest.raises(LoraBaseMismatchError) as err:
        Estimator(params, str(tmp_path / "run")).train(4)
    assert os.path.abspath(directory) in str(err.value) and os.path.dirname(other) in str(err.value)
    assert not os.path.exists(tmp_path / "run" / "ckpt-4.index")      # nothing written


def test_merged_weights_equal_the_unmerged_adapters(base, tmp_path):
    from generation.loading import load_generation_model
    from runtime.estimator import Estimator
    root, directory, _ = base
    params = tiny_lora_params(root, directory)
    estimator = Estimator(params, str(tmp_path / "run"))
    estimator.train(2)
    randomize_adapters(estimator.model)
    estimator.save()
    tokens = ids(params.model.vocab_size)
    unmerged = estimator.model(tokens).logits.numpy()
    # the run's model_dir loads as a whole model: the base with W + (alpha / r) A B
    merged = load_generation_model(params.model, str(tmp_path / "run"), "float32")(tokens).logits.numpy()
    np.testing.assert_allclose(merged, unmerged, rtol=0, atol=lora_atol(params.model, 12, np.abs(unmerged).max()))
    base_logits = base[2](tokens).logits.numpy()
    assert np.abs(base_logits - unmerged).max() > 100 * lora_atol(params.model, 12, np.abs(unmerged).max())


@pytest.mark.parametrize("base_dtype", ["int8", pytest.param("bfloat16", marks=pytest.mark.mixed_precision)])
def test_packed_bases_equal_float32_on_their_own_values(base, base_dtype):
    """The int8 base computes what a float32 base of its dequantized kernels computes (and bfloat16 of
    its rounded ones), adapters included: the quantization error is the base's, bounded per weight by
    half a step (tests/test_generation_weights.py), and nothing else moves."""
    from layers.packed import dequantize_int8
    from layers.tree import flatten_weights
    from runtime.lora import build_lora_model
    root, directory, _ = base
    packed, _ = build_lora_model(tiny_lora_params(root, directory, base_dtype=base_dtype))
    twin, _ = build_lora_model(tiny_lora_params(root, directory))
    randomize_adapters(packed)
    randomize_adapters(twin)
    flat, twin_flat = flatten_weights(packed.base), flatten_weights(twin.base)
    for path, variable in flat.items():
        if path.endswith("/kernel_t"):
            layer = path[:-len("/kernel_t")]
            value = (dequantize_int8(variable, flat[f"{layer}/kernel_scale"]) if base_dtype == "int8"
                     else tf.transpose(tf.cast(tf.bitcast(variable, tf.bfloat16), tf.float32)))
            twin_flat[f"{layer}/kernel"].assign(value)
        elif path == "embedding/embeddings" and variable.dtype == tf.int16:
            twin_flat[path].assign(tf.cast(tf.bitcast(variable, tf.bfloat16), tf.float32))
    tokens = ids(packed.config.vocab_size)
    expected = twin(tokens).logits.numpy()
    got = packed(tokens).logits.numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=lora_atol(packed.config, 12, np.abs(expected).max()))
    if base_dtype == "int8":
        # and against the float32 base itself: every kernel's per-channel int8 error, as independent
        # relative perturbations of its output that add as a random walk
        # (checkpoint_utils.rounding.int8_logits_error), over-estimates the RMS change relative to the
        # logits' std, since the residual stream carries the embedding's share of every value past the
        # kernels unperturbed (measured 0.27x here; int8 against bfloat16 at GPT-J-6B's shape, 0.25x of
        # bench.real_size's like estimate): the change stays below the estimate, and is visible (above
        # a tenth of it).
        full, _ = build_lora_model(tiny_lora_params(root, directory))
        randomize_adapters(full)
        reference = full(tokens).logits.numpy()
        c = packed.config
        estimate = int8_logits_error(c.num_hidden_layers, c.hidden_size, c.filter_size) * reference.std()
        rms = np.sqrt(np.mean((got - reference) ** 2))
        assert estimate / 10 <= rms <= estimate


# ---- PEFT ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """(HF directory, the torch model, our model params with LoRA on it)."""
    from checkpoint_utils.hf_config import params_from_hf_config
    from checkpoint_utils.hf_source import read_config
    from tests.hf_models import make_hf_model, save_hf_model
    directory = str(tmp_path_factory.mktemp("hf_base"))
    torch_model = make_hf_model("gptj_basic", seed=2)
    save_hf_model(torch_model, directory)
    model = dataclasses.replace(params_from_hf_config(read_config(directory)),
                                lora=LoraParams(rank=4, alpha=12.0, targets=tuple(TARGETS + ["fc_out", "k_proj"])))
    return directory, torch_model, model


def ours_on(hf_base_dir: str, model, init_adapter: str | None = None):
    from runtime.lora import build_lora_model
    model = dataclasses.replace(model, lora=dataclasses.replace(model.lora, init_adapter=init_adapter))
    return build_lora_model(Params(model=model, runconfig=RunConfig(checkpoint_path=hf_base_dir)))[0]


def peft_logits(torch_model, adapter_dir: str, tokens: np.ndarray) -> np.ndarray:
    import copy

    import peft
    import torch
    wrapped = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), adapter_dir).eval()
    with torch.no_grad():
        return wrapped(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()


@pytest.mark.numerics
def test_our_adapter_loads_in_peft_with_equal_logits(hf_base, tmp_path):
    from checkpoint_utils.peft_adapter import write_peft_adapter
    directory, torch_model, model = hf_base
    ours = ours_on(directory, model)
    randomize_adapters(ours)
    write_peft_adapter(str(tmp_path / "adapter"), model, ours.adapters.arrays(), directory)
    tokens = ids(model.vocab_size, seed=3)
    theirs = peft_logits(torch_model, str(tmp_path / "adapter"), tokens.numpy())
    logits = ours(tokens).logits.numpy()
    np.testing.assert_allclose(logits, theirs, rtol=0, atol=lora_atol(model, 12, np.abs(theirs).max()))
    # the adapter matters far beyond rounding (a transposed or misnamed factor would be lost in it)
    with_base = torch_model(__import__("torch").from_numpy(tokens.numpy().astype(np.int64))).logits.detach().numpy()
    assert np.abs(with_base - theirs).max() > 100 * lora_atol(model, 12, np.abs(theirs).max())


@pytest.mark.numerics
def test_a_peft_trained_adapter_warm_starts_here(hf_base, tmp_path):
    import copy

    import peft
    import torch
    from checkpoint_utils.peft_adapter import read_peft_adapter, write_peft_adapter
    directory, torch_model, model = hf_base
    config = peft.LoraConfig(r=4, lora_alpha=12.0, target_modules=["q_proj", "v_proj", "fc_in", "out_proj", "fc_out",
                                                                     "k_proj"], init_lora_weights=False)
    wrapped = peft.get_peft_model(copy.deepcopy(torch_model), config)     # init_lora_weights=False: B random too
    wrapped.save_pretrained(str(tmp_path / "peft"))
    ours = ours_on(directory, model, init_adapter=str(tmp_path / "peft"))
    tokens = ids(model.vocab_size, seed=4)
    with torch.no_grad():
        theirs = wrapped.eval()(torch.from_numpy(tokens.numpy().astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(ours(tokens).logits.numpy(), theirs, rtol=0,
                               atol=lora_atol(model, 12, np.abs(theirs).max()))
    # and back: our writer gives PEFT's own tensors bit for bit
    arrays = read_peft_adapter(str(tmp_path / "peft"), model)
    write_peft_adapter(str(tmp_path / "again"), model, arrays, directory)
    from safetensors.numpy import load_file
    original, again = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("peft", "again"))
    assert sorted(original) == sorted(again)
    for key in original:
        np.testing.assert_array_equal(original[key], again[key])


def test_a_peft_adapter_of_another_rank_is_refused_naming_the_key(hf_base, tmp_path):
    from checkpoint_utils.peft_adapter import PeftAdapterError, read_peft_adapter, write_peft_adapter
    directory, _, model = hf_base
    other = dataclasses.replace(model, lora=dataclasses.replace(model.lora, rank=2))
    rng = np.random.default_rng(0)
    from layers.lora import LoraAdapters
    arrays = {p: (rng.normal(size=a.shape).astype(np.float32), rng.normal(size=b.shape).astype(np.float32))
              for p, (a, b) in LoraAdapters(other).arrays().items()}
    write_peft_adapter(str(tmp_path / "r2"), other, arrays, directory)
    with pytest.raises(PeftAdapterError, match=r"model.lora.rank=4 \(r: 2\)"):
        read_peft_adapter(str(tmp_path / "r2"), model)


@pytest.mark.numerics
def test_export_cli_merges_for_transformers_and_writes_peft_adapters(base, tmp_path):
    """A LoRA run through export_hf: --merge-lora loads in transformers with our merged logits,
    --lora-only holds PEFT's key names; without either flag, one line says which to pass."""
    import torch
    import transformers
    from checkpoint_utils import export_hf
    from runtime.estimator import Estimator
    root, directory, _ = base
    params = tiny_lora_params(root, directory)
    run = str(tmp_path / "run")
    estimator = Estimator(params, run)
    estimator.train(2)
    randomize_adapters(estimator.model)
    estimator.save()
    assert export_hf.main(["--params", f"{run}/params.yaml", "--checkpoint", run, "--output-dir",
                           str(tmp_path / "hf"), "--no-progress"]) == 2
    assert export_hf.main(["--params", f"{run}/params.yaml", "--checkpoint", run, "--output-dir",
                           str(tmp_path / "hf"), "--merge-lora", "--no-progress"]) == 0
    tokens = ids(params.model.vocab_size)
    ours = estimator.model(tokens).logits.numpy()
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        theirs = merged(torch.from_numpy(tokens.numpy().astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=lora_atol(params.model, 12, np.abs(ours).max()))
    assert export_hf.main(["--params", f"{run}/params.yaml", "--checkpoint", run, "--output-dir",
                           str(tmp_path / "adapter"), "--lora-only"]) == 0
    with open(tmp_path / "adapter" / "adapter_config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 8.0, sorted(TARGETS))
    from safetensors.numpy import load_file
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.transformer.h.1.mlp.fc_in.lora_B.weight" in keys
    assert keys["base_model.model.transformer.h.0.attn.q_proj.lora_A.weight"].shape == (4, 32)


def test_predict_generates_with_a_lora_run_dir(tmp_path):
    """run.py --mode predict --model-dir LORA_RUN merges the adapters at load: its greedy tokens are
    those of the unmerged model (a random model's top logits sit ~1e-2 apart, far above rounding)."""
    import run
    from generation.config import GenerationConfig
    from generation.generator import Generator
    from runtime.estimator import Estimator
    from tests.data_helpers import make_tiny_tokenizer
    tokenizer = make_tiny_tokenizer(str(tmp_path / "tok"), vocab_size=320)
    _, _, prefix = saved_random_model(tmp_path / "base", seed=6, vocab_size=320)
    raw = raw_params(str(tmp_path), model={"vocab_size": 320, "lora": {"rank": 4, "targets": TARGETS}},
                     runconfig={"checkpoint_path": os.path.dirname(prefix)})
    params = parse_params(raw)
    run_dir = str(tmp_path / "run")
    estimator = Estimator(params, run_dir)
    estimator.train(2)
    randomize_adapters(estimator.model)
    estimator.save()
    assert run.main(["--mode", "predict", "--params", f"{run_dir}/params.yaml", "--model_dir", run_dir,
                     "--tokenizer", str(tmp_path / "tok"), "--prompt", "the cat", "--max_new_tokens", "6",
                     "--generation_compile", "eager"]) == 0
    with open(os.path.join(run_dir, "predictions.jsonl"), encoding="utf-8") as f:
        record = json.loads(f.readline())
    config = GenerationConfig(max_new_tokens=6, pad_token_id=tokenizer.eos_id, stop_token_ids=(tokenizer.eos_id,))
    expected = Generator(estimator.model, "eager").generate([tokenizer.encode("the cat")], config)[0].token_ids
    assert record["token_ids"] == expected
