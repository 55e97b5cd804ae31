"""One process's peak memory on this machine: what the memory preflight (runtime/preflight.py)
compares with the memory available, for every command that builds a model. The bytes of each
term come from runtime/memory_model.py (the arithmetic bench.plan sizes devices with); this
module adds what this runtime does around them on the host, measured: TensorFlow's own
memory, what loading frees but the process keeps, the optimizer's update, the caches and
buffers of compiled steps. Plain arithmetic, free of TensorFlow. docs/runtime.md (memory
preflight) has the measured-against-estimated table.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

from config.params import ModelParams, Params
from layers.packing import largest_block_bytes
from layers.weight_specs import weight_specs
from config.lora import adapter_parameters
from runtime.memory_model import (COMPUTE_BYTES, FLOAT32, activation_bytes, cache_dtype_bytes, elements_per_device,
                                  format_weight_bytes, host_state, is_packed_kernel, kv_cache_bytes,
                                  layer_activation_items, loading_transient, optimizer_slots,
                                  packed_kernel_parameters,
                                  parameter_count, precision_of, prefill_bytes, replicated_state,
                                  streaming_device_state, streaming_pieces)

MiB = 1 << 20

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

PREFILL_PROGRAM_PER_BLOCK = 11 * MiB
"""Bytes each further compiled prefill program (one per prompt length: the server's prompt
buckets) keeps per decoder block, XLA or graph mode: the compiled code of an unrolled model.
Measured: 6.9 MiB per block per bucket for d=1024, 8 blocks (XLA; graph mode 3.5), and 11.1
for GPT-J 6B in int8 (serving.server's warm-up of 16 buckets: 15.9 GB peak against 11.2 GB
with one bucket compiled)."""

# How a command's weights reach memory: `restore` builds the float32 model and restores it with
# tf.train.Checkpoint, which reads every tensor of the checkpoint before it assigns any (a second
# float32 copy of the model at the restore: measured +563 MiB for 640 MiB of weights), then packs
# the generation formats from it, the float32 model staying alive. `direct` builds each weight
# straight in its format, tensor by tensor, so the largest transient is one float32 tensor and
# its packed copy.
LOADERS = ("restore", "direct")


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

@dataclass(frozen=True)
class Decoding:
    """The caches a generating command decodes with.

    rows x cache_length: cache rows of `generation.Generator` calls (prompts x beams or
    samples); a compiled decode call takes the cache in and returns a new one (no buffer
    donation from Python), so both are alive until it returns: counted twice.
    prefill_rows x prompt_slots: rows prefilled in one call (beams expand after the prefill).
    slot_rows: the serving scheduler's slots (serving/slots.py), whose cache lives in variables
    a compiled call updates in place: counted once (measured: 8 slots of a 384 MiB cache grew
    the decoding process by 336 MiB more than one slot did).
    prefill_programs: compiled prefills the process keeps (the server's prompt buckets).
    reorders: the rows are beam search's, whose step gathers the beams' cache rows into a new
    cache inside the compiled loop (generation/beam_search.py): the call's input, the loop's
    cache and the gather's result are alive at once, three copies (measured at GPT-J-6B's shape,
    MLPerf's 4 beams: counting two left the int8 run's peak 1.4 GiB above the estimate)."""
    rows: int
    cache_length: int
    prompt_slots: int
    prefill_rows: int
    slot_rows: int = 0
    prefill_programs: int = 1
    reorders: bool = False

    @property
    def copies(self) -> int:
        """Copies of the rows' cache alive at once: the call's input and its loop's, and a beam
        step's gather."""
        return 3 if self.reorders else 2


def generation_peak(model: ModelParams, weight_format: str, decoding: Decoding, compile_mode: str = "xla",
                    loader: str = "restore") -> dict[str, float]:
    """What a generating process holds at its peak, while it decodes, by term (TensorFlow's own
    memory aside):

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
    - a compiled step converts a packed kernel a block of rows at a time (layers/packing.py),
      so the largest float32 block is live beside the weights (XLA, measured on GPT-J 6B
      in int8: the decode's peak 1.3 GiB above the loaded weights with the LM head whole,
      0.6 GiB with blocks); TensorFlow's graph executor (`compile_mode` graph) holds more:
      measured 0.64-0.90 x the packed kernels' bytes above XLA's peak (two shapes), so
      counted as all of them;
    - the compiled prefill and decode programs (`INFERENCE_WORKSPACE`), and further prefill
      programs (`PREFILL_PROGRAM_PER_BLOCK`).
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
    terms["KV cache"] = (d.copies * kv_cache_bytes(model, d.rows, d.cache_length, compute)
                         + kv_cache_bytes(model, d.slot_rows, d.cache_length, compute))
    terms["prefill activations"] = prefill_bytes(model, d.prefill_rows, d.prompt_slots, d.cache_length, compute)
    if packs:
        terms["a kernel block converted to float32"] = largest_block_bytes(
            (s.shape for s in weight_specs(model) if is_packed_kernel(s)))
        if compile_mode == "graph":
            terms["graph executor's kernel copies"] = ({"int8": 1, "bfloat16": 2}[weight_format]
                                                      * packed_kernel_parameters(model))
    terms["compiled decode"] = workspace(INFERENCE_WORKSPACE, model)
    if d.prefill_programs > 1:
        terms[f"{d.prefill_programs - 1} more compiled prefills"] = (
            (d.prefill_programs - 1) * PREFILL_PROGRAM_PER_BLOCK * model.num_hidden_layers)
    return terms


def generation_terms(model: ModelParams, weight_format: str, decoding: Decoding, compile_mode: str = "xla",
                     loader: str = "restore") -> tuple[tuple[str, float], ...]:
    return peak_terms({"decoding": generation_peak(model, weight_format, decoding, compile_mode, loader)})


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
    if model.lora is not None:
        return {"step": lora_step_terms(model, optimizer, precision, seq, micro_tokens, run.recompute_activations,
                                        compiled)}
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


def lora_step_terms(model: ModelParams, optimizer, precision: str, seq: int, tokens: int, recompute: bool,
                    compiled: float) -> dict[str, float]:
    """A LoRA step (runtime/lora.py): the frozen base in model.lora.base_dtype, the float32 adapters
    with their gradients, optimizer slots and new slot values, the activations (each block's input
    only with runconfig.recompute_activations), and the base kernels as the step computes with them,
    kept for the backward pass: a packed kernel's product reads a converted copy of it (layers/dense.py),
    which the matmul's gradient reads again, so all of them without recomputation; with it, one
    block's and the LM head's. A float32 base under float32 math needs no copy. As for generation,
    the allocator keeps the loader's largest transient (measured on GPT-J-6B's shape: 15.04 GiB at
    sequence 512 and 16.71 GiB at 2,048 for estimates of 15.5 and 17.0 GiB)."""
    lora = model.lora
    adapters = FLOAT32 * adapter_parameters(model)
    compute = COMPUTE_BYTES[precision]
    copies = 0.0
    if lora.base_dtype != "float32" or precision == "mixed":
        kernels = [s for s in weight_specs(model) if is_packed_kernel(s)]
        block = sum(math.prod(s.shape) for s in kernels if s.path.startswith("blocks/0/"))
        head = sum(math.prod(s.shape) for s in kernels if not s.path.startswith("blocks/"))
        copies = compute * (block + head if recompute else sum(math.prod(s.shape) for s in kernels))
    return {f"frozen base ({lora.base_dtype})": format_weight_bytes(model, lora.base_dtype),
            "adapters, gradients, optimizer slots and update": adapters * (2 + 2 * optimizer_slots(optimizer)),
            "base kernels as computed, kept for the backward pass": copies,
            "activations": activation_bytes(model, precision, seq, tokens, recompute=recompute),
            "one base tensor loading (freed, held by the allocator)": loading_transient(model, lora.base_dtype),
            "compiled step": compiled}


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
    if model.lora is not None:      # the frozen base as it is held; a restore reads the adapters only
        base = format_weight_bytes(model, model.lora.base_dtype)
        return {"forward": {f"frozen base ({model.lora.base_dtype})": base, "forward activations": forward,
                            "compiled forward": compiled}}
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
