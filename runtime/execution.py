"""Execution backends: where a run's state lives and how its steps run.

The Estimator drives every backend through this one interface:

    model            the GPTJModel whose layer code the steps run (generation uses it too)
    step, loss_scale the global step and the loss scale (checkpointed state)
    restore(require) / save() / latest_checkpoint
    train_step(features, labels) -> logs      (only when built with training=True)
    eval_sums(features, labels)  -> {"loss", "correct", "tokens"}
    dataset(mode, position)      the input, distributed as the backend needs it
    chief, workers, any_worker   multi-worker: whether this process writes model_dir, how many
                                 processes train together, a flag OR-ed over them

Backends: StandardExecution (runtime/standard.py: a tf.distribute strategy), MeshExecution
(runtime/mesh.py: tensor parallelism on a DTensor device mesh), memory and disk weight
streaming (runtime/weight_streaming.py, runtime/disk_streaming.py). A backend
built with training=False (eval, predict) creates no optimizer: Adam's slots are twice
the weights' memory.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable

import tensorflow as tf

import data as data_module
import model as model_module
from checkpoint_utils.integrity import newest_whole_checkpoint, warn_skipped
from checkpoint_utils.load import CheckpointMismatchError, check_checkpoint
from checkpoint_utils.lora_checkpoint import BASE_RECORD
from checkpoint_utils.tf_checkpoint import drop_from_checkpoint_state
from config import modes
from config.params import Params, ParamsError
from runtime.distribution import is_chief, worker_count
from runtime.logging_utils import log
from runtime.lora import build_lora_model, check_lora_checkpoint
from runtime.loss_scale import LossScale
from runtime.optimizer import build_optimizer
from runtime.warm_start import warm_start


class OptimizerState(tf.Module):
    """The optimizer's own variables (update count, learning-rate variable, slots) for checkpoints.

    Checkpointing the Keras optimizer object itself would also save the model's weights under
    `optimizer/_trainable_variables/N` (the first path a breadth-first walk finds), so a run's
    checkpoint would not hold `model/<path>` keys for warm start, export and load_model."""

    def __init__(self, optimizer):
        super().__init__(name="optimizer_state")
        self.state = list(optimizer.variables)


# How to get past a model_dir whose checkpoint files are all broken (its files are named before this).
NO_WHOLE_CHECKPOINT_FIX = ("restore them from a backup; or, to start afresh, delete them or use a new --model-dir "
                           "(nothing was changed)")


def no_weights_error(model_dir: str) -> FileNotFoundError:
    return FileNotFoundError(f"model_dir {model_dir} holds no checkpoint and no --checkpoint-path was given; "
                             "train first, or pass the run's --model-dir or --checkpoint-path")


class Execution:
    """The interface (see the module docstring) and what every backend shares."""

    strategy: tf.distribute.Strategy
    lora_base: tf.Variable | None = None     # a LoRA run's record of its base (CheckpointedExecution)

    def __init__(self, params: Params, model_dir: str, training: bool, model_fn=model_module.model_fn,
                 input_fn=data_module.input_fn):
        self.params = params
        self.model_dir = model_dir
        self.training = training
        self.model_fn = model_fn
        self.input_fn = input_fn
        train = params.train_input
        # The global batch's label positions: the constant that scales every gradient (runtime/steps.py).
        self.label_positions = float(train.batch_size * train.max_sequence_length) if train else 1.0
        self._latest: str | None = None        # the checkpoint this process restored or last saved
        self.unusable: list[str] = []          # broken checkpoints restore passed over (training runs)

    def new_loss_scale(self) -> LossScale:
        model = self.params.model
        fp16 = model.mixed_precision and model.mixed_precision_dtype == "float16"
        return LossScale(self.params.optimizer, enabled=fp16)

    @property
    def workers(self) -> int:
        """Processes training together (several only with runconfig.strategy: multi_worker)."""
        return worker_count(self.strategy)

    @property
    def chief(self) -> bool:
        """Whether this process writes model_dir (other workers only compute)."""
        return is_chief(self.strategy)

    def require_training(self) -> None:
        if not self.training:
            raise RuntimeError("this estimator was built for evaluation (training=False): it has no optimizer")

    def check_batch(self, mode: str) -> None:
        section = self.params.train_input if mode == modes.TRAIN else self.params.eval_input
        replicas = self.strategy.num_replicas_in_sync
        accum = self.params.optimizer.grad_accum_steps
        if mode == modes.TRAIN and section.batch_size % (replicas * accum):
            raise ParamsError(f"train_input.batch_size={section.batch_size} must be divisible by "
                              f"replicas ({replicas}) x optimizer.grad_accum_steps ({accum})")
        if mode == modes.TRAIN and not section.drop_remainder:
            raise ParamsError("train_input.drop_remainder must be true (every step needs a full batch)")

    def dataset(self, mode: str, position: int):
        """The input of `mode` through the strategy, starting after `position` global batches."""
        def dataset_fn(context: tf.distribute.InputContext):
            per_pipeline = context.num_replicas_in_sync // context.num_input_pipelines
            return self.input_fn(self.params, mode, context, data_position=position * per_pipeline)
        return self.strategy.distribute_datasets_from_function(dataset_fn)

    def any_worker(self, flags: tuple[bool, ...]) -> tuple[bool, ...]:
        """Each flag OR-ed over the workers (an all-reduce when several train together): workers
        agree on whether and why to stop at a step, or one would wait forever in the next step's
        all-reduce."""
        if self.workers == 1:
            return flags
        values = self.strategy.experimental_distribute_values_from_function(
            lambda context: tf.constant([float(f) for f in flags]))        # [flags]
        return tuple(bool(total > 0) for total in self.strategy.reduce(
            tf.distribute.ReduceOp.SUM, values, axis=None).numpy())

    @property
    def latest_checkpoint(self) -> str | None:
        """The checkpoint this process restored or last saved (None before either)."""
        return self._latest

    def check_model(self, prefix: str) -> None:
        """The checkpoint holds this model (one clear line if not); a LoRA run's, adapters on its base."""
        if self.lora_base is not None:
            return check_lora_checkpoint(prefix, self.lora_base)
        try:
            check_checkpoint(prefix, self.params.model)
        except CheckpointMismatchError as err:
            raise CheckpointMismatchError(
                f"{err}; model_dir {self.model_dir} holds another model: use a new --model-dir (warm start "
                f"from this one with --checkpoint-path {self.model_dir}) or that run's params.yaml") from None

    def restore_latest(self, load: Callable[[str], None]) -> str | None:
        """Restore model_dir's newest whole checkpoint with load(prefix), after checking it holds this
        model, and return it. A newer checkpoint whose files are broken (cut short, index or data
        missing, named by the `checkpoint` file but gone) or whose data fails to load is passed over
        with one warning naming it and what is wrong; its files stay where they are, and a training
        run drops it from the checkpoint list when it first saves. None when model_dir holds no
        checkpoint file; CorruptCheckpointError (nothing changed) when it holds some but none is whole."""
        def checked_load(prefix: str) -> None:
            self.check_model(prefix)
            load(prefix)

        latest, skipped = newest_whole_checkpoint(self.model_dir, NO_WHOLE_CHECKPOINT_FIX, checked_load)
        if skipped:
            note = (f"; this run drops them from {os.path.join(self.model_dir, 'checkpoint')} when it first saves, "
                    "and a checkpoint it saves at the same step replaces them") if self.training else ""
            warn_skipped(skipped, latest, note)
            self.unusable = [prefix for prefix, _ in skipped] if self.training else []
        self._latest = latest
        return latest

    # Backends define: model, step, loss_scale, restore, save, train_step, eval_sums.


class CheckpointedExecution(Execution):
    """State as tf.Variables saved by tf.train.Checkpoint through a CheckpointManager:
    the standard backend and memory weight streaming."""

    def __init__(self, params: Params, model_dir: str, training: bool, model_fn, input_fn,
                 strategy: tf.distribute.Strategy, placement):
        super().__init__(params, model_dir, training, model_fn, input_fn)
        self.strategy = strategy
        with placement:
            self.model, self.optimizer, self.loss_scale, self.step = self.build_state()
        if self.lora_base is None:
            state = {"model": self.model, "loss_scale": self.loss_scale, "step": self.step}
        else:       # adapters and the base's record only: the frozen base is runconfig.checkpoint_path's
            state = {"lora": self.model.adapters, BASE_RECORD: self.lora_base, "loss_scale": self.loss_scale,
                     "step": self.step}
        if training:
            state["optimizer"] = OptimizerState(self.optimizer)
        self.checkpoint = tf.train.Checkpoint(**state)
        self.manager = self._manager(model_dir, params.runconfig.keep_checkpoint_max or None)

    def _manager(self, directory: str, max_to_keep: int | None) -> tf.train.CheckpointManager:
        return tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep=max_to_keep,
                                          step_counter=self.step, checkpoint_name="ckpt")

    def build_state(self) -> tuple:
        """(model, optimizer or None, loss scale, step): the checkpointed state, built under the
        backend's placement (the mesh backend lays it out on its device mesh instead)."""
        if self.params.model.lora is not None:
            model, self.lora_base = build_lora_model(self.params)
        else:
            model = model_module.build_model(self.params)
        optimizer = build_optimizer(self.params.optimizer, model.trainable_variables) if self.training else None
        return model, optimizer, self.new_loss_scale(), tf.Variable(0, dtype=tf.int64, trainable=False,
                                                                      name="global_step")

    def assign_weight(self, variable: tf.Variable, value) -> None:
        """Set a model variable from a host array (warm start)."""
        variable.assign(value)

    def restore(self, require: bool) -> int:
        """Resume from model_dir's newest whole checkpoint, else warm start from runconfig.checkpoint_path
        (weights only), else keep the fresh initialisation (an error when `require`)."""
        run = self.params.runconfig
        latest = self.restore_latest(self._restore_from)
        if latest:
            ignored = (f"; runconfig.checkpoint_path {run.checkpoint_path} is not used when model_dir has "
                       "a checkpoint") if run.checkpoint_path and self.lora_base is None else ""
            log(f"restored {latest} (step {int(self.step.numpy())}){ignored}")
        elif self.lora_base is not None:
            log(f"no checkpoint in {self.model_dir}: the adapters start afresh on the base {run.checkpoint_path}")
        elif run.checkpoint_path:
            log(warm_start(self.model, run.checkpoint_path, self.assign_weight).summary())
        elif require:
            raise no_weights_error(self.model_dir)
        else:
            log(f"no checkpoint in {self.model_dir} and no runconfig.checkpoint_path: "
                f"starting from a fresh initialisation (seed {run.seed})")
        return int(self.step.numpy())

    def _restore_from(self, prefix: str) -> None:
        status = self.checkpoint.restore(prefix)
        try:
            status.assert_existing_objects_matched()
        except AssertionError as err:
            raise CheckpointMismatchError(
                f"checkpoint {prefix} does not hold this run's state ({str(err).splitlines()[0]}); was it "
                "written with another optimizer? Use a new --model-dir with --checkpoint-path "
                f"{self.model_dir} to warm start from its weights") from None
        if not self.training:
            status.expect_partial()          # the optimizer's slots are not needed

    def save(self) -> str:
        """Write a checkpoint (TF writes it under a temp name and renames, then rewrites the
        `checkpoint` state file atomically: a kill leaves the previous one usable).

        Multi-worker: every worker takes part in a save (its collectives need them all), but only
        the chief writes into model_dir; another worker writes to a temporary directory of its own
        and deletes it. Returns the chief's path on every worker."""
        self.require_training()
        step = int(self.step.numpy())
        if self.chief:
            if self.unusable:   # out of the list first: the manager would count them and rotate good ones out
                drop_from_checkpoint_state(self.model_dir, self.unusable, self._latest)
                self.manager = self._manager(self.model_dir, self.params.runconfig.keep_checkpoint_max or None)
                self.unusable = []
            self._latest = self.manager.save(checkpoint_number=step)
            return self._latest
        scratch = tempfile.mkdtemp(prefix="gptj-worker-ckpt-")
        try:
            self._manager(scratch, 1).save(checkpoint_number=step)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        self._latest = os.path.join(self.model_dir, f"ckpt-{step}")
        return self._latest

