"""The compiled math of weight streaming's pieces: embedding, one decoder block, the LM head.

Each function takes its piece's weights as arguments (tensors on the compute device), never as
captured variables, so one trace serves every block of a shape: blocks differ only by their
weights. The functions compile through runtime/compile_path.py (XLA or graph mode, chosen as
for standard execution).

Under mixed precision the weights arrive in the dtype the layer code computes with them
(`GPTJModel.weight_compute_dtype`: bfloat16/float16 copies of kernels, biases and the embedding,
float32 LayerNorm); the layer's own cast is then a no-op and the gradient with respect to the
copy is the one standard execution casts to float32, so every gradient leaves here in float32
exactly as standard execution computes it.
"""
from __future__ import annotations

import tensorflow as tf

from model import GPTJModel, loss_sums, loss_weights
from runtime.compile_path import CompilePath, compile_function
from runtime.steps import scaled_loss


def dense_float32(gradient, like: tf.Tensor) -> tf.Tensor:
    """A gradient as a dense float32 tensor shaped like its weight; a gather's sparse gradient is
    summed per row in float32 (as standard execution sums the cast rows)."""
    if isinstance(gradient, tf.IndexedSlices):
        return tf.math.unsorted_segment_sum(tf.cast(gradient.values, tf.float32), gradient.indices,
                                            tf.shape(like)[0])
    return tf.cast(gradient, tf.float32)


def float32_gradients(gradients, weights):
    return tf.nest.map_structure(dense_float32, gradients, weights)


class StreamedPieces:
    """Compiled forward and backward of each piece; `block_forward` and `block_backward` are traced
    once per block shape (see `tracing_counts`)."""

    def __init__(self, model: GPTJModel, path: CompilePath, label_positions: float):
        self.model, self.label_positions = model, label_positions
        self.block_forward = compile_function(self._block_forward, path)
        self.block_backward = compile_function(self._block_backward, path)
        self.head_backward = compile_function(self._head_backward, path)
        self.head_sums = compile_function(self._head_sums, path)
        self.embed_backward = compile_function(self._embed_backward, path)

    def tracing_counts(self) -> dict[str, int]:
        return {name: getattr(self, name).experimental_get_tracing_count()
                for name in ("block_forward", "block_backward", "head_backward", "head_sums", "embed_backward")}

    # (weights, hidden, sin, cos, bias, cache, cache_index, seed) -> (hidden, None): GPTJModel.trunk's block_forward
    def _block_forward(self, weights, hidden, sin, cos, bias, cache=None, cache_index=0, seed=None):
        return self.model.blocks[0].forward(weights, hidden, sin, cos, bias, dropout_seed=seed)

    def _block_backward(self, weights, hidden, upstream, sin, cos, bias, seed):
        """Recompute the block from its input hidden [b, s, D] and backpropagate upstream [b, s, D]:
        (float32 weight gradients, d(loss)/d(hidden) [b, s, D])."""
        with tf.GradientTape() as tape:
            tape.watch([hidden] + tf.nest.flatten(weights))
            out, _ = self.model.blocks[0].forward(weights, hidden, sin, cos, bias, dropout_seed=seed)
        grads, d_hidden = tape.gradient(out, [weights, hidden], output_gradients=upstream)
        return float32_gradients(grads, weights), d_hidden

    def _head_sums(self, weights, hidden, labels, mask):
        return loss_sums(self.model.head(weights, hidden), labels, mask)

    def _head_backward(self, weights, hidden, features, labels, scale, last_block=None):
        """LM head and loss of hidden [b, s, D]: (loss_sums, float32 head gradients, float32 gradients of
        last_block's weights or None, d(loss)/d(hidden)). last_block (weights, sin, cos, bias, seed):
        the last decoder block, run first from its input `hidden` in the same step, so its forward
        is never recomputed."""
        block_weights = [] if last_block is None else last_block[0]
        with tf.GradientTape() as tape:
            tape.watch([hidden] + tf.nest.flatten(weights) + tf.nest.flatten(block_weights))
            out = hidden
            if last_block is not None:
                block_weights, sin, cos, bias, seed = last_block
                out, _ = self.model.blocks[0].forward(block_weights, hidden, sin, cos, bias, dropout_seed=seed)
            sums = self._head_sums(weights, out, labels, loss_weights(features))
            loss = scaled_loss(sums, scale, self.label_positions)
        grads, block_grads, d_hidden = tape.gradient(loss, [weights, block_weights, hidden])
        block_grads = None if last_block is None else float32_gradients(block_grads, block_weights)
        return sums, float32_gradients(grads, weights), block_grads, d_hidden

    def _embed_backward(self, weights, input_ids, upstream, seed):
        """The embedding's float32 gradient from d(loss)/d(embedding output) upstream [b, s, D]."""
        with tf.GradientTape() as tape:
            tape.watch(tf.nest.flatten(weights))
            first = self.model.embed(weights, input_ids, seed)
        return float32_gradients(tape.gradient(first, weights, output_gradients=upstream), weights)
