"""Model FLOPs per trained token from the model's shapes alone: plain arithmetic, free of
TensorFlow, so run planning (bench.plan) reads it without loading TF. runtime/flops.py measures
utilisation against it."""
from __future__ import annotations

import math

from config.lora import adapter_parameters
from config.params import ModelParams
from layers.weight_specs import weight_shapes


def matmul_parameters(model: ModelParams) -> int:
    """Parameters that enter a matmul: every kernel, plus the token table when the LM head is
    tied to it (the embedding lookup itself is a gather, not a matmul)."""
    shapes = weight_shapes(model)
    count = sum(math.prod(s) for p, s in shapes.items() if len(s) == 2 and p != "embedding/embeddings")
    if model.share_embedding_weights:
        count += model.vocab_size * model.hidden_size
    return count


def training_flops_per_token(model: ModelParams, sequence_length: int) -> float:
    """6 x (parameters used in matmuls) + 12 x layers x hidden x sequence (attention scores and
    context), the usual forward+backward estimate. The embedding lookup is not a matmul.

    With model.lora (frozen base): 4 x base matmul parameters (forward, and the activations'
    gradients; no gradient of a base weight) + 6 x adapter parameters (theirs are trained) + the
    same 12 x layers x hidden x sequence of attention, whose inputs all need gradients. A block
    recomputed in the backward pass (runconfig.recompute_activations) runs its forward twice;
    the second run is not counted: model FLOPs, as MFU counts them, are the ones the math needs."""
    attention = 12.0 * model.num_hidden_layers * model.hidden_size * sequence_length
    if model.lora is not None:
        return 4.0 * matmul_parameters(model) + 6.0 * adapter_parameters(model) + attention
    return 6.0 * matmul_parameters(model) + attention
