"""Lean loading for generation (generation/loading.py): every weight made straight into its
format from the checkpoint, one tensor at a time; the bits of today's packing; Hugging Face
directories read directly; bfloat16 TF checkpoints; bad input."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import weakref

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

from checkpoint_utils.convert_hf import ConversionError, convert
from checkpoint_utils.hf_config import params_from_hf_config
from checkpoint_utils.hf_source import read_config
from checkpoint_utils.load import CheckpointMismatchError, load_model
from checkpoint_utils.safetensors_reader import SafetensorsFile
from checkpoint_utils.tf_checkpoint import checkpoint_key, resolve_checkpoint
from checkpoint_utils.weight_source import open_weights
from generation import weights as weights_module
from generation.config import GenerationConfig
from generation.generator import Generator
from generation.loading import load_generation_model, load_weights
from generation.weights import GenerationModel, quantize_int8
from layers.tree import flatten_weights
from model import GPTJModel, weight_specs
from tests.hf_models import make_hf_model, save_hf_model
from tests.numerics import LOW_PRECISION_ROUNDINGS, U_BF16, float32_atol, forward_reductions

PACKED = ("int8", "bfloat16")
FORMATS = ("float32",) + PACKED


def _bits(value) -> np.ndarray:
    """The stored bits of a tensor or array (bfloat16 compared bit for bit, -0.0 and NaN included)."""
    array = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
    return array.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[array.dtype.itemsize])


def _leaves(model) -> dict:
    """{path: tensor} of a loaded generation model's weights (a GPTJModel's own, or the packed tree)."""
    return flatten_weights(model.weights if isinstance(model, GenerationModel) else model.weights_tree())


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Per architecture: a tiny random HF model saved as safetensors, and its conversions to float32
    and bfloat16 TF checkpoints: {kind: {"params", "hf", "tf", "tf_bf16", "model"}}."""
    root = tmp_path_factory.mktemp("sources")
    out = {}
    for kind in ("gptj_basic", "neox_basic"):
        hf_model = make_hf_model(kind, seed=3)
        hf = save_hf_model(hf_model, str(root / kind / "hf"))
        params = convert(hf, str(root / kind / "tf"), progress=False)
        convert(hf, str(root / kind / "tf_bf16"), progress=False, dtype="bfloat16")
        out[kind] = {"params": params, "hf": hf, "tf": str(root / kind / "tf"),
                     "tf_bf16": str(root / kind / "tf_bf16"), "model": hf_model}
    return out


@pytest.fixture(scope="module")
def bf16_hf(tmp_path_factory):
    """A tiny GPT-J saved in bfloat16 (as the hub's GPT-J 6B float16/bfloat16 revisions are)."""
    import torch
    root = tmp_path_factory.mktemp("bf16")
    hf = save_hf_model(make_hf_model("gptj_basic", seed=4).to(torch.bfloat16), str(root / "hf"))
    return hf, params_from_hf_config(read_config(hf))


def _hf_tensors(directory: str) -> dict[str, np.ndarray]:
    names = {}
    for filename in os.listdir(directory):
        if filename.endswith(".safetensors"):
            stored = SafetensorsFile(os.path.join(directory, filename))
            names.update({name: stored.read(name) for name in stored.keys()})
    return names


# ---- (c) the bits of today's packing -------------------------------------------------------

@pytest.mark.parametrize("weight_format", PACKED)
def test_packed_weights_are_todays_packing_bit_for_bit(sources, monkeypatch, weight_format):
    """Lean int8/bfloat16 weights equal what GenerationModel made from the float32 model:
    quantize_int8 / a bfloat16 cast of each whole kernel (and, in bfloat16, of the token table),
    everything else the float32 variable.
    Blocks of 3 output channels (fewer for the wide fc_out) make every kernel a ragged many-block pack."""
    source = sources["gptj_basic"]
    monkeypatch.setattr(weights_module, "PACK_BLOCK_BYTES", 4 * source["params"].hidden_size * 3)
    lean = load_generation_model(source["params"], source["tf"], weight_format)
    reference = load_model(source["params"], source["tf"])
    packed = _leaves(lean)
    assert set(packed) == set(flatten_weights(GenerationModel(reference, weight_format).weights))
    for path, variable in flatten_weights(reference.weights_tree()).items():
        if path.endswith("/kernel"):
            layer = path[:-len("kernel")]
            if weight_format == "int8":
                rows, scale = quantize_int8(variable)
                np.testing.assert_array_equal(packed[layer + "kernel_t"].numpy(), rows.numpy())
                np.testing.assert_array_equal(_bits(packed[layer + "kernel_scale"]), _bits(scale))
            else:
                expected = tf.cast(tf.transpose(variable), tf.bfloat16)
                np.testing.assert_array_equal(_bits(packed[layer + "kernel_t"]), _bits(expected))
        elif weight_format == "bfloat16" and path == "embedding/embeddings":
            np.testing.assert_array_equal(_bits(packed[path]), _bits(tf.cast(variable, tf.bfloat16)))
        else:
            assert packed[path].dtype == tf.float32
            np.testing.assert_array_equal(_bits(packed[path]), _bits(variable))


def test_float32_format_is_the_checkpoint(sources):
    source = sources["neox_basic"]
    model = load_generation_model(source["params"], source["tf"], "float32")
    assert isinstance(model, GPTJModel)
    reader = tf.train.load_checkpoint(resolve_checkpoint(source["tf"]))
    leaves = flatten_weights(model.weights_tree())
    assert [s.path for s in weight_specs(source["params"])] == list(leaves)      # in creation order
    for path, variable in leaves.items():
        np.testing.assert_array_equal(_bits(variable), _bits(reader.get_tensor(checkpoint_key("model", path))))


# ---- (a) one tensor at a time, no float32 copy of a packed kernel ---------------------------

class Watched:
    """A weight source whose dense kernels are watched as they are read: at each read, the bytes
    of the kernel arrays read so far that are still alive. (The other tensors become float32
    variables, which may adopt the array's memory: those stay alive as the variable itself.)"""

    def __init__(self, source):
        self.source, self.live, self.peak_live, self.dtypes = source, {}, 0, set()

    def check(self, model):
        self.source.check(model)

    def arrays(self, model):
        for path, array in self.source.arrays(model):
            self.dtypes.add(array.dtype)
            if path.endswith("/kernel"):
                self.live[path] = array.nbytes
                weakref.finalize(array, self.live.pop, path)
                self.peak_live = max(self.peak_live, sum(self.live.values()))
            yield path, array
            array = None


@pytest.mark.parametrize("source_kind", ["tf", "tf_bf16", "hf"])
@pytest.mark.parametrize("weight_format", PACKED)
def test_loading_holds_one_tensor_at_a_time_and_no_float32_kernel(sources, source_kind, weight_format):
    """Measured two ways. While loading: the kernel arrays read and alive at once never exceed the
    largest group of tensors read together (one kernel for a TF checkpoint; GPT-NeoX's fused qkv,
    split in three, for a HF directory), and none is alive after. After: the float32 variables the
    load created are exactly the embedding (bfloat16 in that format or from a bfloat16 checkpoint),
    LayerNorms, biases and int8 scales (no float32 copy of a packed kernel survives)."""
    source = sources["neox_basic"]
    params = source["params"]
    watched = Watched(open_weights(source[source_kind]))
    gc.collect()
    existing = [v for v in gc.get_objects() if isinstance(v, tf.Variable)]     # held: no id is reused
    before = {id(v) for v in existing}
    model = load_weights(params, watched, weight_format)
    gc.collect()
    created = [v for v in gc.get_objects() if isinstance(v, tf.Variable) and id(v) not in before]

    specs = weight_specs(params)
    itemsize = 2 if source_kind == "tf_bf16" else 4
    largest = max(int(np.prod(s.shape)) for s in specs if s.path.endswith("/kernel")) * itemsize
    qkv = 3 * params.hidden_size * params.hidden_size * itemsize if source_kind == "hf" else 0
    assert 0 < watched.peak_live <= max(largest, qkv)
    assert not watched.live                                      # nothing read is kept
    float32_bytes = sum(v.shape.num_elements() * 4 for v in created if v.dtype == tf.float32)
    kept_float32 = sum(int(np.prod(s.shape)) * 4 for s in specs if not s.path.endswith("/kernel")
                       and not ((weight_format == "bfloat16" or source_kind == "tf_bf16")
                                and s.path == "embedding/embeddings"))
    if weight_format == "int8":                                 # plus one float32 scale per output channel
        kept_float32 += sum(s.shape[1] * 4 for s in specs if s.path.endswith("/kernel"))
    assert float32_bytes == kept_float32
    assert {id(v) for v in created} == {id(v) for v in _leaves(model).values()}


PEAK_RSS_CHILD = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    from config.params import ModelParams
    from generation.loading import load_generation_model

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    config, tiny, source, tiny_source = (json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3],
                                         sys.argv[4])
    load_generation_model(ModelParams(**tiny), tiny_source, "int8")      # TF's own start-up allocations
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                                      # peak RSS := current RSS
    base = status("VmRSS")
    model = load_generation_model(ModelParams(**config), source, "int8")
    print(json.dumps({"base": base, "peak": status("VmHWM")}))
""")


@pytest.mark.processes
def test_peak_memory_of_int8_loading_is_the_int8_model_plus_one_tensor(tmp_path):
    """Peak RSS of loading a d=1024, 6-layer model in int8 (a process of its own), above its RSS
    just before: at most the int8 model plus what one tensor in flight costs, argued as the source
    tensor (T, the largest: 16.8 MB), the slices, casts and quantization temporaries of its packing
    (<= 3 T: whole-tensor blocks at this size), its packed copy (T / 4), and 32 MB for allocator
    arenas. That bound is far below the float32 model alone (336 MB), which the float32-then-pack
    path holds, plus the packed model on top of it."""
    from checkpoint_utils.tf_checkpoint import write_checkpoint, write_checkpoint_state
    from config.params import ModelParams
    from config.schema import to_dict
    from model import initial_values
    config = ModelParams(vocab_size=4096, hidden_size=1024, num_hidden_layers=6, num_heads=8, rotary_dim=64,
                         filter_size=4096, max_position_embeddings=64)
    tiny = ModelParams(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_heads=2, rotary_dim=8,
                       filter_size=64, max_position_embeddings=64)
    for name, model in (("big", config), ("tiny", tiny)):
        write_checkpoint(str(tmp_path / name / "ckpt-0"), ((s.path, v) for s, v in initial_values(model, seed=1)))
        write_checkpoint_state(str(tmp_path / name), "ckpt-0")
    specs = weight_specs(config)
    kernels = sum(int(np.prod(s.shape)) for s in specs if s.path.endswith("/kernel"))
    others = sum(int(np.prod(s.shape)) for s in specs if not s.path.endswith("/kernel"))
    scales = sum(s.shape[1] for s in specs if s.path.endswith("/kernel"))
    int8_model = kernels + 4 * (others + scales)
    largest = 4 * max(int(np.prod(s.shape)) for s in specs)
    bound = int8_model + 3 * largest + largest // 4 + largest + (32 << 20)
    float32_model = 4 * (kernels + others)
    assert bound < float32_model                                    # so the check tells the two paths apart
    to_json = lambda m: json.dumps({k: v for k, v in to_dict(m).items() if not isinstance(v, dict)})  # noqa: E731
    done = subprocess.run([sys.executable, "-c", PEAK_RSS_CHILD, to_json(config), to_json(tiny),
                           str(tmp_path / "big"), str(tmp_path / "tiny")], capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["peak"] - measured["base"] <= bound, (measured, bound, float32_model)


# ---- (b) Hugging Face directories ----------------------------------------------------------

@pytest.mark.numerics
@pytest.mark.parametrize("weight_format", ["float32", "int8", pytest.param("bfloat16", marks=pytest.mark.mixed_precision)])
@pytest.mark.parametrize("kind", ["gptj_basic", "neox_basic"])
def test_hf_directory_loads_as_its_conversion(sources, kind, weight_format):
    """Loading the HF directory directly gives the weights of loading its conversion, bit for bit
    (one mapping, one packing), so the same greedy tokens; the logits agree within the rounding of
    two evaluations of one function (float32: 10 sqrt(R K) u of their size, tests/numerics.py;
    bfloat16: the mixed-precision budget) and in fact exactly."""
    source = sources[kind]
    params = source["params"]
    direct = load_generation_model(params, source["hf"], weight_format)
    converted = load_generation_model(params, source["tf"], weight_format)
    a, b = _leaves(direct), _leaves(converted)
    assert set(a) == set(b)
    for path in a:
        assert a[path].dtype == b[path].dtype, path
        np.testing.assert_array_equal(_bits(a[path]), _bits(b[path]), err_msg=path)
    ids = tf.constant(np.random.default_rng(0).integers(0, params.vocab_size, (2, 9)), tf.int32)
    logits, reference = direct(ids).logits.numpy(), converted(ids).logits.numpy()
    scale = np.abs(reference).max()
    bound = (float32_atol(forward_reductions(params.num_hidden_layers), params.filter_size, scale)
             if weight_format != "bfloat16" else LOW_PRECISION_ROUNDINGS * U_BF16 * scale)
    np.testing.assert_allclose(logits, reference, rtol=0, atol=bound)
    prompts = np.random.default_rng(1).integers(0, params.vocab_size, (2, 5)).tolist()
    config = GenerationConfig(max_new_tokens=5, pad_token_id=0)
    tokens = [g.token_ids for g in Generator(direct, "eager").generate(prompts, config)]
    assert tokens == [g.token_ids for g in Generator(converted, "eager").generate(prompts, config)]


@pytest.mark.mixed_precision
def test_bfloat16_safetensors_load_as_bfloat16_without_float32(bf16_hf):
    """bfloat16 HF tensors become bfloat16 kernels as they are: every array read is bfloat16 (no
    float32 copy of anything), kernel rows are the HF Linear weights' bits ([out, in] both), and
    so is the token table."""
    hf, params = bf16_hf
    watched = Watched(open_weights(hf))
    model = load_weights(params, watched, "bfloat16")
    assert watched.dtypes == {np.dtype(ml_dtypes.bfloat16)}
    stored = _hf_tensors(hf)
    leaves = _leaves(model)
    np.testing.assert_array_equal(_bits(leaves["blocks/1/mlp/fc_in/kernel_t"]),
                                  _bits(stored["transformer.h.1.mlp.fc_in.weight"]))
    np.testing.assert_array_equal(_bits(leaves["lm_head/kernel_t"]), _bits(stored["lm_head.weight"]))
    np.testing.assert_array_equal(_bits(leaves["embedding/embeddings"]), _bits(stored["transformer.wte.weight"]))
    # int8 keeps the checkpoint's bfloat16 table too (exact: each gathered row widens to float32)
    table = _leaves(load_weights(params, open_weights(hf), "int8"))["embedding/embeddings"]
    np.testing.assert_array_equal(_bits(table), _bits(stored["transformer.wte.weight"]))


# ---- (d) bfloat16 TF checkpoints -----------------------------------------------------------

def test_convert_bfloat16_round_trip(bf16_hf, tmp_path):
    """HF bfloat16 -> convert_hf --dtype bfloat16 -> the TF checkpoint holds the same bits (kernels
    transposed), at half the float32 conversion's bytes; loading it (bfloat16 format) and exporting
    it back to HF give the same values."""
    from checkpoint_utils.export_hf import export
    hf, params = bf16_hf
    stored = _hf_tensors(hf)
    convert(hf, str(tmp_path / "tf16"), progress=False, dtype="bfloat16")
    convert(hf, str(tmp_path / "tf32"), progress=False)
    reader = tf.train.load_checkpoint(resolve_checkpoint(str(tmp_path / "tf16")))
    fc_in = reader.get_tensor(checkpoint_key("model", "blocks/0/mlp/fc_in/kernel"))
    assert fc_in.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(_bits(fc_in), _bits(stored["transformer.h.0.mlp.fc_in.weight"].T))

    def size(d):
        return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.startswith("ckpt-0.data"))
    assert size(tmp_path / "tf16") < 0.55 * size(tmp_path / "tf32")
    with open(tmp_path / "tf16" / "conversion.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"

    loaded = _leaves(load_generation_model(params, str(tmp_path / "tf16"), "bfloat16"))
    np.testing.assert_array_equal(_bits(loaded["blocks/2/attn/out_proj/kernel_t"]),
                                  _bits(stored["transformer.h.2.attn.out_proj.weight"]))
    export(str(tmp_path / "tf16" / "params.yaml"), str(tmp_path / "tf16"), str(tmp_path / "back"), progress=False)
    back = _hf_tensors(str(tmp_path / "back"))
    assert set(back) <= set(stored) and len(back) == 5 + 10 * params.num_hidden_layers
    for name, value in back.items():
        np.testing.assert_array_equal(value, stored[name].astype(np.float32), err_msg=name)


def test_convert_float32_source_to_bfloat16_rounds_to_nearest_even(sources, tmp_path):
    source = sources["gptj_basic"]
    convert(source["hf"], str(tmp_path / "tf16"), progress=False, dtype="bfloat16")
    reader = tf.train.load_checkpoint(resolve_checkpoint(str(tmp_path / "tf16")))
    weight = _hf_tensors(source["hf"])["transformer.h.0.attn.q_proj.weight"]
    np.testing.assert_array_equal(_bits(reader.get_tensor(checkpoint_key("model", "blocks/0/attn/q_proj/kernel"))),
                                  _bits(weight.T.astype(ml_dtypes.bfloat16)))


def test_warm_start_from_a_bfloat16_checkpoint_widens_into_float32(sources):
    """Training's --checkpoint-path reads a bfloat16 conversion into its float32 variables exactly."""
    from runtime.warm_start import warm_start
    source = sources["gptj_basic"]
    model = GPTJModel(source["params"], seed=9)
    report = warm_start(model, source["tf_bf16"])
    assert not report.missing and not report.skipped
    reader = tf.train.load_checkpoint(resolve_checkpoint(source["tf_bf16"]))
    for path, variable in flatten_weights(model.weights_tree()).items():
        assert variable.dtype == tf.float32
        np.testing.assert_array_equal(
            variable.numpy(), reader.get_tensor(checkpoint_key("model", path)).astype(np.float32), err_msg=path)


# ---- (e) bad input --------------------------------------------------------------------------

def test_hf_directory_with_a_missing_shard(tmp_path):
    hf = save_hf_model(make_hf_model("gptj_basic", seed=2), str(tmp_path / "hf"), max_shard_size="20KB")
    with open(os.path.join(hf, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    assert len(shards) > 2
    os.remove(os.path.join(hf, shards[1]))
    with pytest.raises(FileNotFoundError, match=f"shard.s. listed in model.safetensors.index.json are missing: "
                                                f"{shards[1]}; re-download"):
        load_generation_model(params_from_hf_config(read_config(hf)), hf, "int8")


def test_params_of_another_model_for_a_hf_directory(sources):
    import dataclasses
    source = sources["gptj_basic"]
    wider = dataclasses.replace(source["params"], hidden_size=64)
    with pytest.raises(CheckpointMismatchError, match=r"describe another model than .*config.json: "
                                                      r"model.hidden_size=64 \(config.json: 32\)"):
        load_generation_model(wider, source["hf"], "int8")
    rotary = dataclasses.replace(source["params"], rotary_dim=2)       # no shape tells this one
    with pytest.raises(CheckpointMismatchError, match=r"model.rotary_dim=2 \(config.json: 4\)"):
        load_generation_model(rotary, source["hf"], "float32")


def test_hf_tensor_of_the_wrong_shape(sources, tmp_path):
    import shutil

    from safetensors.numpy import save_file
    source = sources["gptj_basic"]
    bad = str(tmp_path / "bad")
    shutil.copytree(source["hf"], bad)
    tensors = _hf_tensors(bad)
    tensors["transformer.h.0.attn.q_proj.weight"] = np.zeros((32, 16), np.float32)
    save_file(tensors, os.path.join(bad, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"transformer.h.0.attn.q_proj.weight has shape \[32, 16\] but "
                                              r".*config.json implies \[32, 32\]"):
        load_generation_model(source["params"], bad, "bfloat16")


def test_tf_checkpoint_of_another_model(sources):
    import dataclasses
    source = sources["gptj_basic"]
    deeper = dataclasses.replace(source["params"], num_hidden_layers=4)
    with pytest.raises(CheckpointMismatchError, match="lacks .* variable.s. the params imply, e.g. blocks/3"):
        load_generation_model(deeper, source["tf"], "int8")
    with pytest.raises(ValueError, match="weight format 'int4' is not one of float32, bfloat16, int8"):
        load_generation_model(source["params"], source["tf"], "int4")


# ---- the commands ----------------------------------------------------------------------------

VOCAB = 320     # fits the tiny tokenizer


@pytest.fixture(scope="module")
def hf_for_cli(tmp_path_factory):
    """A tiny HF GPT-J over the tiny tokenizer's vocabulary, and the same model converted."""
    from tests.data_helpers import make_tiny_tokenizer
    root = tmp_path_factory.mktemp("cli")
    hf = save_hf_model(make_hf_model("gptj_basic", seed=6, vocab_size=VOCAB), str(root / "hf"))
    params = convert(hf, str(root / "tf"), progress=False)
    tokenizer = make_tiny_tokenizer(str(root / "tok"), vocab_size=VOCAB)
    return {"hf": hf, "tf": str(root / "tf"), "params": params, "tok": str(root / "tok"), "tokenizer": tokenizer}


def test_predict_from_a_hf_directory_without_params(hf_for_cli, tmp_path):
    """run.py --mode predict --hf-checkpoint (no --params, no --model-dir) writes the tokens of the
    same-format model loaded from the conversion (greedy, eager: one function on equal weights)."""
    import run
    out = tmp_path / "out.jsonl"
    argv = ["--mode", "predict", "--hf-checkpoint", hf_for_cli["hf"], "--tokenizer", hf_for_cli["tok"],
            "--prompt", "the cat", "--max-new-tokens", "5", "--weight-format", "int8", "--ignore-eos",
            "--generation-compile", "eager", "--output", str(out)]
    assert run.main(argv) == 0
    with open(out) as f:
        (record,) = [json.loads(line) for line in f]
    model = load_generation_model(hf_for_cli["params"], hf_for_cli["tf"], "int8")
    prompt = hf_for_cli["tokenizer"].encode("the cat")
    config = GenerationConfig(max_new_tokens=5, pad_token_id=hf_for_cli["tokenizer"].eos_id)
    assert record["token_ids"] == Generator(model, "eager").generate([prompt], config)[0].token_ids


@pytest.mark.parametrize("case", ["missing shard", "contradicting params", "train", "two sources"])
def test_predict_bad_hf_input_exits_2_with_one_error_line(hf_for_cli, tmp_path, capsys, case):
    import shutil

    import run
    import yaml
    hf = hf_for_cli["hf"]
    argv = ["--mode", "predict", "--tokenizer", hf_for_cli["tok"], "--prompt", "the", "--output",
            str(tmp_path / "out.jsonl"), "--generation-compile", "eager"]
    if case == "missing shard":
        hf = str(tmp_path / "hf")
        shutil.copytree(hf_for_cli["hf"], hf)
        with open(os.path.join(hf, "model.safetensors.index.json"), "w") as f:
            json.dump({"weight_map": {"transformer.wte.weight": "model-00002-of-00002.safetensors"}}, f)
        message = "shard(s) listed in model.safetensors.index.json are missing: model-00002-of-00002.safetensors"
    elif case == "contradicting params":
        params = tmp_path / "params.yaml"
        params.write_text(yaml.safe_dump({"model": {"hidden_size": 64, "num_heads": 4, "mixed_precision": True}}))
        argv += ["--params", str(params)]
        message = "--params/--set model.hidden_size=64 (config.json: 32) contradicts"
    elif case == "train":
        argv[1] = "train"
        message = "--hf-checkpoint is for --mode predict"
    else:
        argv += ["--checkpoint-path", hf_for_cli["tf"]]
        message = "give one of --checkpoint-path and --hf-checkpoint"
    assert run.main(argv + ["--hf-checkpoint", hf]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out.jsonl").exists()


def test_params_for_a_hf_directory_keep_the_run_choices(hf_for_cli, tmp_path):
    """--params may set the compute dtype and other sections; the architecture is config.json's."""
    import yaml

    from checkpoint_utils.hf_checkpoint import hf_checkpoint_params
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"model": {"mixed_precision": True, "hidden_size": 32},
                                           "runconfig": {"model_dir": str(tmp_path / "run")}}))
    params = hf_checkpoint_params(hf_for_cli["hf"], str(params_file), ["model.residual_dropout_rate=0.1"])
    assert params.model.compute_dtype == "bfloat16" and params.model.residual_dropout_rate == 0.1
    assert params.runconfig.model_dir == str(tmp_path / "run")
    expected = dict(vars(hf_for_cli["params"]), mixed_precision=True, residual_dropout_rate=0.1)
    assert vars(params.model) == expected
    assert hf_checkpoint_params(hf_for_cli["hf"]).model == hf_for_cli["params"]


@pytest.mark.processes
def test_export_int8_from_a_hf_directory(hf_for_cli, tmp_path):
    """serving.export --hf-checkpoint --weight-format int8: the SavedModel holds the packed kernels
    (no float32 kernel variable) and, in a fresh process, gives the int8 model's greedy tokens."""
    from serving import export
    from tests.test_serving_export import run_fresh, signature_inputs
    out = str(tmp_path / "saved")
    assert export.main(["--hf-checkpoint", hf_for_cli["hf"], "--weight-format", "int8", "--output-dir", out]) == 0
    saved = tf.train.load_checkpoint(os.path.join(out, "variables", "variables"))
    dtypes = saved.get_variable_to_dtype_map()
    assert sum(d == tf.int8 for d in dtypes.values()) == 6 * hf_for_cli["params"].num_hidden_layers + 1
    assert not any(d == tf.float32 and len(saved.get_variable_to_shape_map()[k]) == 2
                   and tuple(saved.get_variable_to_shape_map()[k]) != (VOCAB, 32) for k, d in dtypes.items())
    prompts = [[5, 9, 11], [7, 3, 8, 200, 14]]
    config = GenerationConfig(max_new_tokens=4, pad_token_id=0)
    (result,) = run_fresh(out, [["serving_default", signature_inputs(prompts, config, [0, 0])]])
    model = load_generation_model(hf_for_cli["params"], hf_for_cli["tf"], "int8")
    expected = [g.token_ids for g in Generator(model, "eager").generate(prompts, config)]
    assert [ids[:n] for ids, n in zip(result["output_ids"], result["lengths"])] == expected
