"""bench.plan / bench.sizing: the bytes it sizes against independent counts (the built model's
variables and Keras's optimizer slots, transformers' parameter count, the tensors TensorFlow's
autodiff keeps for a block's backward pass) and its command line's bad input. All counts are
integers: the comparisons are exact."""
from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from bench import plan, sizing
from runtime import memory_model
from config.params import ModelParams, OptimizerParams, load_params
from layers.weight_specs import weight_specs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ModelParams(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=4, rotary_dim=4,
                   filter_size=128, max_position_embeddings=32)
NEOX_TINY = dataclasses.replace(TINY, rotary_style="neox", use_untied_layer_norm=True,
                                use_projection_bias_in_attention=True, use_attention_output_bias=True,
                                use_bias_in_output=False)
TIED = dataclasses.replace(TINY, share_embedding_weights=True)


@pytest.mark.parametrize("model", [TINY, NEOX_TINY, TIED], ids=["gptj", "neox", "tied"])
@pytest.mark.parametrize("optimizer_type", ["adamw", "sgd"])
def test_state_bytes_equal_the_built_models_variables_and_keras_slots(model, optimizer_type):
    from model import GPTJModel
    from runtime.optimizer import build_optimizer
    built = GPTJModel(model)
    variables = built.trainable_variables
    params = sum(v.shape.num_elements() for v in variables)
    config = OptimizerParams(optimizer_type=optimizer_type, momentum=0.9 if optimizer_type == "sgd" else 0.0,
                             weight_decay_rate=0.01 if optimizer_type == "adamw" else 0.0)
    optimizer = build_optimizer(config, variables)
    slots = sum(v.shape.num_elements() for v in optimizer.variables if len(v.shape) > 0)   # scalars: step, lr
    state = memory_model.replicated_state(model, config, "fp32")
    assert (state.weights, state.gradients, state.optimizer) == (4 * params, 4 * params, 4 * slots)
    # accumulation: runtime/standard.py holds the running sum beside a micro-batch's fresh gradients
    assert memory_model.replicated_state(model, config, "fp32", accumulating=True).gradients == 2 * 4 * params
    matmul = sum(v.shape.num_elements() for v in variables
                 if len(v.shape) == 2 and (model.share_embedding_weights or v is not built.embedding.embeddings))
    assert memory_model.replicated_state(model, config, "mixed").weights == 4 * params + 2 * matmul


def test_parameter_counts_match_transformers():
    """GPT-J-6B and GPT-NeoX-20B as our configs say, against transformers' own modules built on
    the meta device (no memory). The GPT-J model card's 6,053,381,344 is mesh-transformer-jax's
    count; transformers' GPTJForCausalLM (lm_head bias included) has 6,050,882,784."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    gptj = load_params(os.path.join(ROOT, "configs", "params_gptj_6B.yaml")).model
    neox = load_params(os.path.join(ROOT, "configs", "params_gptneox_20B.yaml")).model
    with torch.device("meta"):
        hf_gptj = transformers.GPTJForCausalLM(transformers.GPTJConfig(
            vocab_size=gptj.vocab_size, n_embd=gptj.hidden_size, n_layer=gptj.num_hidden_layers,
            n_head=gptj.num_heads, rotary_dim=gptj.rotary_dim, n_inner=gptj.filter_size))
        hf_neox = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            vocab_size=neox.vocab_size, hidden_size=neox.hidden_size, num_hidden_layers=neox.num_hidden_layers,
            num_attention_heads=neox.num_heads, intermediate_size=neox.filter_size,
            rotary_pct=neox.rotary_dim / neox.head_dim, use_parallel_residual=True, tie_word_embeddings=False))
    for ours, theirs, published in ((gptj, hf_gptj, 6_050_882_784), (neox, hf_neox, 20_554_567_680)):
        count = sum(math.prod(s.shape) for s in weight_specs(ours))
        assert count == sum(p.numel() for p in theirs.parameters()) == published
        assert memory_model.replicated_state(ours, OptimizerParams(), "fp32").total == 16 * count


# Megatron-LM: ColumnParallelLinear for q/k/v (query_key_value) and dense_h_to_4h, its bias split
# too; RowParallelLinear for the attention dense and dense_4h_to_h, bias added after the
# all-reduce (kept whole); VocabParallelEmbedding and a vocabulary-split output layer; LayerNorm whole.
MEGATRON_SPLIT = {"attn/q_proj/kernel": 1, "attn/k_proj/kernel": 1, "attn/v_proj/kernel": 1,
                  "attn/q_proj/bias": 0, "attn/k_proj/bias": 0, "attn/v_proj/bias": 0,
                  "attn/qkv_proj/kernel": 1, "attn/qkv_proj/bias": 0,
                  "attn/out_proj/kernel": 0, "mlp/fc_in/kernel": 1, "mlp/fc_in/bias": 0, "mlp/fc_out/kernel": 0,
                  "embedding/embeddings": 0, "lm_head/kernel": 1, "lm_head/bias": 0, "lm_head_bias": 0}


@pytest.mark.parametrize("model", [NEOX_TINY, TIED, dataclasses.replace(NEOX_TINY, fused_qkv=True)],
                         ids=["neox", "tied", "fused"])
def test_tensor_parallel_splits_exactly_what_megatron_splits(model):
    m = 4
    split = replicated = 0
    for spec in weight_specs(model):
        key = next((k for k in MEGATRON_SPLIT if spec.path.endswith(k)), None)
        assert memory_model.tensor_split_axis(spec.path) == (None if key is None else MEGATRON_SPLIT[key]), spec.path
        size = math.prod(spec.shape)
        if key is None:
            replicated += size
        else:
            split += size
            assert memory_model.elements_per_device(spec, m) * m == size        # every split axis divides by 4
    assert replicated > 0 and split > 0
    state = memory_model.replicated_state(model, OptimizerParams(), "fp32", tensor_parallel=m)
    assert state.weights == 4 * (replicated + split // m)


def test_streaming_keeps_prefetch_plus_one_pieces_on_the_device():
    sizes = [64 * 32] + [sum(math.prod(s.shape) for s in weight_specs(TINY) if s.path.startswith(f"blocks/{i}/"))
                         for i in range(2)] + [2 * 32 + 32 * 64 + 64]     # embedding, blocks, ln_f + head
    assert [sum(math.prod(s.shape) for s in p) for p in memory_model.streaming_pieces(TINY)] == sizes
    for prefetch, window in ((0, 1), (1, 2), (5, 4)):
        state = memory_model.streaming_device_state(TINY, "fp32", prefetch)
        assert state.weights == 4 * max(sum(sizes[i:i + window]) for i in range(len(sizes) - window + 1))
        assert (state.gradients, state.optimizer) == (4 * max(sizes), 0)


# ---- activations against what TensorFlow keeps ----------------------------------------------

def graph_saved_bytes(model: ModelParams, batch: int, seq: int) -> int:
    """Bytes of the forward tensors that the backward ops of one block read, in the traced (not
    yet optimised) graph of `tape.gradient`: weights, their 16-bit casts, constants, integer
    tensors, scalars and shape-only reads excluded; a reshape counts as the tensor it views."""
    import tensorflow as tf
    from model import GPTJModel
    built = GPTJModel(dataclasses.replace(model, num_hidden_layers=1))
    block = built.blocks[0]
    sin, cos, bias = built.attention_inputs(tf.zeros([batch, seq], tf.int32))
    probe = np.linspace(-1, 1, batch * seq * model.hidden_size, dtype=np.float32).reshape(batch, seq, -1)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.cast(block(x, sin, cos, bias)[0], tf.float32) * tf.constant(probe))
        return [loss] + tape.gradient(loss, [x] + list(block.trainable_variables))

    graph = step.get_concrete_function(tf.TensorSpec([batch, seq, model.hidden_size], model.compute_dtype)).graph
    forward, todo = set(), [graph.outputs[0].op]
    while todo:
        op = todo.pop()
        if op.name not in forward:
            forward.add(op.name)
            todo.extend(t.op for t in op.inputs)
    saved = {}
    for op in graph.get_operations():
        if op.name in forward or op.type in ("Shape", "ShapeN", "Size", "Rank", "BroadcastGradientArgs"):
            continue
        for t in op.inputs:
            while t.op.type == "Reshape":      # a view of its input's buffer (Dense's 2-D matmul rows)
                t = t.op.inputs[0]
            source = t.op
            if (source.name not in forward or source.type in ("ReadVariableOp", "Const", "Identity")
                    or (source.type == "Cast" and source.inputs[0].op.type == "ReadVariableOp")
                    or t.dtype.is_integer or t.shape.rank == 0):
                continue
            saved[t.name] = t.dtype.size * t.shape.num_elements()
    return sum(saved.values())


@pytest.mark.parametrize("precision", ["fp32", "mixed"])
def test_layer_activations_equal_what_tensorflow_keeps_less_what_xla_fuses(precision):
    """The formula equals the traced graph's saved tensors minus, by name, what the traced graph
    keeps and an optimised step does not: the tanh GELU's three F-wide temporaries (c bytes each;
    XLA fuses the GELU into one kernel reading its input), LayerNorm's centred and normalised
    float32 copies and its two per-token statistics (fused the same way), the raw float32 scores
    (read only by the gradient of the constant 1/sqrt(hd), which grappler prunes), the block output
    the probe loss reads (4 x D, the probe's not the block's), and, in 16-bit, rotary's sin/cos
    cast per block (4 tensors of r, shared by every block in an optimised graph)."""
    model = dataclasses.replace(TINY, mixed_precision=precision == "mixed")
    batch, seq = 2, 16
    c, d, f, h, r = memory_model.COMPUTE_BYTES[precision], model.hidden_size, model.filter_size, model.num_heads, model.rotary_dim
    unfused = 3 * c * f + 2 * 4 * d + 2 * 4 + 4 * h * seq + 4 * d + (4 * c * r if precision == "mixed" else 0)
    formula = sum(memory_model.layer_activation_items(model, precision, seq).values())
    assert graph_saved_bytes(model, batch, seq) == batch * seq * (formula + unfused)


def test_activation_total_counts_every_block_or_their_inputs_with_recompute():
    seq, tokens = 16, 32
    layer = sum(memory_model.layer_activation_items(TINY, "mixed", seq, 2).values())
    head = 4 * 32 + 2 * 32 + 8 * 32              # ln_f in (f32) and out, logits and their gradient: 64 / 2 vocab
    assert memory_model.activation_bytes(TINY, "mixed", seq, tokens, 2) == tokens * (2 * layer + head)
    assert memory_model.activation_bytes(TINY, "mixed", seq, tokens, 2, recompute=True) == tokens * (2 * 2 * 32 + layer + head)


# ---- the command line -----------------------------------------------------------------------

GPTJ = os.path.join(ROOT, "configs", "params_gptj_6B.yaml")


@pytest.mark.parametrize("argv, message", [
    (["--device", "a100-40g"], "invalid choice: 'a100-40g'"),
    (["--device", "a100-80g", "--devices", "0"], "0 must be positive"),
    (["--device", "a100-80g", "--mfu", "-0.4"], "-0.4 must be positive"),
    (["--device", "a100-80g", "--mfu", "40"], "--mfu 40.0 is a fraction"),
    (["--peak-tflops", "100"], "--device-memory is required without --device"),
    (["--device", "a100-80g", "--devices", "8", "--tensor-parallel", "3"], "does not divide --devices=8"),
    (["--device", "a100-80g", "--devices", "64", "--tensor-parallel", "32"], "does not divide model.num_heads=16"),
    (["--device", "a100-80g", "--seq-len", "4096"], "exceeds model.max_position_embeddings=2048"),
    (["--device", "a100-80g", "--set", "model.num_heads=7"], "model.hidden_size=4096 is not divisible"),
    (["--device", "a100-80g", "--micro-batch", "1", "--grad-accum", "2"], "not allowed with argument"),
])
def test_bad_input_is_one_error_line(argv, message, capsys):
    try:
        status = plan.main(["--params", GPTJ] + argv)
    except SystemExit as exit:           # argparse's own errors
        status = exit.code
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if "error:" in line]
    assert status == 2 and out == "" and len(errors) == 1 and message in errors[0], err


def test_plan_runs_without_tensorflow_and_lists_every_layout():
    code = ("import sys; from bench import plan; status = plan.main(sys.argv[1:]); "
            "print('TF loaded' if 'tensorflow' in sys.modules else 'no TF'); sys.exit(status)")
    result = subprocess.run([sys.executable, "-c", code, "--params", GPTJ, "--devices", "8", "--device-memory", "80",
                             "--peak-tflops", "312", "--host-memory", "1024"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("no TF")
    names = [line.split("|")[1].strip() for line in result.stdout.splitlines() if line.startswith("| ")][1:]
    assert names == ["data 8", "data 4 x tensor 2", "data 2 x tensor 4", "tensor 8", "streaming x data 8"]


def test_step_time_follows_the_assumed_mfu_and_streamings_copies():
    """GPT-J-6B's FLOPs per token in closed form: 6 x the matmul weights (per layer q, k, v, out
    D x D and fc_in, fc_out D x F; the head D x V) + 12 L D s; the rest is the plan's definition."""
    model = load_params(GPTJ).model
    d, f, v, layers, seq = model.hidden_size, model.filter_size, model.vocab_size, model.num_hidden_layers, 2048
    flops = 6 * (layers * (4 * d * d + 2 * d * f) + d * v) + 12 * layers * d * seq
    run = sizing.Run(model, OptimizerParams(), "mixed", 64, seq, 1, None, False, 0.4, "memory", 1)
    hardware = sizing.Hardware(80 * 2**30, 312e12, None, 32e9, 100e9, 2e9)
    data = sizing.plan_layout(run, hardware, sizing.Layout(8))
    assert data.tokens_per_second == pytest.approx(8 * 312e12 * 0.4 / flops, rel=1e-12)   # float rounding only
    recomputed = sizing.plan_layout(dataclasses.replace(run, recompute=True), hardware, sizing.Layout(4, 2))
    assert recomputed.mfu == pytest.approx(0.4 * 3 / 4, rel=1e-12)
    # one stream, a slow link: each of the 64 micro-steps waits for two float32 copies of the
    # weights; then AdamW's 7 passes over 4 B/param of host memory
    params = sum(math.prod(s.shape) for s in weight_specs(model))
    slow = dataclasses.replace(hardware, host_link=1e9)
    streaming = sizing.plan_layout(run, slow, sizing.Layout(1, streaming=True))
    assert streaming.step_seconds == pytest.approx(64 * 2 * 4 * params / 1e9 + 7 * 4 * params / 100e9, rel=1e-12)
    assert any("host link bound" in note for note in streaming.notes)


def test_the_briefs_command_sizes_memory_without_a_peak(capsys):
    assert plan.main(["--params", GPTJ, "--devices", "8", "--device-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "no mixed peak known" in out
    row = next(line for line in out.splitlines() if line.startswith("| tensor 8 "))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[7] == "yes" and cells[-3:] == ["-", "-", "-"]
