"""The model_fn/input_fn estimator, on TF2: train / evaluate / train_and_evaluate over an
execution backend (runtime/execution.py), with checkpoints, summaries and a guarded model_dir.

`tf.estimator` is gone from TensorFlow; this keeps its contract. The backend owns the model,
the optimizer, the step counter and the checkpoints; `model_fn` computes the loss, `input_fn`
gives data; the estimator runs the loop, logs, writes summaries and eval results.

Checkpoint state: model, optimizer (slots, iterations), loss scale and `step`, the number of
global batches consumed. The step is also the data position: a resumed run asks input_fn to
start after that many batches, and dropout masks derive from (seed, step), so a run killed
at any moment and restarted continues exactly as an uninterrupted one would.

A training run, before it writes anything, takes model_dir's lock, checks that the `model:`
section agrees with model_dir's params.yaml and that the latest checkpoint holds this model;
it then restores and only then writes params.yaml. Ctrl-C and SIGTERM save a checkpoint.

Multi-worker (runconfig.strategy: multi_worker): every worker runs this loop; only the chief
takes the lock and writes params.yaml, metrics, summaries and eval results, the workers
agree every step on whether to stop, and `finish` ends them together (docs/scaling.md).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import time
from typing import Callable

import tensorflow as tf

import data as data_module
import model as model_module
from config import modes
from config.files import atomic_write_text
from config.params import Params, ParamsError, RunConfig, save_params
from input.errors import InputDataError
from runtime.disk_streaming import DiskStreamingExecution
from runtime.distribution import exit_with_the_other_workers
from runtime.execution import Execution, no_weights_error
from runtime.flops import FlopsCounter
from runtime.logging_utils import ProgressLine, log
from runtime.mesh import MeshExecution
from runtime.run_dir import ModelDirLock, check_same_model
from runtime.standard import StandardExecution
from runtime.weight_streaming import MemoryStreamingExecution



def backend_class(run: RunConfig) -> type[Execution]:
    """runconfig.mesh, runconfig.execution (and, when streaming, weight_streaming.host_store) -> the backend."""
    if run.mesh is not None:
        return MeshExecution
    if run.execution == "standard":
        return StandardExecution
    return {"memory": MemoryStreamingExecution, "disk": DiskStreamingExecution}[run.weight_streaming.host_store]


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss or gradient that loss scaling does not handle."""


class InputExhaustedError(RuntimeError):
    """The training input ran out before max_steps."""


class TrainingTerminated(Exception):
    """SIGTERM stopped training after a checkpoint was saved (exit status 143, as a shell reports it)."""


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


@contextlib.contextmanager
def _signals_request_stop(flag: dict, signums: tuple[int, ...]):
    """While training, these signals (SIGTERM: what SLURM and Kubernetes send) set flag["stop"] to
    the signal's number; the loop saves and stops at the end of the step it is in. Outside the
    main thread signals cannot be caught: the default actions stay."""
    def handler(signum, frame):
        flag["stop"] = flag["stop"] or signum

    previous = {}
    try:
        for signum in signums:
            previous[signum] = signal.signal(signum, handler)
    except ValueError:          # not the main thread
        pass
    try:
        yield
    finally:
        for signum, action in previous.items():
            signal.signal(signum, action)


class Estimator:
    """train / evaluate / train_and_evaluate for one params and model_dir. Built with
    training=False (eval, predict) it creates no optimizer and cannot train."""

    def __init__(self, params: Params, model_dir: str, model_fn: Callable = model_module.model_fn,
                 input_fn: Callable = data_module.input_fn, training: bool = True):
        self.params = params
        self.model_dir = model_dir
        run = params.runconfig
        if run.deterministic:
            tf.config.experimental.enable_op_determinism()
        self.execution: Execution = backend_class(run)(params, model_dir, training, model_fn, input_fn)
        self._writers: dict[str, tf.summary.SummaryWriter] = {}
        self._restored = False        # restore() ran: the state is model_dir's, warm started, or fresh
        self._has_weights = False     # ... and it is not a fresh initialisation
        self._in_training_run = False
        self._params_recorded = False     # this training run wrote model_dir/params.yaml

    @property
    def model(self) -> model_module.GPTJModel:
        return self.execution.model

    @property
    def step(self) -> tf.Variable:
        return self.execution.step

    @property
    def loss_scale(self):
        return self.execution.loss_scale

    @property
    def strategy(self) -> tf.distribute.Strategy:
        return self.execution.strategy

    @property
    def latest_checkpoint(self) -> str | None:
        return self.execution.latest_checkpoint

    # ---- state ---------------------------------------------------------------------------

    def restore(self, require: bool = False) -> int:
        """Resume from model_dir's latest checkpoint, else warm start from runconfig.checkpoint_path
        (weights only), else keep the fresh initialisation (an error when `require`: evaluating
        random weights is never what was meant). Reads the checkpoint once per estimator: later
        calls keep the state this process holds (which its own saves track)."""
        if not self._restored:
            step = self.execution.restore(require)
            self._restored = True
            self._has_weights = bool(self.execution.latest_checkpoint or self.params.runconfig.checkpoint_path)
            return step
        if require and not self._has_weights:
            raise no_weights_error(self.model_dir)
        return int(self.step.numpy())

    def save(self) -> str:
        path = self.execution.save()
        self._has_weights = True
        return path

    def finish(self, status: int) -> None:
        """End of the command: write out the summaries; a multi-worker process then exits here, in
        step with the other workers (runtime/distribution.py), with `status`."""
        for writer in self._writers.values():
            writer.flush()
        exit_with_the_other_workers(self.strategy, status)

    def _writer(self, name: str) -> tf.summary.SummaryWriter:
        if name not in self._writers:
            self._writers[name] = tf.summary.create_file_writer(os.path.join(self.model_dir, name))
        return self._writers[name]

    # ---- training --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _training_run(self):
        """Hold model_dir for training: its lock (chief only), the model check against its
        params.yaml and the restore (which checks the checkpoint's shapes); nothing is written
        when a check fails. Re-entered by train() inside train_and_evaluate(), it does nothing more."""
        if self._in_training_run:
            yield
            return
        self.execution.require_training()
        self.execution.check_batch(modes.TRAIN)
        with ModelDirLock(self.model_dir) if self.execution.chief else contextlib.nullcontext():
            check_same_model(self.params, self.model_dir)
            self.restore()
            self._in_training_run, self._params_recorded = True, False
            try:
                yield
            finally:
                self._in_training_run = False

    def _record_params(self) -> None:
        """model_dir/params.yaml, once per training run, when it starts: after the checks and the
        input pipeline's own (missing files, record layout), before the first step."""
        if not self._params_recorded and self.execution.chief:
            save_params(self.params, os.path.join(self.model_dir, "params.yaml"))
        self._params_recorded = True

    def train(self, max_steps: int | None = None, on_step: Callable[[int, dict], None] | None = None) -> dict:
        """Train until `max_steps` (runconfig.max_steps by default); returns the last step's logs."""
        max_steps = max_steps or self.params.runconfig.max_steps
        if max_steps is None:
            raise ParamsError("training needs runconfig.max_steps (or --max-steps)")
        with self._training_run():
            start = int(self.step.numpy())
            if start >= max_steps:
                log(f"model_dir {self.model_dir} is already at step {start} >= max_steps {max_steps}; nothing to train")
                return {}
            iterator = iter(self.execution.dataset(modes.TRAIN, start))
            self._record_params()
            return self._train_from(iterator, start, max_steps, on_step)

    def _train_from(self, iterator, start: int, max_steps: int, on_step) -> dict:
        progress = ProgressLine(start, max_steps)
        # Only the chief writes model_dir's files; other workers log to their console only.
        metrics_path = os.path.join(self.model_dir, "train_metrics.jsonl") if self.execution.chief else None
        if metrics_path:
            _truncate_metrics(metrics_path, start)
        flag = {"stop": 0}
        # Several workers stop together at a step they agree on (Execution.any_worker), so Ctrl-C
        # also waits for the step's end there: a save needs every worker.
        signums = (signal.SIGTERM,) if self.execution.workers == 1 else (signal.SIGTERM, signal.SIGINT)
        try:
            with _signals_request_stop(flag, signums):
                logs = self._train_loop(iterator, start, max_steps, FlopsCounter(self.params), progress,
                                        metrics_path, on_step, flag)
        except KeyboardInterrupt:
            path = self.save()
            log(f"interrupted: saved {path} (step {int(self.step.numpy())}); the same command resumes from it")
            raise
        if flag["stop"]:
            path = self.save()
            step = int(self.step.numpy())
            if flag["stop"] == signal.SIGINT:
                log(f"interrupted: saved {path} (step {step}); the same command resumes from it")
                raise KeyboardInterrupt
            log(f"SIGTERM: saved {path} (step {step}); the same command resumes from it")
            raise TrainingTerminated(f"stopped by SIGTERM at step {step}")
        progress.close()
        return logs

    def _train_loop(self, iterator, start, max_steps, flops, progress, metrics_path, on_step, flag) -> dict:
        run = self.params.runconfig
        logs: dict = {}
        window_start, window_tokens = time.time(), 0.0
        for step in range(start + 1, max_steps + 1):
            try:
                features, labels = _next_batch(iterator)
            except StopIteration:
                raise InputExhaustedError(
                    f"train input ran out at step {step} of {max_steps}; set train_input.repeat: true "
                    "or lower max_steps") from None
            logs = {k: v.numpy().item() for k, v in self.execution.train_step(features, labels).items()}
            window_tokens += logs["tokens"]
            if not logs["finite"]:
                if self.execution.loss_scale.dynamic:
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
                if metrics_path:
                    with open(metrics_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps({"step": step, **{k: logs[k] for k in (
                            "loss", "accuracy", "learning_rate", "grad_norm", "loss_scale", "tokens_per_sec")}}) + "\n")
                window_start, window_tokens = time.time(), 0.0
            if step % run.save_summary_steps == 0 and self.execution.chief:
                self._write_train_summaries(step, logs)
            if step % run.save_checkpoints_steps == 0 or step == max_steps:
                self.save()
            terminated, interrupted = self.execution.any_worker((flag["stop"] == signal.SIGTERM,
                                                                 flag["stop"] == signal.SIGINT))
            flag["stop"] = signal.SIGTERM if terminated else signal.SIGINT if interrupted else 0
            if flag["stop"]:
                break
        return logs

    def _write_train_summaries(self, step: int, logs: dict) -> None:
        with self._writer("train").as_default(step=step):
            for name in ("loss", "accuracy", "learning_rate", "grad_norm", "loss_scale", "tokens_per_sec", "mfu"):
                if name in logs and logs[name] is not None:
                    tf.summary.scalar(name, logs[name])

    # ---- evaluation ------------------------------------------------------------------------

    def evaluate(self, steps: int | None = None, restore: bool = True) -> dict:
        """Loss, perplexity and token accuracy over the eval input (all of it, or `steps` batches).
        Written to TensorBoard (model_dir/eval) and model_dir/eval_results.json."""
        steps = steps or self.params.runconfig.eval_steps
        if restore:
            self.restore(require=True)
        totals = {"loss": 0.0, "correct": 0.0, "tokens": 0.0}
        batches = 0
        start = time.time()
        iterator = iter(self.execution.dataset(modes.EVAL, 0))
        while True:
            try:
                features, labels = _next_batch(iterator)
            except StopIteration:
                break
            sums = self.execution.eval_sums(features, labels)
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
        if self.execution.chief:
            with self._writer("eval").as_default(step=step):
                for name in ("loss", "perplexity", "accuracy"):
                    tf.summary.scalar(name, results[name])
            path = self._record_eval(results)
        else:
            path = os.path.join(self.model_dir, "eval_results.json") + " (written by the chief)"
        log(f"eval at step {step}: loss {loss:.4f}, perplexity {results['perplexity']:.2f}, "
            f"accuracy {results['accuracy']:.4f} over {results['tokens']:,} tokens; results in {path} and "
            f"TensorBoard {os.path.join(self.model_dir, 'eval')}")
        return results

    def _record_eval(self, results: dict) -> str:
        """eval_results.json: the latest result plus the history, rewritten atomically."""
        path = os.path.join(self.model_dir, "eval_results.json")
        history = []
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                history = json.load(f).get("history", [])
        history = [h for h in history if h["step"] != results["step"]] + [results]
        atomic_write_text(path, json.dumps({"latest": results, "history": history}, indent=2))
        return path

    def train_and_evaluate(self, max_steps: int | None = None) -> dict:
        """Train, evaluating every runconfig.eval_every_steps and at the end."""
        run = self.params.runconfig
        max_steps = max_steps or run.max_steps
        if max_steps is None:
            raise ParamsError("train_and_eval needs runconfig.max_steps (or --max-steps)")
        every = run.eval_every_steps or max_steps
        with self._training_run():
            current = int(self.step.numpy())
            results = {}
            while current < max_steps:
                target = min(max_steps, (current // every + 1) * every)
                self.train(target)
                current = int(self.step.numpy())
                results = self.evaluate(restore=False)
            return results or self.evaluate(restore=False)
