"""Load a model for generation straight into its weight format, tensor by tensor.

A 6B-parameter GPT-J is 24 GB as float32: building that model and then packing its kernels
(GenerationModel(model, "int8")) cannot fit a 24 GB machine, though the int8 model is 7 GB. Here
every weight is read from the checkpoint alone (checkpoint_utils.weight_source: a TF checkpoint
in float32 or bfloat16, or a Hugging Face directory) and made directly into what the format keeps:

    dense kernels   packed (generation.weights.pack_kernel: int8 rows + scales, or bfloat16 rows),
                    a block of output channels at a time; no float32 variable is ever made for them
    embedding table bfloat16 in the bfloat16 format, and in int8 when the checkpoint stores it in
                    bfloat16 (exact; not for a table tied to the head, which a step would widen
                    whole): generation.weights.bfloat16_table; else float32
    the rest        float32 variables (LayerNorms, biases), as GenerationModel keeps them

The model's code runs over that tree from a GPTJModel built without variables
(model.build_model_with). The largest transient is one checkpoint tensor (the 826 MB LM head
for GPT-J 6B, read first, while little else is held) plus its packed copy; the bits equal
GenerationModel's packing of the float32 model (tests/test_generation_loading.py). The float32
format goes through the same reader into float32 variables (checkpoint_utils.load).
"""
from __future__ import annotations

from checkpoint_utils.load import build_float32_model, load_weight_tree
from checkpoint_utils.weight_source import WeightSource, open_weights
from config.params import ModelParams
from generation.config import WEIGHT_FORMATS
from generation.weights import GenerationModel
from model import GPTJModel, build_model_with


def load_generation_model(model_params: ModelParams, source: str, weight_format: str = "float32"
                          ) -> GPTJModel | GenerationModel:
    """The model in `weight_format` ("float32": a GPTJModel; "bfloat16", "int8": a GenerationModel)
    with its weights from `source`: a run's model_dir (its latest checkpoint), a converted
    checkpoint directory or prefix, or a Hugging Face directory. The source is checked against
    `model_params` before anything is read (one clear error)."""
    return load_weights(model_params, open_weights(source), weight_format)


def load_weights(model_params: ModelParams, weights: WeightSource, weight_format: str
                 ) -> GPTJModel | GenerationModel:
    """load_generation_model over an opened source (a test may instrument its reads)."""
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight format {weight_format!r} is not one of {', '.join(WEIGHT_FORMATS)}")
    if weight_format == "float32":
        return build_float32_model(model_params, weights)
    return GenerationModel(build_model_with(model_params, lambda spec: None), weight_format,
                           load_weight_tree(model_params, weights, weight_format))


def predict_source(model_dir: str | None, checkpoint_path: str | None) -> str:
    """The weights predict mode generates with, as the estimator restores them: model_dir's latest
    checkpoint, else checkpoint_path (a converted model or another run), else an error."""
    import tensorflow as tf
    if model_dir and tf.train.latest_checkpoint(model_dir):
        return model_dir
    if checkpoint_path:
        return checkpoint_path
    where = f"model_dir {model_dir} holds no checkpoint" if model_dir else "no --model-dir"
    raise FileNotFoundError(f"{where} and no --checkpoint-path was given; train first, or pass the run's "
                            "--model-dir, a --checkpoint-path or an --hf-checkpoint")

