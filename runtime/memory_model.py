"""The memory model: bytes of weights, gradients, optimizer state, activations and key/value
caches from the model's shapes. Plain arithmetic, free of TensorFlow, so the CLIs can size a
command before they import it. Two readers:

  bench.plan (bench/sizing.py)   bytes per device for each training layout, on a GPU or TPU
  the preflight                  the peak resident memory of one process of this project on
                                 the machine it runs on (`*_estimate`, runtime/preflight.py)

What a training device keeps, per parameter (P) and per trained token:

  weights     float32 variables, 4 B/param (the master weights under mixed precision), plus
              under mixed precision the 16-bit copies of the matmul kernels that the step casts
              and keeps for the backward pass (2 B per matmul parameter)
  gradients   4 B/param: gradients of float32 variables are float32 in this project; twice
              that with gradient accumulation (the running sum and a micro-batch's gradients)
  optimizer   4 B/param per slot: AdamW/Adam two moments, SGD with momentum one, plain SGD none
  activations what the backward pass reads, per layer per token (`layer_activation_items`)

Tensor parallelism of degree M splits what Megatron-LM splits (`tensor_split_axis`):
column-parallel q/k/v and fc_in (kernel and bias), row-parallel out_proj and fc_out (kernel
only: their biases are added after the all-reduce, so every rank keeps them), and the
vocabulary of the token table and the LM head. LayerNorms are replicated.

Weight streaming keeps what runtime/weight_streaming.py keeps: on the device, the float32
weights of at most prefetch + 1 pieces (embedding, one block each, the head), the running
piece's 16-bit copy and gradients, the block-boundary activations and one block's full
activations while it is recomputed; on the host (or on disk with `host_store: disk`), every
variable, one parameter-sized gradient buffer and the optimizer slots.

For generation: the bytes of the weight formats, the key/value cache and a prefill's tensors.
What one process of this runtime holds at its peak around these terms (TensorFlow itself, a
checkpoint restore's copy, compiled workspaces) is runtime/peak_memory.py's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from config.params import ModelParams, OptimizerParams
from layers.weight_specs import WeightSpec, weight_specs

FLOAT32 = 4
COMPUTE_BYTES = {"fp32": 4, "mixed": 2}           # bfloat16 and float16 are both 2 bytes

# Megatron-LM's split of each weight, by the last two parts of its path: the axis divided by M.
_COLUMN = {"kernel": 1, "bias": 0}                # output features split: q/k/v, fc_in, LM head (vocab)
_ROW = {"kernel": 0}                              # input features split; the bias stays whole
_SPLITS = {"q_proj": _COLUMN, "k_proj": _COLUMN, "v_proj": _COLUMN, "qkv_proj": _COLUMN,
           "fc_in": _COLUMN, "lm_head": _COLUMN, "out_proj": _ROW, "fc_out": _ROW,
           "embedding": {"embeddings": 0}}        # token table [V, D]: vocabulary split


def tensor_split_axis(path: str) -> int | None:
    """The axis of weight `path` that tensor parallelism divides, None where it is replicated."""
    if path == "lm_head_bias":                    # tied head's bias: vocabulary split with the table
        return 0
    parts = path.split("/")
    if len(parts) < 2:
        return None
    return _SPLITS.get(parts[-2], {}).get(parts[-1])


def elements_per_device(spec: WeightSpec, tensor_parallel: int) -> int:
    """Elements of one weight on one of M tensor-parallel ranks (a split axis rounded up, as a
    padded vocabulary is)."""
    axis = tensor_split_axis(spec.path)
    if axis is None or tensor_parallel == 1:
        return math.prod(spec.shape)
    shape = list(spec.shape)
    shape[axis] = -(-shape[axis] // tensor_parallel)
    return math.prod(shape)


def is_matmul_weight(spec: WeightSpec, model: ModelParams) -> bool:
    """Kernels, and the token table when the head is tied to it: the weights a 16-bit step casts."""
    if spec.path == "embedding/embeddings":
        return model.share_embedding_weights
    return len(spec.shape) == 2


def parameter_count(model: ModelParams) -> int:
    return sum(math.prod(spec.shape) for spec in weight_specs(model))


def optimizer_slots(optimizer: OptimizerParams) -> int:
    if optimizer.optimizer_type in ("adam", "adamw"):
        return 2
    return 1 if optimizer.momentum > 0 else 0


@dataclass(frozen=True)
class StateBytes:
    """Bytes of the model state on one device (or host)."""
    weights: float
    gradients: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer


def replicated_state(model: ModelParams, optimizer: OptimizerParams, precision: str,
                     tensor_parallel: int = 1, accumulating: bool = False) -> StateBytes:
    """Weights, gradients and optimizer state on each device of a (data x tensor M) layout. With
    gradient accumulation the step holds the running sum and one micro-batch's fresh gradients
    (runtime/standard.py adds them after `tape.gradient` returns): two gradient buffers."""
    params = matmul = 0
    for spec in weight_specs(model):
        count = elements_per_device(spec, tensor_parallel)
        params += count
        matmul += count if is_matmul_weight(spec, model) else 0
    copy = COMPUTE_BYTES[precision] * matmul if precision == "mixed" else 0
    gradients = FLOAT32 * params * (2 if accumulating else 1)
    return StateBytes(FLOAT32 * params + copy, gradients, FLOAT32 * optimizer_slots(optimizer) * params)


def streaming_pieces(model: ModelParams) -> list[list[WeightSpec]]:
    """The pieces weight streaming copies one at a time, in forward order: embedding, each
    block, the head (runtime/weight_streaming.split_pieces; a tied head streams the table)."""
    embedding, head = [], []
    blocks: list[list[WeightSpec]] = [[] for _ in range(model.num_hidden_layers)]
    for spec in weight_specs(model):
        top, _, rest = spec.path.partition("/")
        if top == "blocks":
            blocks[int(rest.split("/")[0])].append(spec)
        else:
            (embedding if top == "embedding" else head).append(spec)
    return [embedding] + blocks + [head + (embedding if model.share_embedding_weights else [])]


def streaming_device_state(model: ModelParams, precision: str, prefetch_blocks: int) -> StateBytes:
    """On the compute device: the float32 weights of the largest run of prefetch + 1 consecutive
    pieces, the running piece's 16-bit copy and its gradients; no optimizer state."""
    pieces = streaming_pieces(model)
    sizes = [sum(math.prod(s.shape) for s in piece) for piece in pieces]
    matmul = max(sum(math.prod(s.shape) for s in piece if is_matmul_weight(s, model)) for piece in pieces)
    window = min(prefetch_blocks + 1, len(sizes))
    resident = max(sum(sizes[i:i + window]) for i in range(len(sizes) - window + 1))
    copy = COMPUTE_BYTES[precision] * matmul if precision == "mixed" else 0
    return StateBytes(FLOAT32 * resident + copy, FLOAT32 * max(sizes), 0)


def host_state(model: ModelParams, optimizer: OptimizerParams) -> StateBytes:
    """What weight streaming keeps on the host (or on disk): every float32 variable, one
    parameter-sized gradient buffer (clipping needs all gradients first), the optimizer slots."""
    params = parameter_count(model)
    return StateBytes(FLOAT32 * params, FLOAT32 * params, FLOAT32 * optimizer_slots(optimizer) * params)


# ---- activations ----------------------------------------------------------------------------

def layer_activation_items(model: ModelParams, precision: str, sequence_length: int,
                           tensor_parallel: int = 1) -> dict[str, float]:
    """Bytes per token that one decoder block keeps for its backward pass, by tensor, on one of
    M tensor-parallel ranks. This is Korthikanti et al. 2022 ("Reducing Activation Recomputation
    in Large Transformer Models", sec. 4.1: 34sbh + 5as^2b bytes per layer in 16-bit) redone for
    this project's block (layers/decoder_block.py, attention.py, mlp.py, layer_norm.py):

    - LayerNorm runs in float32: its backward reads its input as float32 (4 B x D). A parallel
      block's LayerNorms all read the same x, so it is kept once; a sequential block has two.
    - The LayerNorm output (compute dtype, c B x D) is the input of q/k/v and, in GPT-J's
      parallel block, of fc_in too: one tensor, not the paper's two. NeoX's untied LayerNorms
      (or a sequential block) give the MLP its own input: one more c x D.
    - q and k are cast to float32 for the scores (4 B x D each); v (c x D) and the attention
      context, out_proj's input (c x D), in the compute dtype.
    - Scores' softmax in float32 (4 B x h x s per token), and, under mixed precision, the 16-bit
      probabilities the value product reads (c x h x s); in fp32 they are the same tensor.
      With attention dropout, its mask (1 B x h x s) and the dropped probabilities replace the
      16-bit probabilities (c x h x s).
    - MLP: fc_in's output (the GELU input) and the GELU output (fc_out's input), c x F each.
      Counted as a fused GELU keeps them (only its input): TensorFlow's unfused tanh GELU may
      keep a few more F-wide temporaries unless XLA fuses it.
    - Residual dropout, when on, keeps a 1-byte mask of D per dropped output (attention, MLP).

    Under tensor parallelism (no sequence parallelism) the LayerNorm input and output are
    replicated on every rank; everything inside attention and the MLP is split by M (heads and
    F are). The paper's 10sbh + 24sbh/t split has the same shape.
    """
    c = COMPUTE_BYTES[precision]
    d, f, m = model.hidden_size, model.filter_size, tensor_parallel
    heads_s = model.num_heads * sequence_length / m                  # score entries per token per rank
    sequential = not model.use_parallel_residual
    items = {
        "layernorm inputs (float32)": FLOAT32 * d * (2 if sequential else 1),
        "layernorm outputs": c * d * (2 if (sequential or model.use_untied_layer_norm) else 1),
        "q and k (float32)": 2 * FLOAT32 * d / m,
        "v": c * d / m,
        "attention context": c * d / m,
        "softmax output (float32)": FLOAT32 * heads_s,
        "fc_in output (GELU input)": c * f / m,
        "GELU output": c * f / m,
    }
    if precision == "mixed" or model.attention_dropout_rate > 0:
        items["16-bit or dropped probabilities"] = c * heads_s
    if model.attention_dropout_rate > 0:
        items["attention dropout mask"] = 1 * heads_s
    if model.residual_dropout_rate > 0:
        items["residual dropout masks"] = 2 * d
    return items


def head_activation_bytes(model: ModelParams, precision: str, tensor_parallel: int = 1) -> float:
    """Per token, the LM head: ln_f input (float32) and output, the float32 logits and the
    cross-entropy's saved gradient (both vocabulary-split under tensor parallelism)."""
    vocab = -(-model.vocab_size // tensor_parallel)
    return FLOAT32 * model.hidden_size + COMPUTE_BYTES[precision] * model.hidden_size + 2 * FLOAT32 * vocab


def activation_bytes(model: ModelParams, precision: str, sequence_length: int, tokens: int,
                     tensor_parallel: int = 1, recompute: bool = False) -> float:
    """Activations on one device for one micro-batch of `tokens` tokens. Without recomputation
    every block keeps its items; with it (and always under weight streaming) only each block's
    input is kept (compute dtype, c x D, replicated under tensor parallelism) and one block's
    items exist at a time, while it is recomputed."""
    layer = sum(layer_activation_items(model, precision, sequence_length, tensor_parallel).values())
    head = head_activation_bytes(model, precision, tensor_parallel)
    layers = model.num_hidden_layers
    if recompute:
        kept = layers * COMPUTE_BYTES[precision] * model.hidden_size + layer
    else:
        kept = layers * layer
    return tokens * (kept + head)


def precision_of(model: ModelParams) -> str:
    return "mixed" if model.mixed_precision else "fp32"


# ---- generation: weight formats, key/value cache, prefill ------------------------------------

WEIGHT_FORMATS = ("float32", "bfloat16", "int8")     # generation/weights.py



def is_packed_kernel(spec: WeightSpec) -> bool:
    """generation/weights.pack_weights packs every rank-2 `kernel` (the LM head's too); token
    tables, LayerNorms and biases stay float32."""
    return spec.path.endswith("/kernel") and len(spec.shape) == 2


def format_weight_bytes(model: ModelParams, weight_format: str) -> float:
    """Bytes of the weights in a generation format: float32 4 B each; bfloat16 kernels 2 B; int8
    kernels 1 B plus a float32 scale per output channel; the bfloat16 format's embedding table
    2 B (generation.weights.bfloat16_table); everything else float32."""
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight format {weight_format!r} is not one of {', '.join(WEIGHT_FORMATS)}")
    total = 0
    for spec in weight_specs(model):
        count = math.prod(spec.shape)
        if weight_format == "bfloat16" and spec.path == "embedding/embeddings":
            total += 2 * count
        elif weight_format == "float32" or not is_packed_kernel(spec):
            total += FLOAT32 * count
        else:
            total += (2 * count) if weight_format == "bfloat16" else (count + FLOAT32 * spec.shape[1])
    return total


def packed_kernel_parameters(model: ModelParams) -> int:
    return sum(math.prod(s.shape) for s in weight_specs(model) if is_packed_kernel(s))


def cache_dtype_bytes(model: ModelParams, weight_format: str) -> int:
    """The key/value cache is in the compute dtype: bfloat16 for the bfloat16 format or a
    mixed-precision model, else float32 (model.GPTJModel.empty_cache)."""
    return 2 if weight_format == "bfloat16" or model.mixed_precision else FLOAT32


def kv_cache_bytes(model: ModelParams, rows: int, cache_length: int, dtype_bytes: int) -> float:
    """rows x cache length x blocks x (keys, values) x hidden x dtype bytes: per block two
    [rows, heads, L, head_dim] tensors."""
    return rows * cache_length * model.num_hidden_layers * 2 * model.hidden_size * dtype_bytes


def prefill_bytes(model: ModelParams, rows: int, prompt_slots: int, cache_length: int, compute_bytes: int) -> float:
    """The largest live set of a prefill, one block at a time: the attention scores in float32
    ([rows, heads, P, L]; XLA fuses mask, softmax and their copies into it), fc_in's output
    ([rows, P, F], the GELU fused into it), the block's input, output and q/k/v ([rows, P, D]),
    and the logits of the last position ([rows, V] float32, twice for the processors' copies).
    Measured: 8 prompts of 500 tokens (d 1024, 6 blocks) grew a float32 decode by 549 MiB more
    than one short prompt, against 592 MiB counted here with the cache."""
    tokens = rows * prompt_slots
    scores = FLOAT32 * tokens * model.num_heads * cache_length
    mlp = compute_bytes * tokens * model.filter_size
    hidden = (2 * FLOAT32 + 3 * compute_bytes) * tokens * model.hidden_size
    return scores + mlp + hidden + 2 * FLOAT32 * rows * model.vocab_size


def loading_transient(model: ModelParams, weight_format: str) -> int:
    """A tensor-by-tensor loader's largest transient: one tensor read in float32 plus its packed
    copy (a kernel in a packed format), or the float32 read of a tensor kept in float32."""
    def transient(spec: WeightSpec) -> int:
        count = math.prod(spec.shape)
        if weight_format == "float32" or not is_packed_kernel(spec):
            return FLOAT32 * count
        return FLOAT32 * count + (2 * count if weight_format == "bfloat16" else count + FLOAT32 * spec.shape[1])
    return max(transient(spec) for spec in weight_specs(model))
