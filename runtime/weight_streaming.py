"""Weight-streaming execution: train a model whose weights do not fit the compute device.

Weights and optimizer state live on the host: as tf.Variables on the host device
(`host_store: memory`) or as memory-mapped files (`host_store: disk`, runtime/host_store.py).
A step runs the model piece by piece on the compute device with the same layer code as
standard execution (`GPTJModel.embed`, `DecoderBlock.forward`, `GPTJModel.head`), each
piece's weights copied over just before it runs (the next `prefetch_blocks` pieces are copied
ahead) and dropped after:

  forward   embed, block 0..N-1, keeping only the activations at block boundaries
  head      LM head + loss, its gradients and d(loss)/d(last activation)
  backward  block N-1..0: copy the block again, recompute it from its input, take the
            weight gradients and the input gradient, move the weight gradients to the host
  embed     the embedding gradient from d(loss)/d(first activation)

Global-norm clipping needs every gradient before any update, so the step's gradients are
collected on the host first (one parameter-sized buffer, in RAM or on disk), then clipped
and applied there: by the same Keras optimizer over the same variables as standard
execution (memory), or by runtime/disk_streaming.py's Adam on the files (disk).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from layers.tree import flatten_weights, unflatten_weights
from checkpoint_utils.host_arrays import as_tensor
from layers.masks import causal_attention_bias
from model import GPTJModel, loss_weights
from runtime.loss_scale import LossScale, all_finite
from runtime.optimizer import current_learning_rate
from config.params import Params, ParamsError

HOST_DEVICE = "/CPU:0"


def check_streaming_params(params: Params) -> None:
    if params.runconfig.strategy not in ("auto", "one_device"):
        raise ParamsError(f"runconfig.execution=weight_streaming runs on one compute device; "
                          f"runconfig.strategy={params.runconfig.strategy!r} needs 'auto' or 'one_device'")


def compute_device_name(requested: str | None) -> str:
    """The device blocks run on: as configured, else the first GPU, else the first CPU."""
    if requested:
        return requested
    gpus = tf.config.list_logical_devices("GPU")
    return (gpus[0] if gpus else tf.config.list_logical_devices("CPU")[0]).name


def split_pieces(tree: dict, head_names: tuple[str, ...]) -> list[dict]:
    """A weights tree as the pieces that stream, in forward order: embedding, blocks, head."""
    return ([{"embedding": tree["embedding"]}] + list(tree["blocks"])
            + [{name: tree[name] for name in head_names}])


class BlockStream:
    """Copies of the pieces' weights on the compute device, at most `prefetch + 1` at a time.

    `load(leaf)` turns a host leaf (a variable, or a path in the disk store) into a tensor.
    `copies_made` and `max_resident` are kept so tests can check what crossed and what stayed."""

    def __init__(self, pieces: list[dict], load, device: str, prefetch: int):
        self.pieces, self.load, self.device, self.prefetch = pieces, load, device, prefetch
        self.resident: dict[int, dict] = {}
        self.copies_made = 0
        self.max_resident = 0

    def _copy(self, index: int) -> None:
        if index < len(self.pieces) and index not in self.resident:
            with tf.device(self.device):
                self.resident[index] = tf.nest.map_structure(lambda leaf: tf.identity(self.load(leaf)),
                                                             self.pieces[index])
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
    """The weight-streaming counterpart of the estimator's train step (same logs), and a
    streamed forward for evaluation.

    `model` supplies the layer code; with the disk store it is a skeleton (one block, tiny
    vocabulary) whose own variables are never used: blocks differ only by their weights."""

    def __init__(self, params: Params, model: GPTJModel, optimizer, loss_scale: LossScale,
                 step: tf.Variable, label_positions: float, disk=None):
        self.params, self.model, self.optimizer, self.disk = params, model, optimizer, disk
        self.loss_scale, self.step, self.label_positions = loss_scale, step, label_positions
        streaming = params.runconfig.weight_streaming
        self.device = compute_device_name(streaming.compute_device)
        self.prefetch = streaming.prefetch_blocks
        if disk is None:
            flat = flatten_weights(model.weights_tree())
            self.load = lambda variable: variable
            self.variables = model.trainable_variables
            self.key_of = {variable.ref(): path for path, variable in flat.items()}
        else:
            flat = {path: path for path in disk.shapes}
            self.load = lambda path: as_tensor(disk.store.read("param", path))
        self.pieces = split_pieces(unflatten_weights(flat), model.head_weight_names())
        self.n_blocks = len(self.pieces) - 2
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

    def _forward(self, stream, order, ids, seed):
        """Embed and run every block; returns (sin, cos, bias, block-boundary activations)."""
        model = self.model
        batch, length = tf.shape(ids)[0], tf.shape(ids)[1]
        positions = tf.broadcast_to(tf.range(length)[None, :], [batch, length])
        sin, cos = model.positions(positions)
        bias = causal_attention_bias(tf.range(length), tf.ones([batch, length], tf.int32))
        hidden = model.embed(stream.get(0, order), ids, seed)
        stream.release(0)
        boundaries = [hidden]
        for i in range(self.n_blocks):
            hidden = self._block_fn(stream.get(i + 1, order), hidden, sin, cos, bias,
                                    None if seed is None else model.block_seed(seed, i))
            stream.release(i + 1)
            boundaries.append(hidden)
        return sin, cos, bias, boundaries

    def _loss_sums(self, logits, labels, weights):
        cross_entropy = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32)
        return tf.reduce_sum(cross_entropy * weights), tf.reduce_sum(correct * weights)

    def evaluate_sums(self, features, labels) -> dict:
        """Forward only: {"loss", "correct", "tokens"} sums for one batch."""
        n = self.n_blocks
        stream = BlockStream(self.pieces, self.load, self.device, self.prefetch)
        with tf.device(self.device):
            _, _, _, boundaries = self._forward(stream, list(range(n + 2)), features["input_ids"], None)
            logits = self.model.head(stream.get(n + 1, [n + 1]), boundaries[-1])
            weights = loss_weights(features)
            loss_sum, correct = self._loss_sums(logits, labels, weights)
        return {"loss": loss_sum, "correct": correct, "tokens": tf.reduce_sum(weights)}

    def _micro_batch(self, features, labels, micro: int, sink, sums: dict) -> None:
        model, n = self.model, self.n_blocks
        stream = BlockStream(self.pieces, self.load, self.device, self.prefetch)
        backward_order = [n + 1] + list(range(n, -1, -1))
        seed = self._seed(micro)
        with tf.device(self.device):
            ids, weights = features["input_ids"], loss_weights(features)
            sin, cos, bias, boundaries = self._forward(stream, list(range(n + 2)), ids, seed)
            head = stream.get(n + 1, backward_order)
            with tf.GradientTape() as tape:
                tape.watch([boundaries[-1]] + tf.nest.flatten(head))
                logits = model.head(head, boundaries[-1])
                loss_sum, correct = self._loss_sums(logits, labels, weights)
                scaled = loss_sum * (self.loss_scale.scale / self.label_positions)
            head_grads, upstream = tape.gradient(scaled, [head, boundaries[-1]])
            sink(n + 1, head_grads)
            stream.release(n + 1)
            for i in range(n - 1, -1, -1):
                block_weights = stream.get(i + 1, backward_order)
                with tf.GradientTape() as tape:
                    tape.watch([boundaries[i]] + tf.nest.flatten(block_weights))
                    out = self._block_fn(block_weights, boundaries[i], sin, cos, bias, model.block_seed(seed, i))
                block_grads, upstream = tape.gradient(out, [block_weights, boundaries[i]],
                                                      output_gradients=upstream)
                sink(i + 1, block_grads)
                stream.release(i + 1)
                boundaries[i + 1] = None
            embedding = stream.get(0, backward_order)
            with tf.GradientTape() as tape:
                tape.watch(tf.nest.flatten(embedding))
                first = model.embed(embedding, ids, seed)
            sink(0, tape.gradient(first, embedding, output_gradients=upstream))
            stream.release(0)
        self.last_stream = stream
        self.last_activation_devices = [b.device for b in boundaries if b is not None] + [upstream.device]
        sums["loss"] += loss_sum
        sums["correct"] += correct
        sums["tokens"] += tf.reduce_sum(weights)

    def _piece_leaves(self, piece: int, piece_grads) -> list:
        """(host leaf, gradient) of a piece; sparse embedding gradients made dense."""
        return [(leaf, tf.convert_to_tensor(grad)) for leaf, grad in
                zip(tf.nest.flatten(self.pieces[piece]), tf.nest.flatten(piece_grads))]

    def __call__(self, features, labels) -> dict:
        accum = self.params.optimizer.grad_accum_steps
        grads: dict = {}
        written: set = set()

        def to_memory(piece, piece_grads):  # summed per variable: a tied embedding gets two
            for variable, grad in self._piece_leaves(piece, piece_grads):
                with tf.device(variable.device):
                    key = variable.ref()
                    grads[key] = tf.identity(grad) if key not in grads else grads[key] + grad

        def to_disk(piece, piece_grads):
            for path, grad in self._piece_leaves(piece, piece_grads):
                self.disk.store.add("grad", path, grad.numpy(), overwrite=path not in written)
                written.add(path)

        if self.disk is not None:
            self.disk.mark(clean=False)  # a kill from here on leaves the store to be rebuilt
        sums = {"loss": 0.0, "correct": 0.0, "tokens": 0.0}
        micro_features = {k: tf.split(v, accum, axis=0) for k, v in features.items()}
        micro_labels = tf.split(labels, accum, axis=0)
        for micro in range(accum):
            self._micro_batch({k: v[micro] for k, v in micro_features.items()}, micro_labels[micro],
                              micro, to_memory if self.disk is None else to_disk, sums)
        tokens = tf.maximum(sums["tokens"], 1.0)
        factor = self.label_positions / tokens / self.loss_scale.scale   # stored -> d(mean loss)
        loss_scale = tf.identity(self.loss_scale.scale)
        if self.disk is None:
            finite, grad_norm, learning_rate = self._apply_memory(grads, factor, sums)
        else:
            finite, grad_norm, learning_rate = self._apply_disk(float(factor), sums)
        self.loss_scale.update(finite)
        self.step.assign_add(1)
        if self.disk is not None:
            self.disk.state.update(step=int(self.step.numpy()), loss_scale=float(self.loss_scale.scale.numpy()),
                                   good_steps=int(self.loss_scale.good_steps.numpy()))
            self.disk.mark(clean=True)
        return {"loss": sums["loss"] / tokens, "accuracy": sums["correct"] / tokens, "tokens": sums["tokens"],
                "grad_norm": grad_norm, "learning_rate": learning_rate, "loss_scale": loss_scale,
                "finite": finite}

    def _apply_memory(self, grads: dict, factor, sums):
        ordered = [grads[v.ref()] * factor for v in self.variables]
        finite = all_finite(ordered + [sums["loss"]])
        grad_norm = tf.linalg.global_norm(ordered)
        max_norm = self.params.optimizer.max_gradient_norm
        if max_norm is not None:
            ordered, _ = tf.clip_by_global_norm(ordered, max_norm, use_norm=grad_norm)
        learning_rate = current_learning_rate(self.optimizer)
        if bool(finite):
            self.optimizer.apply_gradients(zip(ordered, self.variables))
        return finite, grad_norm, learning_rate

    def _apply_disk(self, factor: float, sums):
        disk = self.disk
        grad_norm, finite = disk.gradient_norm(factor)
        finite = finite and bool(np.isfinite(float(sums["loss"])))
        learning_rate = disk.learning_rate()
        max_norm = self.params.optimizer.max_gradient_norm
        if finite:
            clip = 1.0 if max_norm is None else max_norm / max(grad_norm, max_norm)
            disk.apply(factor * clip)
        return tf.constant(finite), tf.constant(grad_norm, tf.float32), tf.constant(learning_rate, tf.float32)
