"""Weight-streaming execution: train a model whose weights do not fit the compute device.

Weights and optimizer state live on the host: as tf.Variables on the host device
(`host_store: memory`) or as files (`host_store: disk`, runtime/host_store.py). A step runs the
model piece by piece on the compute device with the same layer code as standard execution
(`GPTJModel.trunk` walks embed and blocks, then `GPTJModel.head`), each piece compiled once per
shape (runtime/streamed_pieces.py) and its weights copied over just before it runs (the next
`prefetch_blocks` pieces are copied ahead, the one after is read on a host thread) and dropped
after:

  forward   embed, block 0..N-2, keeping only the activations at block boundaries
  tail      block N-1, LM head and loss, forward and backward in one compiled step (when
            prefetch_blocks >= 1 lets both be resident; else block N-1 runs in the forward and
            is recomputed like the others)
  backward  block N-2..0: copy the block again, recompute it from its input, take the
            weight gradients and the input gradient, move the weight gradients to the host
  embed     the embedding gradient from d(loss)/d(first activation)

Global-norm clipping needs every gradient before any update, so the step's gradients are
collected on the host first (one parameter-sized buffer, in RAM or on disk), then clipped
and applied there: by the same Keras optimizer over the same variables as standard
execution, compiled (memory), or by runtime/disk_streaming.py's Adam/AdamW/SGD on the files
(disk). Under mixed precision the float32 host weights are copied in the dtype their layer
computes with (bfloat16/float16 but LayerNorm's), so copies move half the bytes. `Timeline`
(runtime/timeline.py) records where each step's time goes.
"""
from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import tensorflow as tf

from config.params import Params, ParamsError
from layers.tree import flatten_weights, unflatten_weights
from model import GPTJModel, loss_weights
from runtime.compile_path import choose_compile_path, compile_function, device_type_of
from runtime.execution import CheckpointedExecution
from runtime.logging_utils import log
from runtime.loss_scale import LossScale
from runtime.steps import InMemoryUpdate, add_sums, dropout_seed, micro_batches, zero_sums
from runtime.streamed_pieces import StreamedPieces
from runtime.timeline import BACKGROUND_READ, BACKWARD, COPY, FORWARD, HEAD, HOST_UPDATE, WAIT, Timeline

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

    `read(index)` gives a piece's weights on the host in the dtypes they are copied in (a cast of
    the host variables, or a read of the disk store): it runs on the `reader` thread, one piece
    ahead of the device copies, so disk reads overlap compute. The device
    copies are made on the calling thread. `copies_made` and `max_resident` are kept so tests can
    check what crossed and what stayed."""

    def __init__(self, read, count: int, device: str, prefetch: int, reader: ThreadPoolExecutor,
                 timeline: Timeline):
        self.read, self.count, self.device, self.prefetch = read, count, device, prefetch
        self.reader, self.timeline = reader, timeline
        self.resident: dict[int, dict] = {}
        self.on_host: dict[int, Future] = {}
        self.copies_made = 0
        self.max_resident = 0

    def _request(self, index: int) -> None:
        if index < self.count and index not in self.resident and index not in self.on_host:
            self.on_host[index] = self.reader.submit(self._read, index)

    def _read(self, index: int) -> dict:
        with self.timeline.span(BACKGROUND_READ):
            return self.read(index)

    def _copy(self, index: int) -> None:
        if index < self.count and index not in self.resident:
            self._request(index)
            with self.timeline.span(WAIT):
                host = self.on_host.pop(index).result()
            with self.timeline.span(COPY), tf.device(self.device):
                self.resident[index] = tf.nest.map_structure(tf.identity, host)
            self.copies_made += 1
            self.max_resident = max(self.max_resident, len(self.resident))

    def get(self, index: int, order: list[int]) -> dict:
        """Piece `index` on the device; the next `prefetch` pieces of `order` are copied too, and
        the one after those is read on the host in the background."""
        self._copy(index)
        position = order.index(index)
        for ahead in order[position + 1: position + 1 + self.prefetch]:
            self._copy(ahead)
        for ahead in order[position + 1 + self.prefetch: position + 2 + self.prefetch]:
            self._request(ahead)
        return self.resident[index]

    def release(self, index: int) -> None:
        self.resident.pop(index, None)


class StreamedBlocks(Sequence):
    """The blocks' weights as a sequence whose items are copied to the compute device when indexed
    (`GPTJModel.trunk` walks it): block i is piece i + 1 of the stream."""

    def __init__(self, stream: BlockStream, order: list[int], count: int):
        self.stream, self.order, self.count = stream, order, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        return self.stream.get(index + 1, self.order)


class WeightStreamingStep:
    """The weight-streaming train step (the logs of runtime/steps.py) and a streamed forward for
    evaluation, over host-held weights, with compiled pieces (runtime/streamed_pieces.py).

    `load(leaf)` turns a host leaf into a float32 host tensor: a host variable (memory store) or a
    path in the disk store; `flat_leaves` maps weight paths to host leaves. `model` supplies the
    layer code; with the disk store it is a skeleton (one block, tiny vocabulary) whose own
    variables are never used: blocks differ only by their weights. `timeline` records where each
    step's time goes (runtime/timeline.py)."""

    def __init__(self, params: Params, model: GPTJModel, loss_scale: LossScale, step: tf.Variable,
                 label_positions: float, flat_leaves: dict, load):
        self.params, self.model = params, model
        self.loss_scale, self.step, self.label_positions = loss_scale, step, label_positions
        streaming = params.runconfig.weight_streaming
        self.device = compute_device_name(streaming.compute_device)
        self.prefetch = streaming.prefetch_blocks
        self.load = load
        self.pieces = split_pieces(unflatten_weights(flat_leaves), model.head_weight_names())
        # the dtype each leaf is copied in: the one its layer computes with (GPTJModel.weight_compute_dtype)
        self.copy_dtypes = split_pieces(unflatten_weights({path: model.weight_compute_dtype(path)
                                                           for path in flat_leaves}), model.head_weight_names())
        self.n_blocks = len(self.pieces) - 2
        self.timeline = Timeline()
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="weight-stream-reader")
        self.last_stream: BlockStream | None = None
        self.last_activation_devices: list[str] = []   # where the block outputs were computed
        self.compile_path = choose_compile_path(params.runconfig.jit_compile, params.model.compute_dtype,
                                                device_type_of(self.device))
        log(f"weight streaming pieces: {self.compile_path.describe()}")
        self.compiled = StreamedPieces(model, self.compile_path, label_positions)

    def _read_piece(self, index: int) -> dict:
        """Piece `index` on the host, each leaf cast to its copy dtype."""
        with tf.device(HOST_DEVICE):
            return tf.nest.map_structure(lambda leaf, dtype: tf.cast(self.load(leaf), dtype),
                                         self.pieces[index], self.copy_dtypes[index])

    def new_stream(self) -> BlockStream:
        return BlockStream(self._read_piece, len(self.pieces), self.device, self.prefetch, self.reader,
                           self.timeline)

    def _timed_block_forward(self, *args):
        with self.timeline.span(FORWARD):
            return self.compiled.block_forward(*args)

    def _forward(self, stream: BlockStream, order: list[int], ids, seed, blocks: int):
        """Embed and run the first `blocks` blocks; returns (sin, cos, bias, block-boundary activations)."""
        sin, cos, bias = self.model.attention_inputs(ids)
        boundaries = []

        def keep(index, hidden):           # the input of block index + 1; its weights can go
            boundaries.append(hidden)
            stream.release(index + 1)

        weights = {"embedding": stream.get(0, order)["embedding"],
                   "blocks": StreamedBlocks(stream, order, blocks)}
        with self.timeline.span(FORWARD):
            self.model.trunk(weights, ids, sin, cos, bias, dropout_seed=seed,
                             block_forward=self._timed_block_forward, on_hidden=keep)
        return sin, cos, bias, boundaries

    def evaluate_sums(self, features, labels) -> dict:
        """Forward only: loss_sums for one batch."""
        n = self.n_blocks
        stream = self.new_stream()
        with tf.device(self.device):
            _, _, _, boundaries = self._forward(stream, list(range(n + 2)), features["input_ids"], None, n)
            head = stream.get(n + 1, [n + 1])
            with self.timeline.span(HEAD):
                return self.compiled.head_sums(head, boundaries[-1], labels, loss_weights(features))

    def _micro_batch(self, features, labels, micro: int, sink) -> dict:
        """Forward, head and backward of one micro-batch; gradients go to sink(piece, grads).

        With prefetch_blocks >= 1 the last block and the head may be resident together: they run
        as one compiled step (`head_backward` with `last_block`), so the last block's forward runs
        once and only the other blocks are recomputed. With prefetch_blocks = 0 every block is."""
        model, n, compiled, timeline = self.model, self.n_blocks, self.compiled, self.timeline
        stream = self.new_stream()
        backward_order = [n + 1] + list(range(n, -1, -1))
        seed = dropout_seed(self.params.runconfig.seed, self.step.read_value(), 0, micro,   # the one replica
                            self.params.optimizer.grad_accum_steps)
        fused_last = self.prefetch >= 1 and n >= 1
        with tf.device(self.device):
            ids = features["input_ids"]
            sin, cos, bias, boundaries = self._forward(stream, list(range(n + 2)), ids, seed, n - fused_last)
            last_block = None
            if fused_last:
                last_block = (stream.get(n, [n, n + 1]), sin, cos, bias, model.block_seed(seed, n - 1))
            head = stream.get(n + 1, backward_order)
            with timeline.span(HEAD):
                sums, head_grads, last_grads, upstream = compiled.head_backward(
                    head, boundaries[-1], features, labels, self.loss_scale.scale.read_value(), last_block)
            stream.release(n + 1)
            sink(n + 1, head_grads)
            if fused_last:
                stream.release(n)
                sink(n, last_grads)
            for i in range(n - 1 - fused_last, -1, -1):
                block_weights = stream.get(i + 1, backward_order)
                with timeline.span(BACKWARD):
                    block_grads, upstream = compiled.block_backward(block_weights, boundaries[i], upstream,
                                                                    sin, cos, bias, model.block_seed(seed, i))
                stream.release(i + 1)
                sink(i + 1, block_grads)
                boundaries[i + 1] = None
            embedding = stream.get(0, backward_order)
            with timeline.span(BACKWARD):
                embedding_grads = compiled.embed_backward(embedding, ids, upstream, seed)
            stream.release(0)
            sink(0, embedding_grads)
        self.last_stream = stream
        self.last_activation_devices = [b.device for b in boundaries if b is not None] + [upstream.device]
        return sums

    def piece_leaves(self, piece: int, piece_grads) -> list:
        """(host leaf, float32 gradient on the compute device) of each weight of a piece."""
        return list(zip(tf.nest.flatten(self.pieces[piece]), tf.nest.flatten(piece_grads)))

    def gradients(self, features, labels, sink) -> dict:
        """Every micro-batch's gradients into sink(piece, grads); returns the summed loss_sums."""
        sums = zero_sums()
        parts = micro_batches(features, labels, self.params.optimizer.grad_accum_steps)
        for micro, (micro_features, micro_labels) in enumerate(parts):
            sums = add_sums(sums, self._micro_batch(micro_features, micro_labels, micro, sink))
        return sums


class MemoryStreamingExecution(CheckpointedExecution):
    """Weight streaming with `host_store: memory`: weights and optimizer state are tf.Variables
    on the host device, updated there by the same Keras optimizer as standard execution, in one
    compiled function (float32 arithmetic on the host, so its compile path is float32's there)."""

    def __init__(self, params: Params, model_dir: str, training: bool, model_fn, input_fn):
        check_streaming_params(params)
        super().__init__(params, model_dir, training, model_fn, input_fn, tf.distribute.get_strategy(),
                         tf.device(HOST_DEVICE))
        self.streamer = WeightStreamingStep(params, self.model, self.loss_scale, self.step, self.label_positions,
                                            flatten_weights(self.model.weights_tree()), lambda variable: variable)
        self.timeline = self.streamer.timeline
        host_path = choose_compile_path(params.runconfig.jit_compile, "float32", device_type_of(HOST_DEVICE))
        self._update = compile_function(self._apply_update, host_path)
        self._in_memory_update = InMemoryUpdate(self.optimizer, self.model.trainable_variables, self.loss_scale,
                                                self.label_positions, params.optimizer.max_gradient_norm,
                                                self.step) if training else None

    def _apply_update(self, grads: list, sums: dict) -> dict:
        with tf.device(HOST_DEVICE):
            return self._in_memory_update(grads, sums)

    def train_step(self, features, labels) -> dict:
        self.require_training()
        timeline = self.timeline
        timeline.start_step()
        grads: dict = {}

        def to_memory(piece, piece_grads):  # summed per variable: a tied embedding gets two
            with timeline.span(COPY):
                for variable, grad in self.streamer.piece_leaves(piece, piece_grads):
                    with tf.device(variable.device):
                        key = variable.ref()
                        grads[key] = tf.identity(grad) if key not in grads else grads[key] + grad

        sums = self.streamer.gradients(features, labels, to_memory)
        with timeline.span(HOST_UPDATE):
            logs = self._update([grads[v.ref()] for v in self.model.trainable_variables], sums)
        timeline.end_step()
        return logs

    def eval_sums(self, features, labels) -> dict:
        return self.streamer.evaluate_sums(features, labels)
