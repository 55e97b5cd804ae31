"""A Hugging Face GPT-J / GPT-NeoX directory opened for reading: its config.json, the `model:`
params derived from it, its tensors (one at a time) and the check that they are the tensors a
model's params imply. Conversion (convert_hf) and direct loading (weight_source) share it."""
from __future__ import annotations

import os

from checkpoint_utils.hf_config import architecture_differences, params_from_hf_config
from checkpoint_utils.hf_mapping import HF_NAME_ALIASES, IGNORED_HF_TENSORS, TensorGroup, tensor_groups
from checkpoint_utils.hf_source import HFWeights, read_config
from config.params import ModelParams, Params, ParamsError, apply_overrides, load_params
from config.schema import from_dict, to_dict


class ConversionError(ValueError):
    """The source checkpoint does not match what its config.json (or the given params) describe."""


def describe_names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def check_tensors(weights: HFWeights, groups: list[TensorGroup], model: ModelParams,
                  described_by: str = "config.json") -> None:
    """Every tensor the model implies is present with its shape, and nothing else is there.
    described_by: what the model params came from, for the messages."""
    expected = {name: shape for g in groups for name, shape in zip(g.hf_names, g.hf_shapes)}
    present = {n for n in weights.names() if not IGNORED_HF_TENSORS.match(n)}
    if model.share_embedding_weights:  # tied checkpoints may still store the head's copy
        present -= {"lm_head.weight", "embed_out.weight"}
    missing = sorted(set(expected) - present)
    if missing:
        raise ConversionError(f"{weights.directory}: tensors that {described_by} implies are missing: "
                              f"{describe_names(missing)}; the checkpoint is incomplete or {described_by} "
                              "describes another model")
    extra = sorted(present - set(expected))
    if extra:
        raise ConversionError(f"{weights.directory}: unexpected tensors not used by a {model.rotary_style} "
                              f"model with this config: {describe_names(extra)}; check that "
                              f"{described_by} belongs to these weights")
    for name, shape in expected.items():
        actual = weights.shape(name)
        if tuple(actual) != tuple(shape):
            raise ConversionError(f"{weights.directory}: tensor {name} has shape {list(actual)} but "
                                  f"{described_by} implies {list(shape)}")


class HFCheckpoint:
    """config.json, the params it implies (`params`) and the weights of a local HF directory."""

    def __init__(self, directory: str):
        self.directory = directory
        self.config = read_config(directory)
        self.params = params_from_hf_config(self.config)     # checks model_type first
        self.weights = HFWeights(directory)
        self.weights.use_aliases(HF_NAME_ALIASES.get(self.config["model_type"], {}))

    def groups(self, model: ModelParams) -> list[TensorGroup]:
        """The HF tensors of `model` (padded beyond config.json's vocabulary when model.vocab_size is)."""
        return tensor_groups(model, hf_vocab_size=self.config["vocab_size"])

    def check(self, model: ModelParams, described_by: str = "config.json") -> list[TensorGroup]:
        """check_tensors for `model`; returns its groups."""
        groups = self.groups(model)
        check_tensors(self.weights, groups, model, described_by)
        return groups


def hf_checkpoint_params(directory: str, params_path: str | None = None, overrides: list[str] = ()) -> Params:
    """The params to run the Hugging Face checkpoint in `directory` with (--hf-checkpoint): the
    model: section derived from its config.json. `params_path` is optional: it gives the other
    sections (e.g. runconfig.model_dir) and may set the model: keys that do not change which model
    it is (hf_config.RUN_CHOICES: the compute dtype, dropouts, fused_qkv) and pad vocab_size;
    `overrides` (--set) apply last. A model: key that contradicts config.json is an error."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--hf-checkpoint {directory} is not a directory; pass a Hugging Face "
                                "checkpoint directory (config.json and safetensors files)")
    hf_model = params_from_hf_config(read_config(directory))
    defaults = to_dict(hf_model)
    if params_path is not None:
        params = load_params(params_path, list(overrides), model_defaults=defaults)
    else:
        try:
            params = from_dict(Params, apply_overrides({"model": defaults}, list(overrides)), "")
        except ParamsError as err:
            raise ParamsError(f"--hf-checkpoint {directory} with overrides {list(overrides)}: {err}") from None
    differences = architecture_differences(hf_model, params.model)
    if differences:
        given = "--params/--set" if params_path else "--set"
        raise ParamsError(f"{given} {', '.join(differences)} contradict{'s' if len(differences) == 1 else ''} "
                          f"{os.path.join(directory, 'config.json')}: with --hf-checkpoint the architecture comes "
                          "from config.json; drop those keys")
    return params
