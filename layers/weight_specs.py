"""The weights of GPTJModel(config) as (path, shape, initialiser) without building it: what
conversion, checkpoint checks, the disk store and run planning read. Free of TensorFlow, so a
tool that only sizes a model (bench.plan) does not load it; model.py re-exports these names
and a test keeps them equal to the built model."""
from __future__ import annotations

from typing import NamedTuple

from config.params import ModelParams


class WeightSpec(NamedTuple):
    path: str                   # as in weights_tree(): "blocks/3/attn/q_proj/kernel"
    shape: tuple[int, ...]
    init: str                   # "embedding" | "kernel" | "output" | "zeros" | "ones"


def weight_specs(config: ModelParams) -> list[WeightSpec]:
    """Every weight of GPTJModel(config) in creation order, without allocating it: conversion and
    checkpoint checks read the shapes, the disk weight store draws initial values in this order
    (the seed stream's order). A test keeps it equal to the built model."""
    d, f, v = config.hidden_size, config.filter_size, config.vocab_size
    specs = [WeightSpec("embedding/embeddings", (v, d), "embedding")]

    def dense(path: str, in_dim: int, out_dim: int, bias: bool, init: str) -> None:
        specs.append(WeightSpec(f"{path}/kernel", (in_dim, out_dim), init))
        if bias:
            specs.append(WeightSpec(f"{path}/bias", (out_dim,), "zeros"))

    def layer_norm(path: str) -> None:
        specs.extend([WeightSpec(f"{path}/gamma", (d,), "ones"), WeightSpec(f"{path}/beta", (d,), "zeros")])

    for i in range(config.num_hidden_layers):
        block = f"blocks/{i}"
        layer_norm(f"{block}/ln_1")
        if config.use_untied_layer_norm:
            layer_norm(f"{block}/ln_2")
        qkv_bias = config.use_projection_bias_in_attention
        if config.fused_qkv:
            dense(f"{block}/attn/qkv_proj", d, 3 * d, qkv_bias, "kernel")
        else:
            for name in ("q_proj", "k_proj", "v_proj"):
                dense(f"{block}/attn/{name}", d, d, qkv_bias, "kernel")
        dense(f"{block}/attn/out_proj", d, d, config.use_attention_output_bias, "output")
        dense(f"{block}/mlp/fc_in", d, f, config.use_ffn_bias, "kernel")
        dense(f"{block}/mlp/fc_out", f, d, config.use_ffn_bias, "output")
    layer_norm("ln_f")
    if not config.share_embedding_weights:
        dense("lm_head", d, v, config.use_bias_in_output, "kernel")
    elif config.use_bias_in_output:
        specs.append(WeightSpec("lm_head_bias", (v,), "zeros"))
    return specs


def weight_shapes(config: ModelParams) -> dict[str, tuple[int, ...]]:
    """{weight path: shape} of GPTJModel(config), without allocating it."""
    return {spec.path: spec.shape for spec in weight_specs(config)}
