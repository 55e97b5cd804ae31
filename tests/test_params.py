"""Params loading: defaults, overrides, and one clear message per kind of bad input."""
from __future__ import annotations

import glob
import os
import re

import pytest
import yaml

from config.params import ParamsError, apply_overrides, load_params, save_params
from config.schema import to_dict

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml")) +
                 glob.glob(os.path.join(os.path.dirname(__file__), "..", "fine_tuning", "*", "configs", "*.yaml")))
MINIMAL = {"model": {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_heads": 4,
                     "rotary_dim": 4, "filter_size": 64, "max_position_embeddings": 32}}


def write(tmp_path, data, name="params.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def load_with(tmp_path, *overrides, base=MINIMAL):
    return load_params(write(tmp_path, base), list(overrides))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_configs_load(path):
    params = load_params(path)
    assert params.model.hidden_size % params.model.num_heads == 0


def test_gptj_6b_config_matches_the_published_model():
    m = load_params(os.path.join(os.path.dirname(__file__), "..", "configs", "params_gptj_6B.yaml")).model
    assert (m.hidden_size, m.num_hidden_layers, m.num_heads, m.rotary_dim, m.filter_size,
            m.vocab_size, m.max_position_embeddings) == (4096, 28, 16, 64, 16384, 50400, 2048)
    assert m.use_parallel_residual and not m.use_untied_layer_norm and not m.share_embedding_weights


def test_defaults_and_overrides(tmp_path):
    params = load_with(tmp_path, "model.num_hidden_layers=3", "optimizer.learning_rate=3e-4",
                       "runconfig.weight_streaming.host_store=disk", "model.use_ffn_bias=false")
    assert params.model.num_hidden_layers == 3
    assert params.optimizer.learning_rate == 3e-4              # parsed from the text '3e-4', not computed: exact
    assert params.runconfig.weight_streaming.host_store == "disk"
    assert params.model.use_ffn_bias is False
    assert params.model.layer_norm_epsilon == 1e-5 and params.runconfig.execution == "standard"
    assert params.model.head_dim == 8 and params.model.compute_dtype == "float32"


def test_params_are_immutable(tmp_path):
    params = load_with(tmp_path)
    with pytest.raises(AttributeError):
        params.model.hidden_size = 8  # type: ignore[misc]


def test_save_round_trip(tmp_path):
    params = load_with(tmp_path, "train_input.data_dir=[a, b]", "train_input.max_sequence_length=16",
                       "optimizer.learning_rate="
                       "[{scheduler: Linear, initial_learning_rate: 0.0, end_learning_rate: 1.0e-3, steps: 10},"
                       " {scheduler: Cosine, initial_learning_rate: 1.0e-3, decay_steps: 90, alpha: 0.1}]")
    save_params(params, str(tmp_path / "out" / "params.yaml"))
    again = load_params(str(tmp_path / "out" / "params.yaml"))
    assert again == params
    assert to_dict(again)["train_input"]["data_dir"] == ["a", "b"]


@pytest.mark.parametrize("override,message", [
    ("model.hidden_sise=64", "model.hidden_sise is not a known key; did you mean model.hidden_size?"),
    ("modle.hidden_size=64", "modle is not a known key; did you mean model?"),
    ("model.hidden_size=sixty", "model.hidden_size='sixty' has the wrong type; expected an integer"),
    ("model.use_ffn_bias=1", "model.use_ffn_bias=1 has the wrong type; expected true or false"),
    ("model.num_heads=5", "model.hidden_size=32 is not divisible by model.num_heads=5; "
                          "choose num_heads dividing hidden_size"),
    ("model.rotary_dim=3", "model.rotary_dim=3 must be even"),
    ("model.rotary_dim=16", "model.rotary_dim=16 exceeds head_dim=8 (hidden_size/num_heads); use at most 8"),
    ("model.nonlinearity=relu", "model.nonlinearity='relu' is not allowed; use one of 'gelu_new', 'gelu'"),
    ("model.rotary_style=gpt-j", "model.rotary_style='gpt-j' is not allowed; use one of 'gptj', 'neox' "
                                 "(did you mean 'gptj'?)"),
    ("model.vocab_size=0", "model.vocab_size=0 must be positive"),
    ("model.attention_dropout_rate=1.5", "model.attention_dropout_rate=1.5 must be in [0, 1)"),
    ("model.use_parallel_residual=false", "model.use_parallel_residual=false needs "
                                          "model.use_untied_layer_norm=true"),
    ("model.initializer.stddev=-1", "model.initializer.stddev=-1.0 must be >= 0"),
    ("train_input.batch_size=4", "train_input.data_dir is empty; set it to the directory holding the TFRecords"),
    ("eval_input={data_dir: d, max_sequence_length: 64}",
     "eval_input.max_sequence_length=64 exceeds model.max_position_embeddings=32"),
    ("optimizer.optimizer_type=adagrad", "optimizer.optimizer_type='adagrad' is not allowed"),
    ("optimizer.learning_rate=[{scheduler: Linear, initial_learning_rate: 0.0, steps: 5}]",
     "optimizer.learning_rate[0].end_learning_rate is required for scheduler 'Linear'"),
    ("optimizer.learning_rate=[{scheduler: Constant, learning_rate: 1.0}, {scheduler: Constant, learning_rate: 2.0}]",
     "optimizer.learning_rate[0] needs `steps`: only the last segment may be open-ended"),
    ("optimizer.optimizer_type=adam", None),  # valid on its own
    ("optimizer.loss_scaling_factor=sometimes", "optimizer.loss_scaling_factor='sometimes' has the wrong type"),
    ("runconfig.strategy=tpu", "runconfig.strategy='tpu' is not allowed; use one of 'auto', 'one_device', "
                               "'mirrored', 'multi_worker'"),
    ("runconfig.execution=streaming", "runconfig.execution='streaming' is not allowed"),
    ("runconfig.weight_streaming.prefetch_blocks=-1", "runconfig.weight_streaming.prefetch_blocks must be >= 0"),
    ("runconfig.max_steps=0", "runconfig.max_steps=0 must be positive"),
])
def test_bad_values_name_the_key(tmp_path, override, message):
    if message is None:
        load_with(tmp_path, override)
        return
    with pytest.raises(ParamsError) as err:
        load_with(tmp_path, override)
    assert message in str(err.value)
    # the override is blamed, not the params file (which is valid on its own)
    assert str(err.value).startswith(f"override {override!r}: ") or \
        str(err.value).startswith(f"{tmp_path / 'params.yaml'} with override {override!r}: ")


def test_errors_in_the_file_blame_the_file_and_errors_from_overrides_blame_them(tmp_path):
    bad_file = {**MINIMAL, "model": {**MINIMAL["model"], "rotary_dim": 3}}
    with pytest.raises(ParamsError) as err:
        load_with(tmp_path, "runconfig.max_steps=5", base=bad_file)
    assert str(err.value).startswith(f"{tmp_path / 'params.yaml'}: model.rotary_dim=3 must be even")
    with pytest.raises(ParamsError) as err:       # a later override of the same key is the one in effect
        load_with(tmp_path, "model.rotary_dim=2", "model.rotary_dim=5")
    assert str(err.value).startswith("override 'model.rotary_dim=5': model.rotary_dim=5 must be even")


def test_adam_with_weight_decay_is_rejected(tmp_path):
    with pytest.raises(ParamsError, match="weight_decay_rate=0.1 needs optimizer_type 'adamw'"):
        load_with(tmp_path, "optimizer.optimizer_type=adam", "optimizer.weight_decay_rate=0.1")


def test_missing_required_and_section_shape(tmp_path):
    with pytest.raises(ParamsError, match="model is required but missing"):
        load_params(write(tmp_path, {"optimizer": {}}))
    with pytest.raises(ParamsError, match="model must be a mapping"):
        load_params(write(tmp_path, {"model": [1, 2]}))


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "model:\n  hidden_size: 32\n   num_heads: [4\n")
    with pytest.raises(ParamsError, match=r"params.yaml: not valid YAML at line 3"):
        load_params(path)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(ParamsError, match="is empty; it needs at least a `model:` section"):
        load_params(write(tmp_path, ""))
    with pytest.raises(ParamsError, match="does not exist; pass --params"):
        load_params(str(tmp_path / "nope.yaml"))


def test_bad_override_syntax():
    with pytest.raises(ParamsError, match="is not of the form section.key=value"):
        apply_overrides({}, ["model.hidden_size"])
    with pytest.raises(ParamsError, match="model.hidden_size is not a section"):
        apply_overrides({"model": {"hidden_size": 3}}, ["model.hidden_size.x=1"])


def test_a_renamed_key_reads_under_its_new_name_and_is_reported(tmp_path, capsys):
    params = load_with(tmp_path, "model.use_ffn_bias_in_attention=true")
    assert params.model.use_attention_output_bias is True
    assert "model.use_ffn_bias_in_attention is now called model.use_attention_output_bias" in capsys.readouterr().err
    with pytest.raises(ParamsError, match="are the same setting .* keep only model.use_attention_output_bias"):
        load_with(tmp_path, "model.use_ffn_bias_in_attention=true", "model.use_attention_output_bias=true")


@pytest.mark.parametrize("overrides, message", [
    (["runconfig.mesh={data: 2, model: 0}"], "runconfig.mesh.model=0 must be positive"),
    (["runconfig.mesh={data: 1, model: 3}"], "model.num_heads=4 is not divisible by runconfig.mesh.model=3"),
    (["model.filter_size=66", "runconfig.mesh={model: 4}"],
     "model.filter_size=66 is not divisible by runconfig.mesh.model=4"),
    (["runconfig.mesh={model: 2}", "model.fused_qkv=true"], "runconfig.mesh does not split model.fused_qkv=true"),
    (["runconfig.mesh={model: 2}", "optimizer.grad_accum_steps=2"], "runconfig.mesh runs optimizer.grad_accum_steps=1"),
    (["runconfig.mesh={model: 2}", "runconfig.execution=weight_streaming"],
     "runconfig.mesh needs runconfig.execution=standard"),
    (["runconfig.mesh={data: 2}", "runconfig.strategy=mirrored"], "runconfig.mesh replaces runconfig.strategy"),
    (["runconfig.mesh={data: 2}", "model.attention_dropout_rate=0.1"],
     "runconfig.mesh does not run dropout (model.attention_dropout_rate=0.1)"),
])
def test_mesh_settings_are_checked(tmp_path, overrides, message):
    with pytest.raises(ParamsError, match=re.escape(message)):
        load_with(tmp_path, *overrides)


def test_mesh_is_absent_by_default_and_parsed_when_given(tmp_path):
    assert load_with(tmp_path).runconfig.mesh is None
    mesh = load_with(tmp_path, "runconfig.mesh={data: 2, model: 2}").runconfig.mesh
    assert (mesh.data, mesh.model, mesh.devices) == (2, 2, 4)
    # A vocabulary mesh.model does not divide is split over hidden_size instead (runtime/mesh_layouts.py).
    assert load_with(tmp_path, "model.vocab_size=67", "runconfig.mesh={model: 4}").model.vocab_size == 67


def test_cpu_devices_is_absent_by_default_and_a_positive_count(tmp_path):
    assert load_with(tmp_path).runconfig.cpu_devices is None
    assert load_with(tmp_path, "runconfig.cpu_devices=4").runconfig.cpu_devices == 4
    for value, message in (("0", "runconfig.cpu_devices=0 must be a positive number of logical CPU devices"),
                           ("-2", "runconfig.cpu_devices=-2 must be a positive"),
                           ("2.5", "runconfig.cpu_devices=2.5 has the wrong type; expected int | null"),
                           ("four", "runconfig.cpu_devices='four' has the wrong type")):
        with pytest.raises(ParamsError, match=re.escape(f"override 'runconfig.cpu_devices={value}': {message}")):
            load_with(tmp_path, f"runconfig.cpu_devices={value}")
