"""`runconfig.strategy` -> a tf.distribute strategy."""
from __future__ import annotations

import json
import os

import tensorflow as tf

from config.params import ParamsError, RunConfig


def make_strategy(config: RunConfig) -> tf.distribute.Strategy:
    """auto: mirrored over all GPUs when there are several, else one device (first GPU or the CPU);
    one_device; mirrored (all local GPUs, or all logical CPUs when there is no GPU);
    multi_worker (MultiWorkerMirroredStrategy from TF_CONFIG)."""
    # MultiWorkerMirroredStrategy configures the collectives of TensorFlow's context, which must not
    # have started yet: nothing (not even listing devices) may run before it is built.
    if config.strategy == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ParamsError("runconfig.strategy=multi_worker needs the TF_CONFIG environment variable "
                              "(cluster and task); see docs/runtime.md")
        try:
            json.loads(os.environ["TF_CONFIG"])
        except json.JSONDecodeError as err:
            raise ParamsError(f"TF_CONFIG is not valid JSON ({err})") from None
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if config.strategy == "mirrored" or (config.strategy == "auto" and len(gpus) > 1):
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    device = gpus[0].name if gpus else tf.config.list_logical_devices("CPU")[0].name
    return tf.distribute.OneDeviceStrategy(device)


def _tf_config() -> dict:
    """TF_CONFIG as a mapping ({} when unset; make_strategy reports invalid JSON)."""
    try:
        config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    except json.JSONDecodeError:
        return {}
    return config if isinstance(config, dict) else {}


def worker_count() -> int:
    """Processes that train together: TF_CONFIG's chief and workers (1 without TF_CONFIG)."""
    cluster = _tf_config().get("cluster") or {}
    return max(1, len(cluster.get("chief") or []) + len(cluster.get("worker") or []))


def is_chief() -> bool:
    """Whether this process writes the run's files: always, except a non-chief task of a
    multi-worker cluster (TF_CONFIG's task is a worker other than worker 0 when a chief-less
    cluster, or any worker when the cluster has a chief)."""
    config = _tf_config()
    task = config.get("task") or {}
    kind, index = task.get("type"), int(task.get("index", 0) or 0)
    if kind in (None, "chief"):
        return True
    if kind == "worker":
        return "chief" not in (config.get("cluster") or {}) and index == 0
    return False
