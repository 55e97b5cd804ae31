"""`runconfig.strategy` -> a tf.distribute strategy; a multi-worker process's role and its exit."""
from __future__ import annotations

import atexit
import os
import sys

import tensorflow as tf
from tensorflow.python.eager import context

from config.params import RunConfig
from runtime.cluster import resolve_cluster
from runtime.logging_utils import log

# How long the workers wait for each other at the end of a run (they run the same program, so
# they arrive within one step's tail: the chief's last writes).
EXIT_BARRIER_MS = 600_000


def make_strategy(config: RunConfig) -> tf.distribute.Strategy:
    """auto: mirrored over all GPUs when there are several, else one device (first GPU or the CPU);
    one_device; mirrored (all local GPUs, or all logical CPUs when there is no GPU);
    multi_worker (MultiWorkerMirroredStrategy over runconfig.cluster's workers: runtime/cluster.py)."""
    # MultiWorkerMirroredStrategy configures the collectives of TensorFlow's context, which must not
    # have started yet: nothing (not even listing logical devices) may run before it is built.
    if config.strategy == "multi_worker":
        cluster = resolve_cluster(config)
        log(cluster.describe())
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=cluster.resolver)
    gpus = tf.config.list_logical_devices("GPU")
    if config.strategy == "mirrored" or (config.strategy == "auto" and len(gpus) > 1):
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    device = gpus[0].name if gpus else tf.config.list_logical_devices("CPU")[0].name
    return tf.distribute.OneDeviceStrategy(device)


def _multi_worker(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def worker_count(strategy: tf.distribute.Strategy) -> int:
    """Processes that train together: the strategy's replicas over this process's devices."""
    if not _multi_worker(strategy):
        return 1
    return strategy.num_replicas_in_sync // len(strategy.extended.worker_devices)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's files: always, except a non-chief task of a
    multi-worker cluster (the chief task, else worker 0 of a chief-less cluster, writes)."""
    return strategy.extended.should_checkpoint if _multi_worker(strategy) else True


def exit_with_the_other_workers(strategy: tf.distribute.Strategy, status: int) -> None:
    """Multi-worker: end this process in step with the others, without an error line on any of them;
    otherwise return.

    TensorFlow (2.21) gives Python no way to disconnect from the coordination service: a worker
    leaves by exiting, and its C++ teardown (seconds) keeps sending the service heartbeats. A worker
    whose heartbeat finds the service's host (the leader: the chief, else worker 0) gone logs
    `StartAbort UNAVAILABLE`, and a leader that outlives a silent worker by 10 s logs it as
    unhealthy. So every worker waits for the others at a barrier (then nobody has collective work
    left); each non-leader then says it is leaving and exits at once (os._exit: no teardown, no
    more heartbeats), and the leader exits as soon as all of them have said so. Before the barrier,
    each runs what a normal exit would run in Python (atexit: autograph's temporary files, logging)
    and flushes its output; the caller flushes its own files (summary writers)."""
    if not _multi_worker(strategy):
        return
    resolver = strategy.cluster_resolver
    spec = resolver.cluster_spec()
    if not spec.as_dict():
        return                                           # one worker: no coordination service
    leader = ("chief", 0) if "chief" in spec.jobs else ("worker", 0)
    me = (resolver.task_type, resolver.task_id)
    key = "gptj_tf/leaving/{}/{}".format
    ctx = context.context()
    atexit._run_exitfuncs()              # CPython's own exit handlers, which os._exit would skip
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        ctx.wait_at_barrier("gptj_tf/finished", EXIT_BARRIER_MS)
        if me == leader:
            for job in spec.jobs:
                for index in range(spec.num_tasks(job)):
                    if (job, index) != leader:
                        ctx.get_config_key_value(key(job, index), EXIT_BARRIER_MS)
    except tf.errors.OpError as err:
        log(f"warning: the workers did not finish together ({err.message.splitlines()[0]}); exiting anyway")
    if me != leader:
        try:
            ctx.set_config_key_value(key(*me), "1")
        except tf.errors.OpError:
            pass                        # the leader leaves once the key is stored: the reply may not come
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
