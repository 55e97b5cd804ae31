"""Weight streaming with `host_store: disk`: the training state lives in a DiskStore, and
checkpoints use the standard mode's exact layout, so runs move freely between the modes.

The optimizer cannot be Keras's here (its slots are tf.Variables in RAM), so it is applied
tensor by tensor, in row chunks, on the store's files, with the arithmetic of
keras.optimizers.Adam/AdamW/SGD written out in float32 (tested against them):

    Adam/AdamW:
    decay (AdamW, rank >= 2 only):  p -= p * weight_decay * lr
    m += (g - m) * (1 - beta1);  v += (g^2 - v) * (1 - beta2)
    p -= m * lr * sqrt(1 - beta2^t) / (1 - beta1^t) / (sqrt(v) + epsilon)     (t = update count)

    SGD:  m = m * momentum - g * lr;  p += m        (momentum > 0; the store's "m" holds it)
          p -= g * lr                               (momentum = 0: no slot)

Global-norm clipping: the backward pass leaves the step's gradients in the store, written by a
background thread that also sums each stored gradient's squares (so the norm and the finiteness
check need no pass over the files); then one pass applies the update with the clip factor. Checkpoint keys: `model/<path>`, `optimizer/state/N` (0: update
count, 1: the learning-rate variable when the rate is a number, then the slots per
variable in tf.Module order: Adam's momentum and velocity, SGD's momentum when
momentum > 0), `loss_scale/...`, `step`.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import tensorflow as tf

from checkpoint_utils.host_arrays import as_array, as_tensor
from checkpoint_utils.tf_checkpoint import (VALUE_SUFFIX, resolve_checkpoint, variable_shapes, write_checkpoint,
                                            write_checkpoint_state)
from config.params import Params
from model import GPTJModel, initial_values, weight_specs
from runtime.execution import Execution, no_weights_error
from runtime.host_store import CHUNK_BYTES, DiskStore
from runtime.logging_utils import log
from runtime.schedules import learning_rate_schedule
from runtime.steps import gradient_factor, step_logs
from runtime.timeline import BACKGROUND_UPDATE, BACKGROUND_WRITE, COPY, DISK, HOST_UPDATE, WAIT, Timeline
from runtime.weight_streaming import HOST_DEVICE, WeightStreamingStep, check_streaming_params

UPDATE_THREADS = 2          # tensors updated at once by the host optimizer
MAX_PENDING_PIECES = 1      # gradients of at most this many pieces wait for the writer


def skeleton_config(config):
    """The model object disk streaming builds for its layer code: one block, a tiny vocabulary
    (the streamed weights carry the real sizes; blocks differ only by their weights)."""
    return dataclasses.replace(config, num_hidden_layers=1, vocab_size=8)


def module_order(paths) -> list[str]:
    """Paths in tf.Module.trainable_variables order: attributes sorted by name at each level,
    list items by index (the order the Keras optimizer's slots follow)."""
    def key(path):
        return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.split("/"))
    return sorted(paths, key=key)


def slot_kinds(params: Params) -> tuple[str, ...]:
    """The store kinds holding the optimizer's slots, in Keras's per-variable order."""
    config = params.optimizer
    if config.optimizer_type == "sgd":
        return ("m",) if config.momentum != 0 else ()
    return ("m", "v")


def optimizer_state_keys(params: Params, paths_in_order: list[str]) -> list[tuple[str, str, str]]:
    """(checkpoint key, kind, path) of each optimizer state entry, as OptimizerState saves them."""
    keys = [(f"optimizer/state/0{VALUE_SUFFIX}", "iterations", "")]
    index = 1
    if not isinstance(params.optimizer.learning_rate, tuple):
        keys.append((f"optimizer/state/1{VALUE_SUFFIX}", "learning_rate", ""))
        index = 2
    for path in paths_in_order:
        for kind in slot_kinds(params):
            keys.append((f"optimizer/state/{index}{VALUE_SUFFIX}", kind, path))
            index += 1
    return keys


class DiskStreamingState:
    """The store, its checkpoints and the host-side optimizer of disk weight streaming."""

    def __init__(self, params: Params, model_dir: str):
        self.params = params
        self.model_dir = model_dir
        self.specs = weight_specs(params.model)
        self.shapes = {s.path: s.shape for s in self.specs}
        directory = params.runconfig.weight_streaming.store_dir or os.path.join(model_dir, "weight_store")
        self.store = DiskStore(directory, self.shapes)
        self.order = module_order(self.shapes)
        self.schedule = learning_rate_schedule(params.optimizer)
        self.state = {"step": 0, "iterations": 0, "loss_scale": 1.0, "good_steps": 0}

    # ---- state and checkpoints ------------------------------------------------------------

    def open(self, initial_loss_scale: float) -> None:
        """Create the store from the model's initial values, or reopen it."""
        if self.store.exists():
            self.state = self.store.read_state()
            return
        self.state = {"step": 0, "iterations": 0, "loss_scale": initial_loss_scale, "good_steps": 0,
                      "clean": True}
        self.store.create(((spec.path, value) for spec, value in
                           initial_values(self.params.model, self.params.runconfig.seed)), self.state)

    def mark(self, clean: bool) -> None:
        self.state["clean"] = clean
        self.store.write_state(self.state)

    def restore(self, prefix: str, weights_only: bool = False) -> None:
        """Load a checkpoint (either mode's) into the store, one tensor at a time (the store is
        marked dirty first: a read that fails half way leaves it to be rebuilt)."""
        if not weights_only:
            self.mark(clean=False)
        reader = tf.train.load_checkpoint(prefix)
        found = variable_shapes(prefix)
        for path in self.order:
            if path in found:
                self.store.write("param", path, reader.get_tensor(f"model/{path}{VALUE_SUFFIX}"))
        if weights_only:
            return
        for key, kind, path in optimizer_state_keys(self.params, self.order):
            value = reader.get_tensor(key)
            if kind == "iterations":
                self.state["iterations"] = int(value)
            elif kind in ("m", "v"):
                self.store.write(kind, path, value)
        self.state["step"] = int(reader.get_tensor(f"step{VALUE_SUFFIX}"))
        self.state["loss_scale"] = float(reader.get_tensor(f"loss_scale/scale{VALUE_SUFFIX}"))
        self.state["good_steps"] = int(reader.get_tensor(f"loss_scale/good_steps{VALUE_SUFFIX}"))
        self.mark(clean=True)

    def save(self, keep: int, dropped: list[str] = ()) -> str:
        """ckpt-<step> in model_dir with the standard layout; keeps the newest `keep` (0: all) of the
        listed checkpoints, leaving `dropped` ones (broken, passed over by restore) out of the list."""
        step = self.state["step"]
        name = f"ckpt-{step}"
        lr = self.learning_rate()

        def tensors():
            for path in self.order:
                yield f"model/{path}", self.store.read("param", path)
            for key, kind, path in optimizer_state_keys(self.params, self.order):
                short = key[:-len(VALUE_SUFFIX)]
                if kind == "iterations":
                    yield short, np.array(self.state["iterations"], np.int64)
                elif kind == "learning_rate":
                    yield short, np.array(lr, np.float32)
                else:
                    yield short, self.store.read(kind, path)
            yield "loss_scale/scale", np.array(self.state["loss_scale"], np.float32)
            yield "loss_scale/good_steps", np.array(self.state["good_steps"], np.int64)
            yield "step", np.array(step, np.int64)

        write_checkpoint(os.path.join(self.model_dir, name), tensors(), root="")
        dropped_names = {os.path.basename(prefix) for prefix in dropped}
        kept = [n for n in _checkpoint_names(self.model_dir) if n not in dropped_names] + [name]
        kept = sorted(set(kept), key=lambda n: int(n.split("-")[1]))
        if keep:
            for old in kept[:-keep]:
                for file in os.listdir(self.model_dir):
                    if file.startswith(old + "."):
                        os.unlink(os.path.join(self.model_dir, file))
            kept = kept[-keep:]
        write_checkpoint_state(self.model_dir, name, all_names=kept)
        return os.path.join(self.model_dir, name)

    # ---- the update -----------------------------------------------------------------------

    def learning_rate(self) -> float:
        schedule = self.schedule
        return float(schedule(tf.constant(self.state["iterations"]))) if callable(schedule) else schedule

    def apply(self, factor: float, timeline: Timeline) -> None:
        """The optimizer's update of every tensor with gradient = factor * stored gradient, on
        UPDATE_THREADS threads (NumPy and file I/O release the GIL, so one thread's arithmetic
        overlaps another's reads and writes)."""
        update = self._sgd_update if self.params.optimizer.optimizer_type == "sgd" else self._adam_update
        tensor_update = update(np.float32(factor))

        def run(path):
            with timeline.span(BACKGROUND_UPDATE):
                tensor_update(path)

        with ThreadPoolExecutor(UPDATE_THREADS, thread_name_prefix="disk-optimizer") as pool:
            list(pool.map(run, self.order))
        self.state["iterations"] += 1

    def _sgd_update(self, factor: np.float32):
        lr = np.float32(self.learning_rate())
        momentum = np.float32(self.params.optimizer.momentum)
        has_slot = "m" in slot_kinds(self.params)            # without momentum "m" is never touched

        def chunk(c):
            g = c["grad"] * factor
            if has_slot:
                c["m"][...] = c["m"] * momentum - g * lr
                c["param"] += c["m"]
            else:
                c["param"] -= g * lr

        kinds = ("param", "grad", "m") if has_slot else ("param", "grad")
        changed = ("param", "m") if has_slot else ("param",)
        return lambda path: self.store.update_in_chunks(path, kinds, changed, chunk)

    def _adam_update(self, factor: np.float32):
        config = self.params.optimizer
        lr = np.float32(self.learning_rate())
        t = np.float32(self.state["iterations"] + 1)
        beta1, beta2 = np.float32(config.beta1), np.float32(config.beta2)
        alpha = lr * np.sqrt(np.float32(1) - beta2 ** t) / (np.float32(1) - beta1 ** t)
        decay = np.float32(config.weight_decay_rate) * lr if config.optimizer_type == "adamw" else None

        def chunk(c, decays):
            p, m, v, g = c["param"], c["m"], c["v"], c["grad"] * factor
            if decays:
                p -= p * decay
            m += (g - m) * (np.float32(1) - beta1)
            v += (np.square(g) - v) * (np.float32(1) - beta2)
            p -= (m * alpha) / (np.sqrt(v) + np.float32(config.epsilon))

        def tensor(path):
            decays = decay is not None and decay != 0 and len(self.shapes[path]) >= 2
            self.store.update_in_chunks(path, ("param", "m", "v", "grad"), ("param", "m", "v"),
                                        lambda c: chunk(c, decays))
        return tensor


class GradientWriter:
    """Writes a step's gradients into the store on a background thread, so the writes overlap
    the backward pass, and keeps each stored gradient's sum of squares: the global norm is known
    when the last write ends, without reading the gradients back. At most `MAX_PENDING_PIECES`
    pieces wait in memory; the backward pass waits (timeline: waiting) when the disk is slower."""

    def __init__(self, store: DiskStore, timeline: Timeline):
        self.store, self.timeline = store, timeline
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="gradient-writer")
        self.pending: collections.deque[Future] = collections.deque()
        self.squares: dict[str, float] = {}
        self.written: set[str] = set()

    def start_step(self) -> None:
        self.squares.clear()
        self.written.clear()

    def submit(self, leaves: list[tuple[str, np.ndarray]]) -> None:
        """One piece's (path, gradient) pairs; a path seen before this step is summed into (tied
        embedding, accumulated micro-batches), else overwritten."""
        while len(self.pending) >= MAX_PENDING_PIECES:
            with self.timeline.span(WAIT):
                self.pending.popleft().result()
        jobs = []
        for path, grad in leaves:
            jobs.append((path, grad, path not in self.written))
            self.written.add(path)
        self.pending.append(self.thread.submit(self._write, jobs))

    def _write(self, jobs) -> None:
        with self.timeline.span(BACKGROUND_WRITE):
            for path, grad, overwrite in jobs:
                stored = self.store.add("grad", path, grad, overwrite=overwrite)
                self.squares[path] = sum_of_squares(stored)

    def finish(self) -> None:
        """Wait for every write of the step."""
        while self.pending:
            with self.timeline.span(WAIT):
                self.pending.popleft().result()

    def global_norm(self, factor: float) -> tuple[float, bool]:
        """(global norm of factor * the step's gradients, all finite)."""
        norm = math.sqrt(sum(self.squares.values())) * factor
        return norm, math.isfinite(norm)


def sum_of_squares(array: np.ndarray) -> float:
    """Sum of squares in float64, in slices of about CHUNK_BYTES (no array-sized temporary);
    not finite when an entry is not."""
    flat = array.reshape(-1)
    step = max(1, CHUNK_BYTES // 8)
    total = 0.0
    for start in range(0, flat.size, step):
        chunk = flat[start:start + step].astype(np.float64)
        total += float(np.dot(chunk, chunk))
    return total


def _checkpoint_names(model_dir: str) -> list[str]:
    state = tf.train.get_checkpoint_state(model_dir)
    if state is None:
        return []
    return [os.path.basename(p) for p in state.all_model_checkpoint_paths]



class DiskStreamingExecution(Execution):
    """Weight streaming with `host_store: disk`: the state lives in a DiskStreamingState; the
    model object only lends its layer code. The store holds Adam's slots on disk whether or
    not the run trains (sparse files: they cost no memory)."""

    def __init__(self, params: Params, model_dir: str, training: bool, model_fn, input_fn):
        check_streaming_params(params)
        super().__init__(params, model_dir, training, model_fn, input_fn)
        self.strategy = tf.distribute.get_strategy()
        self.disk = DiskStreamingState(params, model_dir)
        with tf.device(HOST_DEVICE):
            self.model = GPTJModel(skeleton_config(params.model))
            self.loss_scale = self.new_loss_scale()
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self.streamer = WeightStreamingStep(params, self.model, self.loss_scale, self.step, self.label_positions,
                                            {path: path for path in self.disk.shapes},
                                            lambda path: as_tensor(self.disk.store.read("param", path)))
        self.timeline = self.streamer.timeline
        self.writer = GradientWriter(self.disk.store, self.timeline)

    def restore(self, require: bool) -> int:
        """The store is the live state; it is rebuilt from model_dir's newest whole checkpoint when it
        is not exactly that checkpoint's state (a kill mid-step, or newer)."""
        disk = self.disk
        initial_loss_scale = float(self.loss_scale.scale.numpy())

        def load(prefix: str) -> None:
            disk.open(initial_loss_scale)
            if not disk.state.get("clean") or int(prefix.rsplit("-", 1)[1]) != disk.state["step"]:
                disk.restore(prefix)
                log(f"restored {prefix} into the weight store {disk.store.directory} (step {disk.state['step']})")
            else:
                log(f"weight store {disk.store.directory} is at {prefix} (step {disk.state['step']})")

        if self.restore_latest(load) is None:
            disk.open(initial_loss_scale)
            if self.params.runconfig.checkpoint_path and disk.state["step"] == 0:
                disk.restore(resolve_checkpoint(self.params.runconfig.checkpoint_path), weights_only=True)
                log(f"warm start: weights from {self.params.runconfig.checkpoint_path} into {disk.store.directory}")
            elif require:
                raise no_weights_error(self.model_dir)
        self.step.assign(disk.state["step"])
        self.loss_scale.scale.assign(disk.state["loss_scale"])
        self.loss_scale.good_steps.assign(disk.state["good_steps"])
        return disk.state["step"]

    def save(self) -> str:
        self.require_training()
        self._latest = self.disk.save(self.params.runconfig.keep_checkpoint_max, dropped=self.unusable)
        self.unusable = []
        return self._latest

    def train_step(self, features, labels) -> dict:
        self.require_training()
        disk, writer, timeline = self.disk, self.writer, self.timeline
        timeline.start_step()
        writer.start_step()

        def to_disk(piece, piece_grads):
            with timeline.span(COPY), tf.device(HOST_DEVICE):
                leaves = [(path, as_array(tf.identity(grad)))
                          for path, grad in self.streamer.piece_leaves(piece, piece_grads)]
            writer.submit(leaves)

        with timeline.span(DISK):
            disk.mark(clean=False)  # a kill from here on leaves the store to be rebuilt
        sums = self.streamer.gradients(features, labels, to_disk)
        writer.finish()
        factor = float(gradient_factor(sums, self.loss_scale, self.label_positions))
        loss_scale_value = tf.identity(self.loss_scale.scale)
        grad_norm, finite = writer.global_norm(factor)
        finite = finite and bool(np.isfinite(float(sums["loss"])))
        learning_rate = disk.learning_rate()
        max_norm = self.params.optimizer.max_gradient_norm
        if finite:
            with timeline.span(HOST_UPDATE):
                disk.apply(factor * (1.0 if max_norm is None else max_norm / max(grad_norm, max_norm)), timeline)
        self.loss_scale.update(tf.constant(finite))
        self.step.assign_add(1)
        disk.state.update(step=int(self.step.numpy()), loss_scale=float(self.loss_scale.scale.numpy()),
                          good_steps=int(self.loss_scale.good_steps.numpy()))
        with timeline.span(DISK):
            disk.mark(clean=True)
        timeline.end_step()
        return step_logs(sums, tf.constant(grad_norm, tf.float32), tf.constant(learning_rate, tf.float32),
                         loss_scale_value, tf.constant(finite))

    def eval_sums(self, features, labels) -> dict:
        return self.streamer.evaluate_sums(features, labels)
