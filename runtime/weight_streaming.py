"""Weight-streaming execution: train a model whose weights do not fit the compute device.

Variables (and optimizer slots) live on the host. A step runs the model piece by piece on
the compute device with the same layer code as standard execution (`GPTJModel.embed`,
`DecoderBlock.forward`, `GPTJModel.head`), each piece's weights copied over just before it
runs (the next `prefetch_blocks` pieces are copied ahead) and dropped after:

  forward   embed, block 0..N-1, keeping only the activations at block boundaries
  head      LM head + loss, its gradients and d(loss)/d(last activation)
  backward  block N-1..0: copy the block again, recompute it from its input, take the
            weight gradients and the input gradient, move the weight gradients to the host
  embed     the embedding gradient from d(loss)/d(first activation)

Global-norm clipping needs every gradient before any update, so the gradients of the whole
step are collected on the host first (host memory: one copy of the parameters), then the
same post-processing as standard execution runs there (rescale, unscale, finite check,
clip) and the optimizer applies them on the host. The update is therefore the standard
mode's, and checkpoints are interchangeable (same variables, same optimizer).
"""
from __future__ import annotations

import tensorflow as tf

from layers.masks import causal_attention_bias
from model import GPTJModel, loss_weights
from runtime.loss_scale import LossScale, all_finite
from runtime.optimizer import current_learning_rate
from runtime.params import Params, ParamsError


HOST_DEVICE = "/CPU:0"


def check_streaming_params(params: Params) -> None:
    streaming = params.runconfig.weight_streaming
    if streaming.host_store != "memory":
        raise ParamsError("runconfig.weight_streaming.host_store=disk is not available yet; use memory")
    if params.runconfig.strategy not in ("auto", "one_device"):
        raise ParamsError(f"runconfig.execution=weight_streaming runs on one compute device; "
                          f"runconfig.strategy={params.runconfig.strategy!r} needs 'auto' or 'one_device'")


def compute_device_name(requested: str | None) -> str:
    """The device blocks run on: as configured, else the first GPU, else the first CPU."""
    if requested:
        return requested
    gpus = tf.config.list_logical_devices("GPU")
    return (gpus[0] if gpus else tf.config.list_logical_devices("CPU")[0]).name


class BlockStream:
    """Copies of the pieces' weights on the compute device, at most `prefetch + 1` at a time.

    `copies_made` and `max_resident` are kept so tests can check what crossed and what stayed."""

    def __init__(self, pieces: list[dict], device: str, prefetch: int):
        self.pieces, self.device, self.prefetch = pieces, device, prefetch
        self.resident: dict[int, dict] = {}
        self.copies_made = 0
        self.max_resident = 0

    def _copy(self, index: int) -> None:
        if index < len(self.pieces) and index not in self.resident:
            with tf.device(self.device):
                self.resident[index] = tf.nest.map_structure(tf.identity, self.pieces[index])
            self.copies_made += 1
            self.max_resident = max(self.max_resident, len(self.resident))

    def get(self, index: int, order: list[int]) -> dict:
        """Piece `index` on the device; the next `prefetch` pieces of `order` are copied too."""
        self._copy(index)
        position = order.index(index)
        for ahead in order[position + 1: position + 1 + self.prefetch]:
            self._copy(ahead)
        return self.resident[index]

    def release(self, index: int) -> None:
        self.resident.pop(index, None)


class WeightStreamingStep:
    """The weight-streaming counterpart of the estimator's compiled train step (same logs)."""

    def __init__(self, params: Params, model: GPTJModel, optimizer, loss_scale: LossScale,
                 step: tf.Variable, label_positions: float):
        self.params, self.model, self.optimizer = params, model, optimizer
        self.loss_scale, self.step, self.label_positions = loss_scale, step, label_positions
        streaming = params.runconfig.weight_streaming
        self.device = compute_device_name(streaming.compute_device)
        self.prefetch = streaming.prefetch_blocks
        tree = model.weights_tree()
        # Pieces in forward order: embedding, blocks, head. Their variables stay on the host.
        self.pieces = ([{"embedding": tree["embedding"]}] + list(tree["blocks"])
                       + [{name: tree[name] for name in model.head_weight_names()}])
        self.variables = model.trainable_variables
        self.last_stream: BlockStream | None = None
        self.last_activation_devices: list[str] = []   # where the block outputs were computed
        self._block_fn = tf.function(self._block_forward)

    # Blocks differ only by their weights, so one traced function serves every block.
    def _block_forward(self, weights, hidden, sin, cos, bias, seed):
        return self.model.blocks[0].forward(weights, hidden, sin, cos, bias, dropout_seed=seed)[0]

    def _seed(self, micro: int) -> tf.Tensor:
        seed = tf.stack([tf.constant(self.params.runconfig.seed, tf.int64), self.step.read_value()])
        seed = tf.random.experimental.stateless_fold_in(seed, 0)  # the one replica
        return tf.random.experimental.stateless_fold_in(seed, micro)

    def _micro_batch(self, features, labels, micro: int, grads: dict, sums: dict) -> None:
        model, n_blocks = self.model, len(self.model.blocks)
        stream = BlockStream(self.pieces, self.device, self.prefetch)
        forward_order = list(range(n_blocks + 2))
        backward_order = [n_blocks + 1] + list(range(n_blocks, -1, -1))
        seed = self._seed(micro)
        block_seeds = [model.block_seed(seed, i) for i in range(n_blocks)]
        with tf.device(self.device):
            ids = features["input_ids"]
            weights = loss_weights(features)
            batch, length = tf.shape(ids)[0], tf.shape(ids)[1]
            positions = tf.broadcast_to(tf.range(length)[None, :], [batch, length])
            sin, cos = model.positions(positions)
            bias = causal_attention_bias(tf.range(length), tf.ones([batch, length], tf.int32))
            hidden = model.embed(stream.get(0, forward_order), ids, seed)
            stream.release(0)
            boundaries = [hidden]                                           # activations kept
            for i in range(n_blocks):
                hidden = self._block_fn(stream.get(i + 1, forward_order), hidden, sin, cos, bias, block_seeds[i])
                stream.release(i + 1)
                boundaries.append(hidden)
            head = stream.get(n_blocks + 1, backward_order)
            with tf.GradientTape() as tape:
                tape.watch([hidden] + tf.nest.flatten(head))
                logits = model.head(head, hidden)
                cross_entropy = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
                loss_sum = tf.reduce_sum(cross_entropy * weights)
                scaled = loss_sum * (self.loss_scale.scale / self.label_positions)
            head_grads, upstream = tape.gradient(scaled, [head, hidden])
            correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels),
                                            tf.float32) * weights)
            self._collect(n_blocks + 1, head_grads, grads)
            stream.release(n_blocks + 1)
            for i in range(n_blocks - 1, -1, -1):
                block_weights = stream.get(i + 1, backward_order)
                with tf.GradientTape() as tape:
                    tape.watch([boundaries[i]] + tf.nest.flatten(block_weights))
                    out = self._block_fn(block_weights, boundaries[i], sin, cos, bias, block_seeds[i])
                block_grads, upstream = tape.gradient(out, [block_weights, boundaries[i]],
                                                      output_gradients=upstream)
                self._collect(i + 1, block_grads, grads)
                stream.release(i + 1)
                boundaries[i + 1] = None
            embedding = stream.get(0, backward_order)
            with tf.GradientTape() as tape:
                tape.watch(tf.nest.flatten(embedding))
                first = model.embed(embedding, ids, seed)
            self._collect(0, tape.gradient(first, embedding, output_gradients=upstream), grads)
            stream.release(0)
        self.last_stream = stream
        self.last_activation_devices = [b.device for b in boundaries if b is not None] + [upstream.device]
        sums["loss"] += loss_sum
        sums["correct"] += correct
        sums["tokens"] += tf.reduce_sum(weights)

    def _collect(self, piece: int, piece_grads: dict, grads: dict) -> None:
        """Move a piece's gradients to the host, summed per variable (a tied embedding gets two)."""
        flat_vars = tf.nest.flatten(self.pieces[piece])
        for variable, grad in zip(flat_vars, tf.nest.flatten(piece_grads)):
            if isinstance(grad, tf.IndexedSlices):
                grad = tf.convert_to_tensor(grad)
            with tf.device(variable.device):
                grad = tf.identity(grad)
                key = variable.ref()
                grads[key] = grad if key not in grads else grads[key] + grad

    def __call__(self, features, labels) -> dict:
        accum = self.params.optimizer.grad_accum_steps
        grads: dict = {}
        sums = {"loss": 0.0, "correct": 0.0, "tokens": 0.0}
        micro_features = {k: tf.split(v, accum, axis=0) for k, v in features.items()}
        micro_labels = tf.split(labels, accum, axis=0)
        for micro in range(accum):
            self._micro_batch({k: v[micro] for k, v in micro_features.items()}, micro_labels[micro],
                              micro, grads, sums)
        ordered = [grads[v.ref()] for v in self.variables]
        tokens = tf.maximum(sums["tokens"], 1.0)
        ordered = self.loss_scale.unscale([g * (self.label_positions / tokens) for g in ordered])
        finite = all_finite(ordered + [sums["loss"]])
        grad_norm = tf.linalg.global_norm(ordered)
        max_norm = self.params.optimizer.max_gradient_norm
        if max_norm is not None:
            ordered, _ = tf.clip_by_global_norm(ordered, max_norm, use_norm=grad_norm)
        learning_rate = current_learning_rate(self.optimizer)
        loss_scale = tf.identity(self.loss_scale.scale)
        if bool(finite):
            self.optimizer.apply_gradients(zip(ordered, self.variables))
        self.loss_scale.update(finite)
        self.step.assign_add(1)
        return {"loss": sums["loss"] / tokens, "accuracy": sums["correct"] / tokens, "tokens": sums["tokens"],
                "grad_norm": grad_norm, "learning_rate": learning_rate, "loss_scale": loss_scale,
                "finite": finite}
