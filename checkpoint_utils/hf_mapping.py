"""Which Hugging Face tensors become which of our variables, and how.

A `TensorGroup` ties one or more HF tensors to one or more of our weight paths (paths in
`GPTJModel.weights_tree()`, e.g. `blocks/3/attn/q_proj/kernel`) with a transform each way.
Most groups are one-to-one (a transpose: torch Linear stores [out, in], we store [in, out]);
GPT-NeoX's fused query_key_value, whose rows are laid out [heads, (q|k|v), head_dim], splits
into three. Conversion and export both read this one table.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from checkpoint_utils.hf_config import model_type_of
from checkpoint_utils.host_arrays import aligned_copy
from config.params import ModelParams

Arrays = list[np.ndarray]

# Buffers that older checkpoints saved but that hold no weights (masks, rotary tables).
IGNORED_HF_TENSORS = re.compile(
    r".*\.(attn|attention)\.(bias|masked_bias)$|.*\.rotary_emb\.inv_freq$")


Shape = tuple[int, ...]

# Names some writers use for a tensor the table knows by its canonical (hub) name:
# transformers 5 calls GPT-NeoX's head `lm_head` in memory; checkpoints call it `embed_out`.
HF_NAME_ALIASES = {"gpt_neox": {"lm_head.weight": "embed_out.weight"}}


@dataclass(frozen=True)
class TensorGroup:
    hf_names: tuple[str, ...]
    hf_shapes: tuple[Shape, ...]    # what the HF config implies for each HF tensor
    paths: tuple[str, ...]
    to_ours: Callable[[Arrays], Arrays]
    to_hf: Callable[[Arrays], Arrays]


def _transpose(arrays: Arrays) -> Arrays:
    return [aligned_copy(a.T) for a in arrays]


def _identity(arrays: Arrays) -> Arrays:
    return list(arrays)


def _same(hf: str, path: str, shape: Shape) -> TensorGroup:
    return TensorGroup((hf,), (shape,), (path,), _identity, _identity)


def _linear(hf: str, path: str, in_dim: int, out_dim: int, bias: bool) -> list[TensorGroup]:
    groups = [TensorGroup((f"{hf}.weight",), ((out_dim, in_dim),), (f"{path}/kernel",),
                          _transpose, _transpose)]
    if bias:
        groups.append(_same(f"{hf}.bias", f"{path}/bias", (out_dim,)))
    return groups


def _layer_norm(hf: str, path: str, dim: int) -> list[TensorGroup]:
    return [_same(f"{hf}.weight", f"{path}/gamma", (dim,)), _same(f"{hf}.bias", f"{path}/beta", (dim,))]


def _pad_rows(vocab_size: int) -> tuple[Callable, Callable]:
    """Pad the vocab axis (axis 0 of HF [V, ...]) with zeros up to vocab_size: padded ids are
    never produced by the tokenizer (GPT-J itself pads 50257 to 50400 this way)."""
    def pad(arrays: Arrays) -> Arrays:
        (a,) = arrays
        extra = vocab_size - a.shape[0]
        return [np.pad(a, [(0, extra)] + [(0, 0)] * (a.ndim - 1)) if extra > 0 else a]
    return pad, _identity


def _vocab_groups(hf_embedding: str, hf_head: str, head_bias: bool, model: ModelParams,
                  hf_vocab: int) -> list[TensorGroup]:
    pad, keep = _pad_rows(model.vocab_size)
    rows = (hf_vocab, model.hidden_size)
    groups = [TensorGroup((hf_embedding,), (rows,), ("embedding/embeddings",), pad, keep)]
    if model.share_embedding_weights:
        if head_bias:
            groups.append(TensorGroup((f"{hf_head}.bias",), ((hf_vocab,),), ("lm_head_bias",), pad, keep))
        return groups
    groups.append(TensorGroup((f"{hf_head}.weight",), (rows,), ("lm_head/kernel",),
                              lambda a: _transpose(pad(a)), _transpose))
    if head_bias:
        groups.append(TensorGroup((f"{hf_head}.bias",), ((hf_vocab,),), ("lm_head/bias",), pad, keep))
    return groups


def _qkv_paths(model: ModelParams, prefix: str, suffix: str) -> tuple[str, ...]:
    if model.fused_qkv:
        return (f"{prefix}/qkv_proj/{suffix}",)
    return tuple(f"{prefix}/{name}/{suffix}" for name in ("q_proj", "k_proj", "v_proj"))


def _separate_qkv_kernels(model: ModelParams, hf: str, path: str) -> TensorGroup:
    """GPT-J's q_proj/k_proj/v_proj weights [D, D] each -> our q/k/v kernels or one fused [D, 3D]."""
    names = tuple(f"{hf}.{n}.weight" for n in ("q_proj", "k_proj", "v_proj"))
    shapes = ((model.hidden_size, model.hidden_size),) * 3
    if not model.fused_qkv:
        return TensorGroup(names, shapes, _qkv_paths(model, path, "kernel"), _transpose, _transpose)
    return TensorGroup(names, shapes, _qkv_paths(model, path, "kernel"),
                       lambda a: [np.concatenate(_transpose(a), axis=1)],
                       lambda a: _transpose(np.split(a[0], 3, axis=1)))


def _fused_neox_qkv(model: ModelParams, hf: str, path: str, kind: str) -> TensorGroup:
    """NeoX query_key_value: weight [3D, D] / bias [3D] with rows ordered [heads, (q|k|v), head_dim]."""
    h, hd, d = model.num_heads, model.head_dim, model.hidden_size
    per_head = (h, 3, hd) if kind == "bias" else (h, 3, hd, d)

    def to_ours(arrays: Arrays) -> Arrays:
        split = arrays[0].reshape(per_head)
        parts = [split[:, j].reshape((d,) + per_head[3:]) for j in range(3)]  # q, k, v: [D(out), ...]
        parts = parts if kind == "bias" else _transpose(parts)              # kernels -> [D(in), D(out)]
        return [np.concatenate(parts, axis=-1)] if model.fused_qkv else parts

    def to_hf(arrays: Arrays) -> Arrays:
        parts = np.split(arrays[0], 3, axis=-1) if model.fused_qkv else arrays
        parts = parts if kind == "bias" else _transpose(parts)              # [D(out), D(in)]
        stacked = np.stack([p.reshape(per_head[:1] + per_head[2:]) for p in parts], axis=1)
        return [stacked.reshape((3 * d,) + per_head[3:])]

    suffix = "weight" if kind == "kernel" else "bias"
    shape = (3 * d,) + per_head[3:]
    return TensorGroup((f"{hf}.query_key_value.{suffix}",), (shape,), _qkv_paths(model, path, kind),
                       to_ours, to_hf)


def tensor_groups(model: ModelParams, hf_vocab_size: int | None = None) -> list[TensorGroup]:
    """Every HF tensor of a GPT-J / GPT-NeoX checkpoint with these params, mapped to ours.
    `hf_vocab_size`: the checkpoint's vocabulary rows when ours is padded beyond it."""
    hf_vocab = hf_vocab_size or model.vocab_size
    d, f = model.hidden_size, model.filter_size
    groups: list[TensorGroup] = []
    if model_type_of(model) == "gptj":
        groups += _vocab_groups("transformer.wte.weight", "lm_head", True, model, hf_vocab)
        groups += _layer_norm("transformer.ln_f", "ln_f", d)
        for i in range(model.num_hidden_layers):
            hf, ours = f"transformer.h.{i}", f"blocks/{i}"
            groups += _layer_norm(f"{hf}.ln_1", f"{ours}/ln_1", d)
            groups.append(_separate_qkv_kernels(model, f"{hf}.attn", f"{ours}/attn"))
            groups += _linear(f"{hf}.attn.out_proj", f"{ours}/attn/out_proj", d, d, bias=False)
            groups += _linear(f"{hf}.mlp.fc_in", f"{ours}/mlp/fc_in", d, f, bias=True)
            groups += _linear(f"{hf}.mlp.fc_out", f"{ours}/mlp/fc_out", f, d, bias=True)
        return groups
    groups += _vocab_groups("gpt_neox.embed_in.weight", "embed_out", False, model, hf_vocab)
    groups += _layer_norm("gpt_neox.final_layer_norm", "ln_f", d)
    bias = model.use_projection_bias_in_attention
    for i in range(model.num_hidden_layers):
        hf, ours = f"gpt_neox.layers.{i}", f"blocks/{i}"
        groups += _layer_norm(f"{hf}.input_layernorm", f"{ours}/ln_1", d)
        groups += _layer_norm(f"{hf}.post_attention_layernorm", f"{ours}/ln_2", d)
        groups.append(_fused_neox_qkv(model, f"{hf}.attention", f"{ours}/attn", "kernel"))
        if bias:
            groups.append(_fused_neox_qkv(model, f"{hf}.attention", f"{ours}/attn", "bias"))
        groups += _linear(f"{hf}.attention.dense", f"{ours}/attn/out_proj", d, d, bias=bias)
        groups += _linear(f"{hf}.mlp.dense_h_to_4h", f"{ours}/mlp/fc_in", d, f, bias=True)
        groups += _linear(f"{hf}.mlp.dense_4h_to_h", f"{ours}/mlp/fc_out", f, d, bias=True)
    return groups
