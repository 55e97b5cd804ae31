"""HF -> TF conversion: logits parity with transformers, formats, round trip, bad input."""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from checkpoint_utils import convert_hf, export_hf
from checkpoint_utils.convert_hf import ConversionError, convert, load_converted_params
from checkpoint_utils.hf_config import UnsupportedModelError
from checkpoint_utils.load import load_model
from checkpoint_utils.output_dir import OutputDirError
from checkpoint_utils.safetensors_reader import SafetensorsFile
from tests.hf_models import (GPTJ_SHAPES, NEOX_SHAPES, hf_logits, make_hf_model, random_ids, save_hf_model,
                             save_pytorch_bin)
from tests.numerics import LOGITS_VS_TRANSFORMERS


# float32 TF vs float32 torch on the same weights: the rounding of <= 3 blocks of sums of <= 128
# terms at |logits| <= 2.5 (tests/numerics.py); any mapping bug moves logits by >= 1e-2
TOLERANCE = LOGITS_VS_TRANSFORMERS


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Each tiny HF model saved once: {kind: (torch model, directory)}."""
    root = tmp_path_factory.mktemp("hf")
    return {kind: (model, save_hf_model(model, str(root / kind)))
            for kind in list(GPTJ_SHAPES) + list(NEOX_SHAPES)
            for model in [make_hf_model(kind, seed=len(kind))]}


def _ours_logits(directory, ids, attention_mask=None):
    model = load_model(load_converted_params(directory), directory)
    kwargs = {} if attention_mask is None else {"attention_mask": tf.constant(attention_mask)}
    return model(tf.constant(ids), **kwargs).logits.numpy()


@pytest.mark.numerics
@pytest.mark.parametrize("kind,fused", [(k, False) for k in list(GPTJ_SHAPES) + list(NEOX_SHAPES)]
                         + [("gptj_basic", True), ("neox_basic", True)])
def test_converted_logits_match_transformers(hf_dirs, tmp_path, kind, fused):
    hf_model, hf_dir = hf_dirs[kind]
    params = convert(hf_dir, str(tmp_path / "tf"), fused_qkv=fused, progress=False)
    assert params.fused_qkv == fused
    ids = random_ids(params.vocab_size, batch=2, length=13, seed=3)
    diff = np.abs(_ours_logits(str(tmp_path / "tf"), ids) - hf_logits(hf_model, ids)).max()
    assert diff <= TOLERANCE


@pytest.mark.numerics
def test_padded_batch_matches_transformers(hf_dirs, tmp_path):
    """Right padding with an attention mask: the real positions agree."""
    hf_model, hf_dir = hf_dirs["gptj_basic"]
    convert(hf_dir, str(tmp_path / "tf"), progress=False)
    ids = random_ids(101, batch=2, length=9, seed=5)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    ours = _ours_logits(str(tmp_path / "tf"), ids, mask)
    ref = hf_logits(hf_model, ids, mask)
    assert np.abs(ours[0] - ref[0]).max() <= TOLERANCE
    assert np.abs(ours[1, :6] - ref[1, :6]).max() <= TOLERANCE


def test_params_yaml_derived_from_config(hf_dirs, tmp_path):
    _, hf_dir = hf_dirs["neox_basic"]
    params = convert(hf_dir, str(tmp_path / "tf"), progress=False)
    spec = NEOX_SHAPES["neox_basic"]
    assert (params.hidden_size, params.num_hidden_layers, params.num_heads) == (32, 3, 4)
    assert params.rotary_dim == int(spec["rotary_pct"] * 32 // 4)
    assert params.rotary_style == "neox" and params.use_untied_layer_norm and not params.use_bias_in_output
    assert load_converted_params(str(tmp_path / "tf")) == params
    info = json.loads((tmp_path / "tf" / "conversion.json").read_text())
    assert info["model_type"] == "gpt_neox" and info["source"] == hf_dir


@pytest.mark.numerics
@pytest.mark.parametrize("kind", ["gptj_basic", "neox_sequential_nobias"])
def test_sharded_safetensors_and_pytorch_bin_sources(hf_dirs, tmp_path, kind):
    hf_model, _ = hf_dirs[kind]
    sharded = save_hf_model(hf_model, str(tmp_path / "sharded"), max_shard_size="20KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    binary = save_pytorch_bin(hf_model, str(tmp_path / "bin"))
    sharded_binary = save_pytorch_bin(hf_model, str(tmp_path / "bin2"), shards=3)
    ids = random_ids(hf_model.config.vocab_size, 1, 7)
    reference = hf_logits(hf_model, ids)
    for name, source in (("a", sharded), ("b", binary), ("c", sharded_binary)):
        convert(source, str(tmp_path / name), progress=False)
        assert np.abs(_ours_logits(str(tmp_path / name), ids) - reference).max() <= TOLERANCE


def test_bfloat16_safetensors_source(hf_dirs, tmp_path):
    import torch
    hf_model, _ = hf_dirs["gptj_basic"]
    bf16 = save_hf_model(copy.deepcopy(hf_model).to(torch.bfloat16), str(tmp_path / "bf16"))
    reader = SafetensorsFile(os.path.join(bf16, "model.safetensors"))
    name = "transformer.h.0.mlp.fc_in.weight"
    expected = hf_model.state_dict()[name].to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(reader.read(name).astype(np.float32), expected)
    convert(bf16, str(tmp_path / "tf"), progress=False)


@pytest.mark.numerics
def test_vocab_padding(hf_dirs, tmp_path):
    hf_model, hf_dir = hf_dirs["gptj_basic"]
    params = convert(hf_dir, str(tmp_path / "tf"), vocab_size=128, progress=False)
    assert params.vocab_size == 128
    ids = random_ids(101, 1, 8)
    ours = _ours_logits(str(tmp_path / "tf"), ids)
    assert ours.shape[-1] == 128
    assert np.abs(ours[..., :101] - hf_logits(hf_model, ids)).max() <= TOLERANCE
    model = load_model(params, str(tmp_path / "tf"))
    assert not np.any(model.embedding.embeddings.numpy()[101:])
    with pytest.raises(ValueError, match="--vocab-size 50 is smaller than the checkpoint's vocab_size 101"):
        convert(hf_dir, str(tmp_path / "tf2"), vocab_size=50, progress=False)


@pytest.mark.parametrize("kind,fused", [("gptj_basic", False), ("gptj_basic", True),
                                        ("neox_basic", True), ("neox_sequential_nobias", False)])
def test_round_trip_is_bit_identical_and_loads_in_transformers(hf_dirs, tmp_path, kind, fused):
    import transformers
    hf_model, hf_dir = hf_dirs[kind]
    convert(hf_dir, str(tmp_path / "tf"), fused_qkv=fused, progress=False)
    export_hf.export(str(tmp_path / "tf" / "params.yaml"), str(tmp_path / "tf"), str(tmp_path / "hf"),
                     progress=False)
    original = SafetensorsFile(os.path.join(hf_dir, "model.safetensors"))
    exported = SafetensorsFile(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(exported.keys()) == sorted(original.keys())
    for name in exported.keys():
        a, b = exported.read(name), original.read(name)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = random_ids(hf_model.config.vocab_size, 2, 6)
    np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(hf_model, ids))


def test_export_shards_and_index(hf_dirs, tmp_path):
    _, hf_dir = hf_dirs["gptj_basic"]
    convert(hf_dir, str(tmp_path / "tf"), progress=False)
    export_hf.export(str(tmp_path / "tf" / "params.yaml"), str(tmp_path / "tf"), str(tmp_path / "hf"),
                     max_shard_bytes=30_000, progress=False)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / "hf" / s).exists() for s in shards)


# ---- bad input: one clear error, nothing written --------------------------------------------

def _edit_config(directory, **changes):
    path = os.path.join(directory, "config.json")
    config = json.load(open(path))
    config.update(changes)
    json.dump(config, open(path, "w"))


def _rewrite_tensors(src_dir, dst_dir, edit):
    """Copy a single-file safetensors checkpoint with its tensors edited by edit(dict)."""
    from safetensors.numpy import load_file, save_file
    os.makedirs(dst_dir)
    tensors = load_file(os.path.join(src_dir, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src_dir, "config.json")) as f, open(os.path.join(dst_dir, "config.json"), "w") as g:
        g.write(f.read())
    return dst_dir


def test_unknown_model_type(hf_dirs, tmp_path):
    _, hf_dir = hf_dirs["gptj_basic"]
    bad = _rewrite_tensors(hf_dir, str(tmp_path / "bad"), lambda t: None)
    _edit_config(bad, model_type="llama")
    with pytest.raises(UnsupportedModelError, match="model_type='llama' is not supported; this framework "
                                                    "converts gptj, gpt_neox"):
        convert(bad, str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_tensor(hf_dirs, tmp_path):
    _, hf_dir = hf_dirs["gptj_basic"]
    bad = _rewrite_tensors(hf_dir, str(tmp_path / "bad"), lambda t: t.pop("transformer.h.1.mlp.fc_in.bias"))
    with pytest.raises(ConversionError, match=r"missing: transformer\.h\.1\.mlp\.fc_in\.bias"):
        convert(bad, str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_extra_tensor(hf_dirs, tmp_path):
    _, hf_dir = hf_dirs["neox_basic"]
    bad = _rewrite_tensors(hf_dir, str(tmp_path / "bad"),
                           lambda t: t.update({"gpt_neox.layers.3.mlp.dense_h_to_4h.bias": np.zeros(64, np.float32)}))
    with pytest.raises(ConversionError, match=r"unexpected tensors .*gpt_neox\.layers\.3\.mlp\.dense_h_to_4h\.bias"):
        convert(bad, str(tmp_path / "out"), progress=False)


def test_wrong_shape(hf_dirs, tmp_path):
    _, hf_dir = hf_dirs["gptj_basic"]
    name = "transformer.h.0.attn.q_proj.weight"
    bad = _rewrite_tensors(hf_dir, str(tmp_path / "bad"),
                           lambda t: t.update({name: np.zeros((32, 16), np.float32)}))
    with pytest.raises(ConversionError, match=rf"{name} has shape \[32, 16\] but config.json implies \[32, 32\]"):
        convert(bad, str(tmp_path / "out"), progress=False)


def test_output_dir_holding_a_different_model(hf_dirs, tmp_path):
    out = str(tmp_path / "out")
    convert(hf_dirs["gptj_basic"][1], out, progress=False)
    before = sorted(os.listdir(out))
    with pytest.raises(OutputDirError, match="already holds a different converted model"):
        convert(hf_dirs["neox_basic"][1], out, progress=False)
    assert sorted(os.listdir(out)) == before
    convert(hf_dirs["gptj_basic"][1], out, progress=False)  # the same model may be rewritten
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="not a converted model"):
        convert(hf_dirs["gptj_basic"][1], str(tmp_path / "other"), progress=False)
    assert os.listdir(tmp_path / "other") == ["notes.txt"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp dirs left behind


def test_missing_source_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        convert(str(tmp_path / "nope"), str(tmp_path / "out"), progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "gptj", "vocab_size": 8,
                                                                 "n_embd": 8, "n_layer": 1, "n_head": 2,
                                                                 "n_positions": 8, "rotary_dim": 2}))
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        convert(str(tmp_path / "empty"), str(tmp_path / "out"), progress=False)


def test_truncated_safetensors(hf_dirs, tmp_path):
    _, hf_dir = hf_dirs["gptj_basic"]
    bad = _rewrite_tensors(hf_dir, str(tmp_path / "bad"), lambda t: None)
    path = os.path.join(bad, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(ValueError, match="is truncated"):
        convert(bad, str(tmp_path / "out"), progress=False)


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    assert convert_hf.main(["--source", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o"),
                            "--no-progress"]) == 2
    assert "error: --source" in capsys.readouterr().err


def test_hub_id_resolves_through_the_huggingface_hub_cache(hf_dirs, tmp_path):
    """A hub id goes through huggingface_hub; offline, it is served from the local cache."""
    import shutil
    hf_model, hf_dir = hf_dirs["gptj_basic"]
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--tiny-org--tiny-gptj"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(hf_dir, repo / "snapshots" / commit)
    from checkpoint_utils.hf_source import resolve_source
    resolved = resolve_source("tiny-org/tiny-gptj", cache_dir=str(tmp_path / "cache"))
    assert resolved == str(repo / "snapshots" / commit)
    convert("tiny-org/tiny-gptj", str(tmp_path / "tf"), cache_dir=str(tmp_path / "cache"), progress=False)
    with pytest.raises(FileNotFoundError, match="not reachable on the hub .HF_HUB_OFFLINE is set and the local "
                                                "hub cache holds no snapshot"):
        resolve_source("tiny-org/absent", cache_dir=str(tmp_path / "cache"))
    ids = random_ids(101, 1, 5)
    assert np.abs(_ours_logits(str(tmp_path / "tf"), ids) - hf_logits(hf_model, ids)).max() <= TOLERANCE
