"""The model_fn/input_fn estimator, on TF2: tf.function steps, tf.distribute, CheckpointManager.

`tf.estimator` is gone from TensorFlow; this keeps its contract. The estimator owns the
model (built once from params), the optimizer, the loss scale, the step counter, the
checkpoints and the summaries; `model_fn` computes loss and metrics, `input_fn` gives data.

Checkpoint state: model, optimizer (slots, iterations), loss scale and `step`, the number of
global batches consumed. The step is also the data position: a resumed run asks input_fn to
start after that many batches, and dropout masks derive from (seed, step), so a run killed
at any moment and restarted continues exactly as an uninterrupted one would.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from typing import Callable, Iterator

import numpy as np
import tensorflow as tf

import data as data_module
import model as model_module
from input.errors import InputDataError
from config import modes
from runtime.distribution import make_strategy
from config.files import atomic_write_text
from runtime.flops import FlopsCounter
from runtime.logging_utils import ProgressLine, log
from runtime.loss_scale import LossScale, all_finite
from runtime.optimizer import build_optimizer, current_learning_rate
from config.params import Params, ParamsError, save_params
from checkpoint_utils.tf_checkpoint import resolve_checkpoint
from runtime.warm_start import warm_start
from runtime.disk_streaming import DiskStreamingState, skeleton_config
from runtime.weight_streaming import HOST_DEVICE, WeightStreamingStep, check_streaming_params


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss or gradient that loss scaling does not handle."""


class InputExhaustedError(RuntimeError):
    """The training input ran out before max_steps."""


def _truncate_metrics(path: str, step: int) -> None:
    """Drop lines logged after the checkpoint a run resumes from: the resumed run logs them again."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(lines))


def _next_batch(iterator):
    """The next batch; a data check failing inside tf.data becomes one InputDataError whose
    message is the check's own (it names the file and the fix), without TF's wrapping."""
    try:
        return next(iterator)
    except tf.errors.InvalidArgumentError as err:
        found = re.search(r"assertion failed: \[(.*?)\]\n", err.message + "\n", re.S)
        raise InputDataError(found.group(1) if found else err.message.split("\n")[0]) from None


class OptimizerState(tf.Module):
    """The optimizer's own variables (update count, learning-rate variable, slots) for checkpoints.

    Checkpointing the Keras optimizer object itself would also save the model's weights under
    `optimizer/_trainable_variables/N` (the first path a breadth-first walk finds), so a run's
    checkpoint would not hold `model/<path>` keys for warm start, export and load_model."""

    def __init__(self, optimizer):
        super().__init__(name="optimizer_state")
        self.state = list(optimizer.variables)


class Estimator:
    def __init__(self, params: Params, model_dir: str, model_fn: Callable = model_module.model_fn,
                 input_fn: Callable = data_module.input_fn):
        self.params = params
        self.model_dir = model_dir
        self.model_fn = model_fn
        self.input_fn = input_fn
        run = params.runconfig
        self.streaming = run.execution == "weight_streaming"
        if run.deterministic:
            tf.config.experimental.enable_op_determinism()
        os.makedirs(model_dir, exist_ok=True)
        if self.streaming:
            check_streaming_params(params)
            # Weights and optimizer state on the host; blocks are copied to the compute device.
            self.strategy, placement = tf.distribute.get_strategy(), tf.device(HOST_DEVICE)
        else:
            self.strategy = make_strategy(run)
            placement = self.strategy.scope()
        self.disk = None
        with placement:
            if self.streaming and run.weight_streaming.host_store == "disk":
                # The state lives in files; the model object only lends its layer code.
                self.disk = DiskStreamingState(params, model_dir)
                self.model = model_module.GPTJModel(skeleton_config(params.model))
                self.optimizer = None
            else:
                self.model = model_module.build_model(params)
                self.optimizer = build_optimizer(params.optimizer, self.model.trainable_variables)
            fp16 = params.model.mixed_precision and params.model.mixed_precision_dtype == "float16"
            self.loss_scale = LossScale(params.optimizer, enabled=fp16)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        if self.disk is None:
            self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=OptimizerState(self.optimizer),
                                                  loss_scale=self.loss_scale, step=self.step)
            self.manager = tf.train.CheckpointManager(
                self.checkpoint, model_dir, max_to_keep=run.keep_checkpoint_max or None,
                step_counter=self.step, checkpoint_name="ckpt")
        self._writers: dict[str, tf.summary.SummaryWriter] = {}
        train = params.train_input
        self._label_positions = float(train.batch_size * train.max_sequence_length) if train else 1.0
        self._train_step = None
        self._eval_step = None
        self._streamer: WeightStreamingStep | None = None
        self._restore_message: str | None = None

    # ---- state ---------------------------------------------------------------------------

    def restore(self, require: bool = False) -> int:
        """Resume from model_dir's latest checkpoint, else warm start from
        runconfig.checkpoint_path (weights only), else keep the fresh initialisation
        (an error when `require`: evaluating random weights is never what was meant)."""
        if self.disk is not None:
            return self._restore_disk(require)
        latest = self.manager.latest_checkpoint
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
            ignored = (f"; runconfig.checkpoint_path {self.params.runconfig.checkpoint_path} is not used "
                       "when model_dir has a checkpoint") if self.params.runconfig.checkpoint_path else ""
            self._log_restore(f"restored {latest} (step {int(self.step.numpy())}){ignored}")
        elif self.params.runconfig.checkpoint_path:
            report = warm_start(self.model, self.params.model, self.params.runconfig.checkpoint_path)
            self._log_restore(report.summary())
        elif require:
            raise FileNotFoundError(f"model_dir {self.model_dir} holds no checkpoint and no --checkpoint_path "
                                    "was given; train first, or pass the run's --model_dir or --checkpoint_path")
        else:
            self._log_restore(f"no checkpoint in {self.model_dir} and no runconfig.checkpoint_path: "
                              f"starting from a fresh initialisation (seed {self.params.runconfig.seed})")
        return int(self.step.numpy())

    def _log_restore(self, message: str) -> None:
        """Say where the weights came from, unless it was just said: train_and_evaluate (and the
        demo) call restore() before train(), which restores again into the same state."""
        if message != self._restore_message:
            log(message)
        self._restore_message = message

    def _restore_disk(self, require: bool) -> int:
        """Disk weight streaming: the store is the live state; it is rebuilt from the latest
        checkpoint when it is not exactly that checkpoint's state (a kill mid-step, or newer)."""
        disk = self.disk
        disk.open(initial_loss_scale=float(self.loss_scale.scale.numpy()))
        latest = self.latest_checkpoint
        if latest and (not disk.state.get("clean") or int(latest.rsplit("-", 1)[1]) != disk.state["step"]):
            disk.restore(latest)
            log(f"restored {latest} into the weight store {disk.store.directory} (step {disk.state['step']})")
        elif latest:
            log(f"weight store {disk.store.directory} is at {latest} (step {disk.state['step']})")
        elif self.params.runconfig.checkpoint_path and disk.state["step"] == 0:
            disk.restore(resolve_checkpoint(self.params.runconfig.checkpoint_path), weights_only=True)
            log(f"warm start: weights from {self.params.runconfig.checkpoint_path} into {disk.store.directory}")
        elif require:
            raise FileNotFoundError(f"model_dir {self.model_dir} holds no checkpoint and no --checkpoint_path "
                                    "was given; train first, or pass the run's --model_dir or --checkpoint_path")
        self.step.assign(disk.state["step"])
        self.loss_scale.scale.assign(disk.state["loss_scale"])
        self.loss_scale.good_steps.assign(disk.state["good_steps"])
        return disk.state["step"]

    @property
    def latest_checkpoint(self) -> str | None:
        return tf.train.latest_checkpoint(self.model_dir)

    def save(self) -> str:
        """Write a checkpoint (TF writes it under a temp name and renames, then rewrites the
        `checkpoint` state file atomically: a kill leaves the previous one usable)."""
        if self.disk is not None:
            return self.disk.save(self.params.runconfig.keep_checkpoint_max)
        return self.manager.save(checkpoint_number=int(self.step.numpy()))

    def _writer(self, name: str) -> tf.summary.SummaryWriter:
        if name not in self._writers:
            self._writers[name] = tf.summary.create_file_writer(os.path.join(self.model_dir, name))
        return self._writers[name]

    def _distributed_dataset(self, mode: str, position: int):
        def dataset_fn(context: tf.distribute.InputContext):
            per_pipeline = context.num_replicas_in_sync // context.num_input_pipelines
            return self.input_fn(self.params, mode, context, data_position=position * per_pipeline)
        return self.strategy.distribute_datasets_from_function(dataset_fn)

    # ---- training --------------------------------------------------------------------------

    def _replica_grads(self, features, labels, step):
        """Per replica: gradients of the summed (scaled) loss over grad_accum_steps micro-batches."""
        accum = self.params.optimizer.grad_accum_steps
        variables = self.model.trainable_variables
        context = tf.distribute.get_replica_context()
        seed = tf.stack([tf.cast(self.params.runconfig.seed, tf.int64), step])
        seed = tf.random.experimental.stateless_fold_in(seed, context.replica_id_in_sync_group)
        grads = [tf.zeros_like(v) for v in variables]
        sums = {"loss": 0.0, "correct": 0.0, "tokens": 0.0}
        micro_features = {k: tf.split(v, accum, axis=0) for k, v in features.items()}
        micro_labels = tf.split(labels, accum, axis=0)
        for i in range(accum):
            with tf.GradientTape() as tape:
                spec = self.model_fn({k: v[i] for k, v in micro_features.items()}, micro_labels[i],
                                     modes.TRAIN, self.params, self.model,
                                     dropout_seed=tf.random.experimental.stateless_fold_in(seed, i))
                # Differentiate the loss summed over tokens, divided by the batch's label positions
                # (a constant): gradients keep the size of a mean loss's, which float16 loss
                # scaling expects; train_step rescales to the mean over counted tokens.
                scaled = spec.sums["loss"] * (self.loss_scale.scale / self._label_positions)
            grads = [g + d for g, d in zip(grads, tape.gradient(scaled, variables))]
            sums = {k: sums[k] + spec.sums[k] for k in sums}
        return grads, sums

    def _streaming_step(self) -> WeightStreamingStep:
        if self._streamer is None:
            self._streamer = WeightStreamingStep(self.params, self.model, self.optimizer, self.loss_scale,
                                                 self.step, self._label_positions, self.disk)
        return self._streamer

    def _build_train_step(self):
        if self.streaming:
            return self._streaming_step()
        strategy, optimizer = self.strategy, self.optimizer
        max_norm = self.params.optimizer.max_gradient_norm
        variables = self.model.trainable_variables

        def train_step(features, labels):
            grads, sums = strategy.run(self._replica_grads, args=(features, labels, self.step))
            grads = [strategy.reduce(tf.distribute.ReduceOp.SUM, g, axis=None) for g in grads]
            sums = {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in sums.items()}
            tokens = tf.maximum(sums["tokens"], 1.0)
            # d(mean loss) = d(sum of losses) / counted tokens, over every micro-batch and replica.
            grads = self.loss_scale.unscale([g * (self._label_positions / tokens) for g in grads])
            finite = all_finite(grads + [sums["loss"]])
            grad_norm = tf.linalg.global_norm(grads)
            if max_norm is not None:
                grads, _ = tf.clip_by_global_norm(grads, max_norm, use_norm=grad_norm)
            learning_rate = current_learning_rate(optimizer)

            def apply():
                optimizer.apply_gradients(zip(grads, variables))
                return tf.constant(True)

            tf.cond(finite, apply, lambda: tf.constant(False))
            loss_scale = tf.identity(self.loss_scale.scale)
            self.loss_scale.update(finite)
            self.step.assign_add(1)
            return {"loss": sums["loss"] / tokens, "accuracy": sums["correct"] / tokens,
                    "tokens": sums["tokens"], "grad_norm": grad_norm, "learning_rate": learning_rate,
                    "loss_scale": loss_scale, "finite": finite}

        return tf.function(train_step, jit_compile=self.params.runconfig.jit_compile or None)

    def _check_batch(self, mode: str) -> None:
        section = self.params.train_input if mode == modes.TRAIN else self.params.eval_input
        replicas = self.strategy.num_replicas_in_sync
        accum = self.params.optimizer.grad_accum_steps
        if mode == modes.TRAIN and section.batch_size % (replicas * accum):
            raise ParamsError(f"train_input.batch_size={section.batch_size} must be divisible by "
                              f"replicas ({replicas}) x optimizer.grad_accum_steps ({accum})")
        if mode == modes.TRAIN and not section.drop_remainder:
            raise ParamsError("train_input.drop_remainder must be true (every step needs a full batch)")

    def train(self, max_steps: int | None = None, on_step: Callable[[int, dict], None] | None = None) -> dict:
        """Train until `max_steps` (runconfig.max_steps by default); returns the last step's logs."""
        run = self.params.runconfig
        max_steps = max_steps or run.max_steps
        if max_steps is None:
            raise ParamsError("training needs runconfig.max_steps (or --max_steps)")
        self._check_batch(modes.TRAIN)
        save_params(self.params, os.path.join(self.model_dir, "params.yaml"))
        start = self.restore()
        if start >= max_steps:
            log(f"model_dir {self.model_dir} is already at step {start} >= max_steps {max_steps}; nothing to train")
            return {}
        if self._train_step is None:
            self._train_step = self._build_train_step()
        iterator = iter(self._distributed_dataset(modes.TRAIN, start))
        flops = FlopsCounter(self.params)
        progress = ProgressLine(start, max_steps)
        metrics_path = os.path.join(self.model_dir, "train_metrics.jsonl")
        _truncate_metrics(metrics_path, start)
        try:
            logs = self._train_loop(iterator, start, max_steps, flops, progress, metrics_path, on_step)
        except KeyboardInterrupt:
            path = self.save()
            log(f"interrupted: saved {path} (step {int(self.step.numpy())}); the same command resumes from it")
            raise
        progress.close()
        return logs

    def _train_loop(self, iterator, start, max_steps, flops, progress, metrics_path, on_step) -> dict:
        run = self.params.runconfig
        logs: dict = {}
        window_start, window_tokens = time.time(), 0.0
        # The loop runs outside strategy.scope(): in cross-replica context the Keras optimizer
        # then applies the already-reduced gradients once (inside the scope it would all-reduce
        # them again, or need a replica context for merge_call).
        for step in range(start + 1, max_steps + 1):
            try:
                features, labels = _next_batch(iterator)
            except StopIteration:
                raise InputExhaustedError(
                    f"train input ran out at step {step} of {max_steps}; set train_input.repeat: true "
                    "or lower max_steps") from None
            logs = {k: v.numpy().item() for k, v in self._train_step(features, labels).items()}
            window_tokens += logs["tokens"]
            if not logs["finite"]:
                if self.loss_scale.dynamic:
                    log(f"step {step}: non-finite gradients at loss scale {logs['loss_scale']:g}; "
                        "update skipped, scale halved")
                else:
                    raise NonFiniteLossError(
                        f"loss or gradients are not finite at step {step} (loss={logs['loss']}); the update "
                        f"was not applied and the last good checkpoint is kept "
                        f"({self.latest_checkpoint or 'none yet'}); lower optimizer.learning_rate, "
                        "set optimizer.max_gradient_norm, or use loss_scaling_factor: dynamic with float16")
            if on_step is not None:
                on_step(step, logs)
            if step % run.log_steps == 0 or step == max_steps:
                elapsed = max(time.time() - window_start, 1e-9)
                logs["tokens_per_sec"] = window_tokens / elapsed
                logs["mfu"] = flops.utilisation(logs["tokens_per_sec"])
                progress.update(step, logs)
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": step, **{k: logs[k] for k in (
                        "loss", "accuracy", "learning_rate", "grad_norm", "loss_scale", "tokens_per_sec")}}) + "\n")
                window_start, window_tokens = time.time(), 0.0
            if step % run.save_summary_steps == 0:
                self._write_train_summaries(step, logs)
            if step % run.save_checkpoints_steps == 0 or step == max_steps:
                self.save()
        return logs

    def _write_train_summaries(self, step: int, logs: dict) -> None:
        with self._writer("train").as_default(step=step):
            for name in ("loss", "accuracy", "learning_rate", "grad_norm", "loss_scale", "tokens_per_sec", "mfu"):
                if name in logs and logs[name] is not None:
                    tf.summary.scalar(name, logs[name])

    # ---- evaluation ------------------------------------------------------------------------

    def _build_eval_step(self):
        if self.streaming:
            return self._streaming_step().evaluate_sums

        def replica_eval(features, labels):
            return self.model_fn(features, labels, modes.EVAL, self.params, self.model).sums

        def eval_step(features, labels):
            sums = self.strategy.run(replica_eval, args=(features, labels))
            return {k: self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in sums.items()}

        return tf.function(eval_step, jit_compile=self.params.runconfig.jit_compile or None)

    def evaluate(self, steps: int | None = None, restore: bool = True) -> dict:
        """Loss, perplexity and token accuracy over the eval input (all of it, or `steps` batches).
        Written to TensorBoard (model_dir/eval) and model_dir/eval_results.json."""
        steps = steps or self.params.runconfig.eval_steps
        if restore:
            self.restore(require=True)
        if self._eval_step is None:
            self._eval_step = self._build_eval_step()
        totals = {"loss": 0.0, "correct": 0.0, "tokens": 0.0}
        batches = 0
        start = time.time()
        iterator = iter(self._distributed_dataset(modes.EVAL, 0))
        with self.strategy.scope():
            while True:
                try:
                    features, labels = _next_batch(iterator)
                except StopIteration:
                    break
                sums = self._eval_step(features, labels)
                totals = {k: totals[k] + float(sums[k].numpy()) for k in totals}
                batches += 1
                if steps is not None and batches >= steps:
                    break
        if totals["tokens"] == 0:
            raise ValueError("the eval input produced no counted tokens; check eval_input.data_dir")
        loss = totals["loss"] / totals["tokens"]
        step = int(self.step.numpy())
        results = {"step": step, "loss": loss, "perplexity": math.exp(min(loss, 700.0)),
                   "accuracy": totals["correct"] / totals["tokens"], "tokens": int(totals["tokens"]),
                   "batches": batches, "seconds": time.time() - start}
        with self._writer("eval").as_default(step=step):
            for name in ("loss", "perplexity", "accuracy"):
                tf.summary.scalar(name, results[name])
        self._record_eval(results)
        log(f"eval at step {step}: loss {loss:.4f}, perplexity {results['perplexity']:.2f}, "
            f"accuracy {results['accuracy']:.4f} over {results['tokens']:,} tokens; results in "
            f"{os.path.join(self.model_dir, 'eval_results.json')} and TensorBoard {os.path.join(self.model_dir, 'eval')}")
        return results

    def _record_eval(self, results: dict) -> None:
        """eval_results.json: the latest result plus the history, rewritten atomically."""
        path = os.path.join(self.model_dir, "eval_results.json")
        history = []
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                history = json.load(f).get("history", [])
        history = [h for h in history if h["step"] != results["step"]] + [results]
        atomic_write_text(path, json.dumps({"latest": results, "history": history}, indent=2))

    def train_and_evaluate(self, max_steps: int | None = None) -> dict:
        """Train, evaluating every runconfig.eval_every_steps and at the end."""
        run = self.params.runconfig
        max_steps = max_steps or run.max_steps
        if max_steps is None:
            raise ParamsError("train_and_eval needs runconfig.max_steps (or --max_steps)")
        every = run.eval_every_steps or max_steps
        current = self.restore()
        results = {}
        while current < max_steps:
            target = min(max_steps, (current // every + 1) * every)
            self.train(target)
            current = int(self.step.numpy())
            results = self.evaluate(restore=False)
        return results or self.evaluate(restore=False)

    # ---- prediction ------------------------------------------------------------------------

    def predict(self, steps: int | None = None) -> Iterator[dict]:
        """Per eval-input batch: {"token_ids": argmax next-token ids [b, s], "input_ids"} as NumPy."""
        self.restore(require=True)
        model = self.model

        @tf.function
        def predict_step(features):
            return self.model_fn(features, None, modes.PREDICT, self.params, model).predictions["token_ids"]

        for i, (features, _) in enumerate(self.input_fn(self.params, modes.PREDICT)):
            if steps is not None and i >= steps:
                return
            yield {"input_ids": features["input_ids"].numpy(), "token_ids": predict_step(features).numpy()}
