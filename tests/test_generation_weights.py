"""Generation weight formats (generation/weights.py): int8 equals float32 on the dequantized
weights, bfloat16 equals mixed precision's numerics, and decoding in either picks the token
the format's own logits rank first."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from generation.config import GenerationConfig
from generation.generator import Generator
from generation.weights import GenerationModel, dequantize_int8, quantize_int8
from layers.tree import flatten_weights
from tests.numerics import LOW_PRECISION_ROUNDINGS, U32, U_BF16, float32_atol, forward_reductions
from tests.test_model import TINY, ids, randomized

pytestmark = pytest.mark.numerics

# float32 logits of TINY (2 blocks, sums of <= filter_size = 64 terms) in two summation orders.
def logits_atol(scale: float) -> float:
    return float32_atol(forward_reductions(TINY.num_hidden_layers), TINY.filter_size, scale)


def dequantized_twin(model):
    """A float32 model whose dense kernels are the int8 format's dequantized kernels."""
    twin = randomized(TINY, seed=7)
    for source, target in zip(model.trainable_variables, twin.trainable_variables):
        value = source
        if source.name.startswith("kernel") and source.shape.rank == 2 and "embedding" not in source.name:
            value = dequantize_int8(*quantize_int8(source))
        target.assign(value)
    return twin


def test_int8_rows_are_within_half_a_step_of_the_kernel():
    kernel = tf.random.stateless_normal([48, 20], seed=[3, 4]) * tf.linspace(0.01, 2.0, 20)  # columns of many sizes
    kernel = tf.concat([kernel, tf.zeros([48, 1])], axis=1)                                   # and an all-zero one
    rows, scale = quantize_int8(kernel)
    assert rows.dtype == tf.int8 and rows.shape == (21, 48) and scale.shape == (21,)
    q = rows.numpy().astype(np.int32)
    assert np.abs(q).max() == 127 and (np.abs(q).max(axis=1)[:-1] == 127).all()   # each column's largest weight
    error = np.abs(dequantize_int8(rows, scale).numpy() - kernel.numpy())
    # rounding to the nearest step leaves <= scale / 2; w / scale and q * scale add 2 float32 roundings
    assert (error <= scale.numpy() * (0.5 + 2 * 127 * U32)).all()
    assert (error[:, -1] == 0).all()


def test_int8_logits_equal_float32_on_the_dequantized_kernels():
    model = randomized(TINY, seed=7)
    tokens = ids(2, 10, seed=8)
    packed = GenerationModel(model, "int8")
    reference = dequantized_twin(model)(tokens).logits.numpy()
    logits = packed(tokens).logits.numpy()
    np.testing.assert_allclose(logits, reference, rtol=0, atol=logits_atol(np.abs(reference).max()))
    # and the quantization itself moved the logits well beyond rounding (weights moved by up to
    # 1/254 of their column's largest: ~1e-3 of the logits' size here, 100x the rounding bound)
    assert np.abs(model(tokens).logits.numpy() - reference).max() > 10 * logits_atol(np.abs(reference).max())
    packed_kernels = [name for name, v in flatten_weights(packed.weights).items() if v.dtype == tf.int8]
    dense_kernels = [name for name in flatten_weights(model.weights_tree()) if name.endswith("/kernel")]
    assert len(packed_kernels) == len(dense_kernels) == 6 * TINY.num_hidden_layers + 1   # q k v out fc_in fc_out, head


@pytest.mark.mixed_precision
def test_bfloat16_logits_as_close_to_float32_as_mixed_precision():
    model = randomized(TINY, seed=7)
    tokens = ids(2, 10, seed=8)
    reference = model(tokens).logits.numpy()
    packed = GenerationModel(model, "bfloat16")
    logits = packed(tokens).logits
    assert logits.dtype == tf.float32
    kernels = [v for name, v in flatten_weights(packed.weights).items() if name.endswith("/kernel_t")]
    assert len(kernels) == 6 * TINY.num_hidden_layers + 1
    assert all(v.dtype == tf.int16 for v in kernels)          # bfloat16 values held as their bits
    error = np.abs(logits.numpy() - reference).max()
    assert 0 < error <= LOW_PRECISION_ROUNDINGS * U_BF16 * np.abs(reference).max()   # the bound standard bf16 meets


@pytest.mark.parametrize("weight_format", ["int8", pytest.param("bfloat16", marks=pytest.mark.mixed_precision)])
def test_greedy_decoding_picks_the_format_s_own_best_token(weight_format):
    """Each new token is the argmax of the same format's logits on the tokens so far (teacher
    forced, no cache, eager): the compiled decode loop computes the same function, to within
    rounding (float32 for int8; the bf16 rounding budget for bfloat16)."""
    model = randomized(TINY, seed=7)
    packed = GenerationModel(model, weight_format)
    prompts = ids(2, 6, seed=9).numpy().tolist()
    results = Generator(packed, "xla").generate(prompts, GenerationConfig(max_new_tokens=8, pad_token_id=0))
    for prompt, result in zip(prompts, results):
        sequence = prompt + result.token_ids
        logits = packed(tf.constant([sequence[:-1]])).logits.numpy()[0]                # [s, V]
        scale = np.abs(logits).max()
        tolerance = logits_atol(scale) if weight_format == "int8" else LOW_PRECISION_ROUNDINGS * U_BF16 * scale
        for step, token in enumerate(result.token_ids):
            row = logits[len(prompt) - 1 + step]
            assert row[token] >= row.max() - tolerance, (step, token, row.argmax())


@pytest.mark.parametrize("weight_format", ["int8", pytest.param("bfloat16", marks=pytest.mark.mixed_precision)])
def test_kernels_converted_in_blocks_give_the_whole_kernels_logits(monkeypatch, weight_format):
    """layers.dense.packed_product converts a packed kernel a block of rows at a time
    (layers/packing.py) in a compiled step (eager converts it whole). With blocks of 3-6 rows
    (TINY's kernels then split into several blocks, the last one short) the compiled logits of
    20 and 80 rows (a decode's and a prefill's shapes) equal the eager ones up to the summation
    order of each output's dot product (the blocks regroup outputs, not terms)."""
    import layers.packing as packing
    model = GenerationModel(randomized(TINY, seed=7), weight_format)
    few, many = ids(2, 10, seed=8), ids(4, 20, seed=9)

    def logits(block_bytes):                   # a new tf.function per size: the sizes are read at trace
        monkeypatch.setattr(packing, "CONVERT_BLOCK_BYTES", block_bytes)
        compiled = tf.function(lambda t: model(t).logits, jit_compile=True)
        return model(few).logits.numpy(), compiled(few).numpy(), compiled(many).numpy()

    whole = logits(1 << 30)
    blocks = logits(3 * 4 * TINY.filter_size)             # 3 rows of the widest input (fc_out's)
    scale = max(np.abs(w).max() for w in whole)
    # bfloat16: the products round to bfloat16 per block as per kernel, so a different order of
    # one dot's terms moves an output by bfloat16 roundings, not float32 ones
    atol = (logits_atol(scale) if weight_format == "int8"
            else LOW_PRECISION_ROUNDINGS * U_BF16 * scale)
    for one, split in zip(whole, blocks):
        np.testing.assert_allclose(split, one, rtol=0, atol=atol)
