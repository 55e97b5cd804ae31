"""Sizing a training run from the model's shapes: bytes per device for each layout and the
step time an assumed MFU gives. Plain arithmetic (no TensorFlow); bench/plan.py prints it.

What each layout keeps on a device, per parameter (P) and per trained token:

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
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from config.params import ModelParams, OptimizerParams
from layers.weight_specs import WeightSpec, weight_specs
from runtime.model_flops import training_flops_per_token

FLOAT32 = 4
COMPUTE_BYTES = {"fp32": 4, "mixed": 2}           # bfloat16 and float16 are both 2 bytes
RECOMPUTE_FACTOR = 4.0 / 3.0                      # forward is 2N + attention of 6N + attention: a third

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


# ---- layouts --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    data: int
    tensor: int = 1
    streaming: bool = False

    @property
    def devices(self) -> int:
        return self.data * self.tensor

    @property
    def name(self) -> str:
        if self.streaming:
            return "streaming" + (f" x data {self.data}" if self.data > 1 else "")
        if self.tensor == 1:
            return f"data {self.data}"
        return f"tensor {self.tensor}" if self.data == 1 else f"data {self.data} x tensor {self.tensor}"


@dataclass(frozen=True)
class Hardware:
    device_memory: float            # bytes per device
    peak_flops: float | None        # FLOP/s per device at the run's precision, None: no step time
    host_memory: float | None       # bytes on the host (weight streaming's state), None: unchecked
    host_link: float | None         # bytes/s host <-> device, per direction, None: unknown
    host_bandwidth: float           # bytes/s of host memory (the streaming optimizer update)
    disk_bandwidth: float           # bytes/s of the disk store


@dataclass(frozen=True)
class Run:
    model: ModelParams
    optimizer: OptimizerParams
    precision: str                  # "fp32" | "mixed"
    global_batch: int               # sequences per step
    sequence_length: int
    micro_batch: int | None         # sequences per replica per micro-step; None: from grad_accum
    grad_accum: int | None
    recompute: bool
    mfu: float
    host_store: str                 # "memory" | "disk"
    prefetch_blocks: int


@dataclass(frozen=True)
class Plan:
    layout: Layout
    micro_batch: int
    grad_accum: int
    state: StateBytes               # per device
    activations: float              # per device
    host: StateBytes | None         # weight streaming only
    step_seconds: float | None      # None without a peak
    tokens_per_second: float | None
    mfu: float | None               # achieved: model FLOPs (no recompute) over the layout's peak
    notes: tuple[str, ...]

    @property
    def device_total(self) -> float:
        return self.state.total + self.activations


def batch_split(run: Run, data: int) -> tuple[int, int, tuple[str, ...]]:
    """(micro-batch, accumulation steps, notes) of one data-parallel replica."""
    per_replica = run.global_batch / data
    if run.micro_batch is not None:
        micro, accum = run.micro_batch, math.ceil(per_replica / run.micro_batch)
    else:
        accum = run.grad_accum or 1
        micro = max(1, math.ceil(per_replica / accum))
    notes = ()
    if micro * accum * data != run.global_batch:
        notes = (f"batch {run.global_batch} does not split into {data} x {micro} x {accum}: "
                 f"sized for {micro * accum * data}",)
    return micro, accum, notes


def plan_layout(run: Run, hardware: Hardware, layout: Layout) -> Plan:
    micro, accum, notes = batch_split(run, layout.data)
    model, seq = run.model, run.sequence_length
    recompute = run.recompute or layout.streaming
    activations = activation_bytes(model, run.precision, seq, micro * seq, layout.tensor, recompute)
    host = None
    if layout.streaming:
        state = streaming_device_state(model, run.precision, run.prefetch_blocks)
        host = host_state(model, run.optimizer)
    else:
        state = replicated_state(model, run.optimizer, run.precision, layout.tensor, accum > 1)
    if hardware.peak_flops is None:
        return Plan(layout, micro, accum, state, activations, host, None, None, None, notes)
    tokens = micro * accum * layout.data * seq
    if layout.streaming:
        step, more = streaming_step_seconds(run, hardware, host, layout, micro, accum)
        notes += more
    else:
        step = compute_seconds(run, hardware, tokens / layout.devices, recompute)
    achieved = tokens * training_flops_per_token(model, seq) / (step * hardware.peak_flops * layout.devices)
    return Plan(layout, micro, accum, state, activations, host, step, tokens / step, achieved, notes)


def compute_seconds(run: Run, hardware: Hardware, tokens: float, recompute: bool) -> float:
    """Time for one device to train `tokens` tokens at the assumed MFU. The MFU is taken as the
    rate of useful FLOPs a step without recomputation reaches; a recomputed forward is one more
    third of the work at that rate (so the achieved MFU is 3/4 of it)."""
    work = tokens * training_flops_per_token(run.model, run.sequence_length)
    return work * (RECOMPUTE_FACTOR if recompute else 1.0) / (hardware.peak_flops * run.mfu)


def streaming_step_seconds(run: Run, hardware: Hardware, host: StateBytes, layout: Layout, micro: int,
                           accum: int) -> tuple[float, tuple[str, ...]]:
    """Each micro-step copies every float32 weight to the device twice (forward, recompute) and
    its gradients back, at the host link's rate or the replicas' share of host memory bandwidth,
    whichever is lower; with prefetch the copies overlap the compute, without it they add. Then
    the update runs on the host: AdamW reads weights, gradients and both moments and writes three
    of them back (7 x 4 B/param of memory traffic); the disk store moves about 11 x the parameter
    bytes per step (docs/runtime.md), counted as not overlapped."""
    compute = compute_seconds(run, hardware, micro * run.sequence_length, recompute=True)
    notes = []
    share = hardware.host_bandwidth / layout.data
    if hardware.host_link is None:
        copy = 0.0
        notes.append("no host link bandwidth for this device (--host-link-gbps): copies not counted")
    else:
        copy = 2 * host.weights / min(hardware.host_link, share)
        if copy > compute:
            bound = "host link" if hardware.host_link <= share else f"host memory shared by {layout.data} streams"
            notes.append(f"{bound} bound: copies {copy:.3g} s vs compute {compute:.3g} s per micro-step")
    micro_step = max(compute, copy) if run.prefetch_blocks > 0 else compute + copy
    if run.host_store == "disk":
        update = 11 * host.weights / hardware.disk_bandwidth
    else:
        update = (3 + 2 * optimizer_slots(run.optimizer)) * host.weights / hardware.host_bandwidth
    return accum * micro_step + update, tuple(notes)


def fits(used: float, available: float | None) -> str:
    """yes below 90% (room for workspaces, fragmentation), tight up to 100%, else no."""
    if available is None:
        return "not checked"
    if used <= 0.9 * available:
        return "yes"
    return "tight" if used <= available else "no"
