"""GPTJModel: structure, KV cache, masks, mixed precision, dropout."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from layers.tree import flatten_weights
from layers.masks import causal_attention_bias
from model import GPTJModel, weight_shapes
from config.params import ModelParams
from tests.numerics import LOW_PRECISION_ROUNDINGS, U_BF16, U_FP16, float32_atol, forward_reductions

pytestmark = pytest.mark.numerics

TINY = ModelParams(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=4, rotary_dim=4,
                   filter_size=64, max_position_embeddings=64)
VARIANTS = {
    "gptj": TINY,
    "neox_fused": dataclasses.replace(TINY, rotary_style="neox", use_untied_layer_norm=True, fused_qkv=True,
                                      use_projection_bias_in_attention=True, use_attention_output_bias=True,
                                      use_bias_in_output=False, nonlinearity="gelu"),
    "sequential": dataclasses.replace(TINY, use_parallel_residual=False, use_untied_layer_norm=True),
    "tied_with_bias": dataclasses.replace(TINY, share_embedding_weights=True, num_hidden_layers=3),
    "tied_no_bias": dataclasses.replace(TINY, share_embedding_weights=True, use_bias_in_output=False),
}


def ids(batch, length, seed=0, vocab=97):
    return tf.constant(np.random.default_rng(seed).integers(0, vocab, (batch, length)), tf.int32)


def randomized(config, seed=0):
    """A model whose LayerNorms and biases are random too, so every weight affects the output."""
    model = GPTJModel(config, seed=seed)
    rng = np.random.default_rng(seed)
    for variable in model.trainable_variables:
        if variable.shape.rank == 1:
            variable.assign(variable + rng.standard_normal(variable.shape).astype(np.float32) * 0.1)
    return model


def same_model_atol(config: ModelParams, logits: np.ndarray) -> float:
    """One model's float32 logits in two summation orders (cache vs none, XLA vs eager, padded):
    the rounding of its chain of sums of at most filter_size terms, at the logits' scale."""
    return float32_atol(forward_reductions(config.num_hidden_layers), config.filter_size, np.abs(logits).max())


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_weight_shapes_match_the_built_model(name):
    config = VARIANTS[name]
    model = GPTJModel(config)
    built = {path: tuple(v.shape) for path, v in flatten_weights(model.weights_tree()).items()}
    assert built == weight_shapes(config)
    assert len(model.trainable_variables) == len(built)


def test_initialization_is_deterministic_per_seed():
    a, b, c = GPTJModel(TINY, seed=1), GPTJModel(TINY, seed=1), GPTJModel(TINY, seed=2)
    for va, vb, vc in zip(a.trainable_variables, b.trainable_variables, c.trainable_variables):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())
    assert not np.array_equal(a.blocks[0].attn.q_proj.kernel.numpy(), c.blocks[0].attn.q_proj.kernel.numpy())
    std = float(np.std(a.blocks[0].mlp.fc_in.kernel.numpy()))
    # truncated normal, stddev 0.02 cut at 2 sigma: std 0.0176; the sample std of 2048 draws has a
    # standard error of ~0.0176 / sqrt(2 * 2048) = 3e-4, so the bounds are > 8 of them away
    # (false failure < 1e-15) while a stddev of 0.01 or 0.04 fails
    assert 0.015 < std < 0.025


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_cached_decoding_equals_full_forward(name):
    model = randomized(VARIANTS[name], seed=3)
    tokens = ids(2, 9, seed=4)
    full = model(tokens).logits.numpy()
    cache = model.empty_cache(batch_size=2, cache_length=12)
    valid = np.zeros((2, 12), np.int32)
    valid[:, :5] = 1
    out = model(tokens[:, :5], attention_mask=tf.constant(valid), cache=cache, cache_index=0)
    steps = [out.logits.numpy()]
    for t in range(5, 9):
        valid[:, t] = 1
        out = model(tokens[:, t:t + 1], attention_mask=tf.constant(valid), cache=out.cache, cache_index=t)
        steps.append(out.logits.numpy())
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=same_model_atol(VARIANTS[name], full))


@pytest.mark.parametrize("name", ["gptj", "neox_fused"])
def test_compiled_cached_decoding_with_last_only_prefill(name):
    """What generation runs: XLA-compiled steps (the cache written in place by a dynamic update
    slice) and a prefill that computes only the last position's logits."""
    model = randomized(VARIANTS[name], seed=3)
    tokens = ids(2, 9, seed=4)
    full = model(tokens).logits.numpy()                                            # [2, 9, V]
    step = tf.function(lambda t, mask, cache, index, last_only: model(
        t, attention_mask=mask, cache=cache, cache_index=index, last_only=last_only), jit_compile=True)
    valid = np.zeros((2, 12), np.int32)
    valid[:, :5] = 1
    out = step(tokens[:, :5], tf.constant(valid), model.empty_cache(2, 12), tf.constant(0), True)
    assert out.logits.shape == (2, 1, 97)
    logits = [out.logits.numpy()]
    for t in range(5, 9):
        valid[:, t] = 1
        out = step(tokens[:, t:t + 1], tf.constant(valid), out.cache, tf.constant(t), False)
        logits.append(out.logits.numpy())
    np.testing.assert_allclose(np.concatenate(logits, axis=1), full[:, 4:], atol=same_model_atol(VARIANTS[name], full))
    keys = out.cache[0][0].numpy()                                                 # [b, h, L, hd]
    assert keys.shape == (2, 4, 12, 8)
    assert np.all(keys[:, :, 9:] == 0) and np.all(np.any(keys[:, :, :9] != 0, axis=-1))


def test_writing_past_the_cache_end_is_an_error():
    model = GPTJModel(TINY)
    cache = model.empty_cache(batch_size=1, cache_length=6)
    with pytest.raises(ValueError, match="writing 2 tokens at cache slot 5 needs 7 slots but the cache has 6"):
        model(ids(1, 2), cache=cache, cache_index=5)


def test_left_padding_with_position_ids_equals_unpadded():
    model = randomized(TINY, seed=5)
    tokens = ids(1, 6, seed=6)
    alone = model(tokens).logits.numpy()
    padded = tf.concat([tf.zeros([1, 3], tf.int32), tokens], axis=1)
    mask = tf.constant([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    positions = tf.constant([[0, 0, 0, 0, 1, 2, 3, 4, 5]])
    out = model(padded, attention_mask=mask, position_ids=positions).logits.numpy()
    np.testing.assert_allclose(out[:, 3:], alone, atol=same_model_atol(TINY, alone))
    assert np.all(np.isfinite(out))  # fully masked padding rows stay finite


def test_attention_bias_shape_and_values():
    bias = causal_attention_bias(tf.constant([2, 3]), tf.constant([[1, 1, 1, 1], [0, 1, 1, 1]])).numpy()
    assert bias.shape == (2, 1, 2, 4)
    assert (bias[0, 0] == 0).tolist() == [[True, True, True, False], [True, True, True, True]]
    assert (bias[1, 0] == 0).tolist() == [[False, True, True, False], [False, True, True, True]]


@pytest.mark.mixed_precision
@pytest.mark.parametrize("dtype,unit_roundoff", [("bfloat16", U_BF16), ("float16", U_FP16)])
def test_mixed_precision_close_to_float32(dtype, unit_roundoff):
    tolerance = LOW_PRECISION_ROUNDINGS * unit_roundoff                  # bf16 0.090, fp16 0.011
    model = randomized(TINY, seed=7)
    tokens = ids(2, 10, seed=8)
    reference = model(tokens).logits.numpy()
    model.config = dataclasses.replace(TINY, mixed_precision=True, mixed_precision_dtype=dtype)
    logits = model(tokens).logits
    assert logits.dtype == tf.float32
    assert all(v.dtype == tf.float32 for v in model.trainable_variables)
    scale = np.abs(reference).max()
    assert np.abs(logits.numpy() - reference).max() <= tolerance * scale
    assert np.abs(logits.numpy() - reference).max() > 0  # the low-precision path really ran


def test_dropout_is_seeded_and_off_without_seed():
    config = dataclasses.replace(TINY, embedding_dropout_rate=0.1, attention_dropout_rate=0.1,
                                 residual_dropout_rate=0.1)
    model = randomized(config, seed=9)
    tokens = ids(2, 8)
    plain = model(tokens).logits.numpy()
    seed = tf.constant([1, 2], tf.int64)
    a = model(tokens, dropout_seed=seed).logits.numpy()
    b = model(tokens, dropout_seed=seed).logits.numpy()
    c = model(tokens, dropout_seed=tf.constant([1, 3], tf.int64)).logits.numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, plain) and not np.allclose(a, c)    # dropout 0.1 moves logits by O(0.1), not 1e-5
    no_dropout = GPTJModel(TINY)
    no_dropout_logits = no_dropout(tokens).logits.numpy()
    np.testing.assert_array_equal(no_dropout(tokens, dropout_seed=seed).logits.numpy(), no_dropout_logits)


def test_forward_traces_once_in_tf_function():
    model = randomized(TINY)
    traces = []

    @tf.function(reduce_retracing=True)
    def step(tokens):
        traces.append(1)
        return model(tokens).logits

    first = step(ids(2, 8)).numpy()
    step(ids(2, 8, seed=1))
    np.testing.assert_allclose(first, model(ids(2, 8)).logits.numpy(), atol=same_model_atol(TINY, first))
    assert len(traces) == 1


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_initial_values_reproduce_the_models_initialisation(name):
    from model import initial_values
    config = VARIANTS[name]
    built = flatten_weights(GPTJModel(config, seed=7).weights_tree())
    drawn = list(initial_values(config, seed=7))
    assert [spec.path for spec, _ in drawn] == list(built)  # creation order
    for spec, value in drawn:
        np.testing.assert_array_equal(value, built[spec.path].numpy(), err_msg=spec.path)
