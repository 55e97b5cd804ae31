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

One process's peak (the preflight) adds what this runtime does around those terms on the host,
each argued where it is defined below: TensorFlow's own memory, the checkpoint restore's copy,
the gradient copies of the update, the generation weight formats, the key/value cache and
the buffers of a compiled decode step.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

from config.params import ModelParams, OptimizerParams, Params
from layers.weight_specs import WeightSpec, weight_specs

FLOAT32 = 4
COMPUTE_BYTES = {"fp32": 4, "mixed": 2}           # bfloat16 and float16 are both 2 bytes
MiB = 1 << 20

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


# ---- one process's peak on this machine: what the preflight compares ------------------------
#
# Measured on the project's CPU machines (TF 2.21, x86-64), by peak RSS (VmHWM) between phases
# of a process (docs/runtime.md has the table; tests/test_preflight.py keeps whole commands'
# estimates within a stated margin of their measured peaks). RSS grows when the live set
# outgrows what the allocator already holds. Memory freed while loading stays with the process,
# and the compiled steps that follow do not reuse it (measured for a restore's copy before a
# decode and before a training step; presumably glibc's per-thread arenas: the restore runs on
# the caller's thread, compiled steps on TensorFlow's): such memory is a term of the peak
# ("freed, held by the allocator"). Where phases reuse each other's memory (training, then
# evaluating), the estimate is the largest phase's total.

TENSORFLOW_RUNTIME = 560 * MiB
"""Python, TensorFlow and this project's modules after import and a first op: 553-566 MiB of
RSS measured (TF 2.21 CPU wheel: its shared libraries, oneDNN, the op registry). It does not
grow with the model; compiling a step adds the workspaces below."""

STEP_WORKSPACE = (280 * MiB, 28 * MiB)
"""(fixed, per decoder block) bytes a compiled training step adds beside its tensors: the traced
graph and its optimised copies (grappler, XLA's HLO and LLVM), XLA:CPU's compiler, tf.data's
buffers. Fitted to the step's measured growth after weights, gradients, optimizer update and
activations are counted: 380 MiB with 4 blocks, 380-450 with 6, 610 with 12."""

INFERENCE_WORKSPACE = (150 * MiB, 16 * MiB)
"""(fixed, per decoder block) bytes a compiled forward pass or decode loop adds beside weights,
cache and activations: measured 164-193 MiB with 3-6 blocks and 260 MiB with 12 (a float32
decode of one 8-token prompt, XLA), i.e. the compiled prefill and decode programs and their
small buffers (logits [b, V]); evaluation's compiled forward step likewise."""

# How a command's weights reach memory: `restore` builds the float32 model and restores it with
# tf.train.Checkpoint, which reads every tensor of the checkpoint before it assigns any (a second
# float32 copy of the model at the restore: measured +563 MiB for 640 MiB of weights), then packs
# the generation formats from it, the float32 model staying alive. `direct` builds each weight
# straight in its format, tensor by tensor, so the largest transient is one float32 tensor and
# its packed copy.
LOADERS = ("restore", "direct")
WEIGHT_FORMATS = ("float32", "bfloat16", "int8")


@dataclass(frozen=True)
class Estimate:
    """A command's peak memory: the terms resident at its peak, and changes that lower it.

    fixes: (change, the peak with it) pairs, e.g. ("--weight-format int8", 8.1e9), in order of
    preference per flag; the refusal suggests the first one per flag that fits. plan: where to
    size further (bench.plan)."""
    command: str
    terms: tuple[tuple[str, float], ...]
    fixes: tuple[tuple[str, float], ...] = ()
    plan: str | None = None

    @property
    def total(self) -> float:
        return sum(size for _, size in self.terms)


def peak_terms(phases: dict[str, dict[str, float]]) -> tuple[tuple[str, float], ...]:
    """The terms of the largest phase, with TensorFlow's own memory added."""
    largest = max(phases.values(), key=lambda terms: sum(terms.values()))
    kept = tuple((name, size) for name, size in largest.items() if size > 0)
    return kept + (("TensorFlow runtime", TENSORFLOW_RUNTIME),)


def workspace(kind: tuple[int, int], model: ModelParams) -> float:
    fixed, per_block = kind
    return fixed + per_block * model.num_hidden_layers


# ---- generation: predict, serving, export, summarization evaluation, MLPerf ------------------

def is_packed_kernel(spec: WeightSpec) -> bool:
    """generation/weights.pack_weights packs every rank-2 `kernel` (the LM head's too); token
    tables, LayerNorms and biases stay float32."""
    return spec.path.endswith("/kernel") and len(spec.shape) == 2


def format_weight_bytes(model: ModelParams, weight_format: str) -> float:
    """Bytes of the weights in a generation format: float32 4 B each; bfloat16 kernels 2 B; int8
    kernels 1 B plus a float32 scale per output channel; everything else float32."""
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight format {weight_format!r} is not one of {', '.join(WEIGHT_FORMATS)}")
    total = 0
    for spec in weight_specs(model):
        count = math.prod(spec.shape)
        if weight_format == "float32" or not is_packed_kernel(spec):
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


@dataclass(frozen=True)
class Decoding:
    """The caches a generating command decodes with.

    rows x cache_length: cache rows of `generation.Generator` calls (prompts x beams or
    samples); a compiled decode call takes the cache in and returns a new one (no buffer
    donation from Python), so both are alive until it returns: counted twice.
    prefill_rows x prompt_slots: rows prefilled in one call (beams expand after the prefill).
    slot_rows: the serving scheduler's slots (serving/slots.py), whose cache lives in variables
    a compiled call updates in place: counted once (measured: 8 slots of a 384 MiB cache grew
    the decoding process by 336 MiB more than one slot did)."""
    rows: int
    cache_length: int
    prompt_slots: int
    prefill_rows: int
    slot_rows: int = 0


def generation_phases(model: ModelParams, weight_format: str, decoding: Decoding, compile_mode: str = "xla",
                      loader: str = "restore") -> dict[str, dict[str, float]]:
    """What a generating process holds at its peak, while it decodes, by term:

    - the weights (`format_weight_bytes`); with the `restore` loader also the float32 model
      the packed formats were made from;
    - what loading freed but the process still holds (see the note above `TENSORFLOW_RUNTIME`):
      with `restore`, the checkpoint's copy of the model, or, where packing reuses that memory
      (it runs on the same thread), the packed weights and the float32 temporaries of packing
      the largest kernel (`generation.weights.pack_kernel`: bfloat16 casts its transpose, one
      tensor; `quantize_int8` holds the transpose with the scaled copy, then that with the
      rounded one, two); with `direct`, one tensor and its packed copy. Measured: a
      float32 predict decoded 200 MiB above the restore's peak rather than within the 352 MiB
      the restore had freed;
    - the key/value caches (`Decoding`) and the prefill's largest live set (`prefill_bytes`);
    - XLA:CPU decoding bfloat16 or int8 kernels converts them to float32 buffers inside the
      compiled loop (its dots run in float32): measured 0.76-0.96 x the kernels' float32
      bytes over three model shapes, so counted as all of them; graph mode (`compile_mode`
      graph) converts one kernel at a time;
    - the compiled prefill and decode programs (`INFERENCE_WORKSPACE`).
    """
    if loader not in LOADERS:
        raise ValueError(f"loader {loader!r} is not one of {', '.join(LOADERS)}")
    float32 = format_weight_bytes(model, "float32")
    packed = format_weight_bytes(model, weight_format)
    packs = weight_format != "float32"
    if loader == "restore":
        terms = {"float32 weights": float32, **({f"{weight_format} weights": packed} if packs else {})}
        kernel = max(FLOAT32 * math.prod(s.shape) for s in weight_specs(model) if is_packed_kernel(s))
        packing = {"float32": 0, "bfloat16": kernel, "int8": 2 * kernel}[weight_format]
        terms["checkpoint restore copy (freed, held by the allocator)"] = max(float32 - (packed if packs else 0),
                                                                              packing)
    else:
        terms = {f"{weight_format} weights": packed,
                 "one tensor loading (freed, held by the allocator)": loading_transient(model, weight_format)}
    compute = cache_dtype_bytes(model, weight_format)
    d = decoding
    terms["KV cache"] = (2 * kv_cache_bytes(model, d.rows, d.cache_length, compute)
                         + kv_cache_bytes(model, d.slot_rows, d.cache_length, compute))
    terms["prefill activations"] = prefill_bytes(model, d.prefill_rows, d.prompt_slots, d.cache_length, compute)
    if packs and compile_mode == "xla":
        terms["kernels converted to float32 by XLA"] = FLOAT32 * packed_kernel_parameters(model)
    terms["compiled decode"] = workspace(INFERENCE_WORKSPACE, model)
    return {"decoding": terms}


def generation_terms(model: ModelParams, weight_format: str, decoding: Decoding, compile_mode: str = "xla",
                     loader: str = "restore") -> tuple[tuple[str, float], ...]:
    return peak_terms(generation_phases(model, weight_format, decoding, compile_mode, loader))


def total_of(terms: tuple[tuple[str, float], ...]) -> float:
    return sum(size for _, size in terms)


def generation_estimate(command: str, model: ModelParams, weight_format: str, decoding: Callable[[int], Decoding],
                        slots: int = 1, compile_mode: str = "xla", *, loader: str = "restore",
                        format_flag: str | None = "--weight-format", compile_flag: str | None = None,
                        slots_flag: str | None = None) -> Estimate:
    """A generating command's estimate with `slots` requests decoded together (prompts of a
    batch, or serving slots); decoding(n) is its caches with n of them. Fixes, when they lower
    the peak: the other weight formats (`format_flag`; with graph mode too when `compile_flag`
    is given), graph mode for a packed format, and halving the requests (`slots_flag`)."""
    def terms(fmt=weight_format, mode=compile_mode, count=slots):
        return generation_terms(model, fmt, decoding(count), mode, loader)

    current = total_of(terms())
    fixes = []
    graph_too = compile_flag is not None and compile_mode == "xla"
    if format_flag:
        for fmt in ("bfloat16", "int8"):
            if fmt != weight_format:
                fixes.append((f"{format_flag} {fmt}", total_of(terms(fmt=fmt))))
                if graph_too:
                    fixes.append((f"{format_flag} {fmt} {compile_flag} graph", total_of(terms(fmt=fmt, mode="graph"))))
    if graph_too and weight_format != "float32":
        fixes.append((f"{compile_flag} graph", total_of(terms(mode="graph"))))
    if slots_flag:
        count = slots // 2
        while count >= 1:
            fixes.append((f"{slots_flag} {count}", total_of(terms(count=count))))
            count //= 2
    return Estimate(command, terms(), tuple(f for f in fixes if f[1] < current))


# ---- training and evaluation: run.py --mode train | eval | train_and_eval --------------------

def training_phases(params: Params, resuming: bool = False) -> dict[str, dict[str, float]]:
    """What a training process holds during a step (its peak: building the state holds less):

    standard execution (`replicated_state`, over every device of a `runconfig.mesh` in this
    process): float32 weights, the 16-bit copies under mixed precision, the optimizer slots;
    a step adds the gradients (twice with accumulation), the optimizer's new slot values
    before they replace the old ones (measured: Adam's step grows 2.2 x the weights more than
    plain SGD's), the activations of one micro-batch and the step's workspace. Resuming from
    model_dir (`resuming`), tf.train.Checkpoint reads weights and slots before assigning them,
    and the step does not reuse that freed copy (measured: a resumed run's peak was the fresh
    run's plus 1,071 MiB, for 1,056 MiB of weights and Adam slots).
    weight streaming (`memory`): the host keeps variables, one gradient buffer and the slots
    (`host_state`), the device pieces (`streaming_device_state`), recomputed activations.
    weight streaming (`disk`): parameters, gradients and slots on disk; in memory the pieces
    in flight, each with its gradient: prefetch + 1 on the device, the fused last block and
    head, one being read ahead and one waiting for the gradient writer."""
    model, optimizer, run = params.model, params.optimizer, params.runconfig
    train = params.train_input
    precision = precision_of(model)
    batch, seq = (train.batch_size, train.max_sequence_length) if train else (1, model.max_position_embeddings)
    micro_tokens = batch * seq // optimizer.grad_accum_steps
    compiled = workspace(STEP_WORKSPACE, model)
    if run.execution == "weight_streaming":
        store = run.weight_streaming
        activations = activation_bytes(model, precision, seq, micro_tokens, recompute=True)
        if store.host_store == "disk":
            piece = max(FLOAT32 * sum(math.prod(s.shape) for s in p) for p in streaming_pieces(model))
            in_flight = (store.prefetch_blocks + 1 + 3) * 2 * piece
            return {"step": {"pieces in flight with their gradients": in_flight, "activations": activations,
                             "compiled step": compiled}}
        host = host_state(model, optimizer)
        device = streaming_device_state(model, precision, store.prefetch_blocks)
        return {"step": {"float32 weights": host.weights, "gradients": host.gradients,
                         "optimizer slots": host.optimizer, "optimizer update (new slot values)": host.optimizer,
                         "device pieces": device.weights + device.gradients, "activations": activations,
                         "compiled step": compiled}}
    # A mesh's devices are all in this process (logical devices of one machine): each holds its
    # share (`replicated_state` of its tensor-parallel rank) and its data slice's activations.
    data, tensor = (run.mesh.data, run.mesh.model) if run.mesh is not None else (1, 1)
    devices = data * tensor
    state = replicated_state(model, optimizer, precision, tensor, accumulating=optimizer.grad_accum_steps > 1)
    weights = devices * FLOAT32 * sum(elements_per_device(s, tensor) for s in weight_specs(model))
    slots = devices * state.optimizer
    activations = devices * activation_bytes(model, precision, seq, micro_tokens // data, tensor)
    return {"step": {"float32 weights": weights, "16-bit weight copies": devices * state.weights - weights,
                     "optimizer slots": slots, "gradients": devices * state.gradients,
                     "optimizer update (new slot values)": slots, "activations": activations,
                     "checkpoint restore copy (freed, held by the allocator)": weights + slots if resuming else 0,
                     "compiled step": compiled}}


def evaluation_phases(params: Params) -> dict[str, dict[str, float]]:
    """Evaluation: the float32 weights and the checkpoint's copy the restore freed (see
    `generation_phases`), then the forward pass of one eval batch: one block's activations at a
    time, the float32 logits and the loss's copy of them, the compiled step's workspace."""
    model, run = params.model, params.runconfig
    batch, seq = ((params.eval_input.batch_size, params.eval_input.max_sequence_length) if params.eval_input
                  else (1, model.max_position_embeddings))
    weights = FLOAT32 * parameter_count(model)
    tokens = batch * seq
    precision = precision_of(model)
    forward = tokens * (sum(layer_activation_items(model, precision, seq).values()) + 2 * FLOAT32 * model.vocab_size)
    compiled = workspace(INFERENCE_WORKSPACE, model)
    if run.execution == "weight_streaming" and run.weight_streaming.host_store == "disk":
        pieces = streaming_device_state(model, precision, run.weight_streaming.prefetch_blocks).weights
        return {"forward": {"device pieces": pieces, "forward activations": forward, "compiled forward": compiled}}
    return {"forward": {"float32 weights": weights, "checkpoint restore copy (freed, held by the allocator)": weights,
                        "forward activations": forward, "compiled forward": compiled}}


def run_estimate(params: Params, mode: str, params_path: str, resuming: bool = False) -> Estimate:
    """run.py --mode train | eval | train_and_eval: the larger of training and evaluation (both
    run in one process for train_and_eval). Fixes, when they lower the peak: the disk store of
    weight streaming (training state on disk), gradient accumulation (smaller micro-batches, the
    same global batch), a smaller eval batch."""
    def terms_of(p: Params) -> tuple[tuple[str, float], ...]:
        phases = {}
        if mode in ("train", "train_and_eval"):
            phases.update(training_phases(p, resuming))
        if mode in ("eval", "train_and_eval"):
            phases.update({f"eval {k}": v for k, v in evaluation_phases(p).items()})
        return peak_terms(phases)

    terms = terms_of(params)
    current = total_of(terms)
    fixes = []
    run = params.runconfig
    if mode != "eval" and run.execution == "standard" and run.mesh is None:
        disk = replace_run(params, execution="weight_streaming", host_store="disk")
        fixes.append(("--execution weight_streaming --set runconfig.weight_streaming.host_store=disk",
                      total_of(terms_of(disk))))
    train, evaluation = params.train_input, params.eval_input
    if mode != "eval" and train is not None and run.mesh is None:
        accum = params.optimizer.grad_accum_steps * 2
        while accum <= train.batch_size:
            if train.batch_size % accum == 0:
                fixes.append((f"--set optimizer.grad_accum_steps={accum}",
                              total_of(terms_of(replace_run(params, grad_accum_steps=accum)))))
            accum *= 2
    if mode != "train" and evaluation is not None:
        batch = evaluation.batch_size // 2
        while batch >= 1:
            smaller = dataclasses.replace(params, eval_input=dataclasses.replace(evaluation, batch_size=batch))
            fixes.append((f"--set eval_input.batch_size={batch}", total_of(terms_of(smaller))))
            batch //= 2
    return Estimate(f"run.py --mode {mode}", terms, tuple(f for f in fixes if f[1] < current),
                    f"python -m bench.plan --params {params_path}")


def replace_run(params: Params, execution: str | None = None, host_store: str | None = None,
                grad_accum_steps: int | None = None) -> Params:
    """params with another execution, weight-streaming store or accumulation (what a fix changes)."""
    run, optimizer = params.runconfig, params.optimizer
    if execution is not None:
        streaming = dataclasses.replace(run.weight_streaming, host_store=host_store or run.weight_streaming.host_store)
        run = dataclasses.replace(run, execution=execution, weight_streaming=streaming)
    if grad_accum_steps is not None:
        optimizer = dataclasses.replace(optimizer, grad_accum_steps=grad_accum_steps)
    return dataclasses.replace(params, runconfig=run, optimizer=optimizer)
