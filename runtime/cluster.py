"""Which processes train together (`runconfig.cluster`), as the cluster resolver that
MultiWorkerMirroredStrategy is built with.

- `tf_config`: the `TF_CONFIG` environment variable (what `runtime.launch` and Kubeflow's TFJob
  set), read by TensorFlow's `TFConfigClusterResolver`.
- `slurm`: the SLURM job step this process is a task of (`srun`): task i of the step is worker i,
  and the k-th task on a node listens on `runconfig.slurm_port_base + k`.
- `auto` (the default): TF_CONFIG when it is set, else the SLURM job step when SLURM_PROCID is
  set, else no cluster (one worker).

SLURM is read here rather than by TensorFlow's `SlurmClusterResolver`, which (TF 2.21) cannot
serve this runtime: it cannot describe a node without GPUs (it gives each task its own block of
the node's GPUs, counted by `nvidia-smi`); it orders the nodes by sorting their names as text,
so `node10` comes before `node9` while SLURM numbers the tasks of `node9` first; and the GPUs it
assigns to a task through CUDA_VISIBLE_DEVICES take no effect once TensorFlow has listed the
devices (the CLIs do that at import). Here the node list and the tasks per node are expanded
by TensorFlow's own parsers, kept in SLURM's order (block distribution), checked against this
task's SLURMD_NODENAME and SLURM_LOCALID, and each task trains on the GPUs SLURM gives it
(or its CPU). Nothing is asked of `scontrol`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import tensorflow as tf
from tensorflow.python.distribute.cluster_resolver.slurm_cluster_resolver import (expand_hostlist,
                                                                                  expand_tasks_per_node)

from config.params import ParamsError, RunConfig

# What srun sets for every task of a job step (SLURMD_NODENAME and SLURM_LOCALID, when set, are checked).
SLURM_STEP = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST", "SLURM_STEP_TASKS_PER_NODE")
TRAINING_JOBS = ("chief", "worker")          # the jobs MultiWorkerMirroredStrategy trains with, chief first


@dataclass(frozen=True)
class Cluster:
    """The tasks of a multi-worker run and this process's own; no jobs: one worker."""
    source: str                                      # what it was read from, for the log line
    jobs: dict[str, tuple[str, ...]]                 # job name -> task addresses (host:port)
    task_type: str | None
    task_index: int | None
    resolver: tf.distribute.cluster_resolver.ClusterResolver = field(repr=False, compare=False)

    @property
    def workers(self) -> tuple[str, ...]:
        """Every training task's address, the chief first."""
        return tuple(address for job in TRAINING_JOBS for address in self.jobs.get(job, ()))

    @property
    def chief(self) -> bool:
        """Whether this task writes model_dir: the chief task, else worker 0 of a chief-less cluster."""
        if not self.jobs or self.task_type == "chief":
            return True
        return self.task_type == "worker" and self.task_index == 0 and "chief" not in self.jobs

    def describe(self) -> str:
        if not self.jobs:
            return f"cluster: {self.source}: training as a single worker"
        role = f"{self.task_type} {self.task_index}" + (" (the chief)" if self.chief else "")
        return (f"cluster from {self.source}: {len(self.workers)} workers {', '.join(self.workers)}; "
                f"this process is {role}")


def resolve_cluster(config: RunConfig) -> Cluster:
    """runconfig.cluster (and the environment) -> the cluster; one ParamsError line when it is unusable."""
    kind = config.cluster
    if kind == "auto":
        kind = "tf_config" if "TF_CONFIG" in os.environ else "slurm" if "SLURM_PROCID" in os.environ else None
    if kind == "tf_config":
        return tf_config_cluster()
    if kind == "slurm":
        return slurm_cluster(config.slurm_port_base)
    # TF_CONFIG's resolver, reading none: the strategy then trains on all local GPUs (or the CPU)
    return Cluster("none found (no TF_CONFIG, no SLURM job step)", {}, None, None,
                   tf.distribute.cluster_resolver.TFConfigClusterResolver())


def tf_config_cluster() -> Cluster:
    """The cluster of TF_CONFIG, e.g. as Kubeflow's TFJob writes it: {"cluster": {"worker":
    ["<job>-worker-0.<namespace>.svc:2222", ...]}, "task": {"type": "worker", "index": 1},
    "environment": "cloud"}."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        raise ParamsError("runconfig.cluster=tf_config needs the TF_CONFIG environment variable (cluster and task); "
                          "see docs/scaling.md")
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        raise ParamsError(f"TF_CONFIG is not valid JSON ({err})") from None
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    try:
        spec = resolver.cluster_spec()
        task_type, task_index = resolver.task_type, resolver.task_id
    except (TypeError, ValueError, AttributeError) as err:
        raise ParamsError(f"TF_CONFIG is not a TensorFlow cluster ({err}); it needs {{\"cluster\": {{\"worker\": "
                          '["host:port", ...]}, "task": {"type": "worker", "index": i}}') from None
    jobs = {job: tuple(spec.job_tasks(job)) for job in spec.jobs}
    return checked(Cluster("TF_CONFIG", jobs, task_type, task_index, resolver))


def slurm_cluster(port_base: int) -> Cluster:
    """The cluster of the SLURM job step this process is a task of (block distribution: the
    step's tasks fill the nodes in the order of SLURM_STEP_NODELIST)."""
    missing = [name for name in SLURM_STEP if name not in os.environ]
    if missing:
        raise ParamsError(f"runconfig.cluster=slurm needs {', '.join(missing)}, which srun sets for each task of a "
                          "job step: start the workers with srun (docs/scaling.md)")
    try:
        hosts = expand_hostlist(os.environ["SLURM_STEP_NODELIST"])
        tasks_per_node = expand_tasks_per_node(os.environ["SLURM_STEP_TASKS_PER_NODE"])
        rank, total = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_STEP_NUM_TASKS"])
    except ValueError as err:
        raise ParamsError(f"the SLURM job step's variables cannot be read ({err})") from None
    if len(hosts) != len(tasks_per_node) or sum(tasks_per_node) != total or not 0 <= rank < total:
        raise ParamsError(f"the SLURM job step's variables disagree: SLURM_STEP_NODELIST has {len(hosts)} nodes, "
                          f"SLURM_STEP_TASKS_PER_NODE {tasks_per_node}, SLURM_STEP_NUM_TASKS={total}, "
                          f"SLURM_PROCID={rank}")
    if port_base + max(tasks_per_node) - 1 > 65535:
        raise ParamsError(f"runconfig.slurm_port_base={port_base} leaves no port for task {max(tasks_per_node) - 1} "
                          "of a node (the k-th task of a node listens on slurm_port_base + k); lower it")
    placed = [(host, local) for host, count in zip(hosts, tasks_per_node) for local in range(count)]
    host, local = placed[rank]
    node, local_id = os.environ.get("SLURMD_NODENAME", host), os.environ.get("SLURM_LOCALID", str(local))
    if (node, local_id) != (host, str(local)):
        raise ParamsError(f"SLURM started task {rank} on {node} as its task {local_id}, but in block distribution "
                          f"it belongs on {host} as task {local}: run srun with --distribution=block")
    workers = tuple(f"{host}:{port_base + local}" for host, local in placed)
    # Each task trains on the GPUs it sees: those SLURM bound to it (srun --gpus-per-task), else its CPU.
    gpus = len(tf.config.list_physical_devices("GPU"))
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({"worker": list(workers)}), task_type="worker", task_id=rank,
        num_accelerators={"GPU": gpus} if gpus else {}, rpc_layer="grpc")
    return checked(Cluster("the SLURM job step", {"worker": workers}, "worker", rank, resolver))


def checked(cluster: Cluster) -> Cluster:
    """A cluster MultiWorkerMirroredStrategy can train on: chief and worker tasks only, this one among them."""
    if not cluster.jobs:
        return cluster
    other = sorted(set(cluster.jobs) - set(TRAINING_JOBS))
    if other:
        raise ParamsError(f"{cluster.source}'s cluster has {', '.join(repr(j) for j in other)} tasks: "
                          "runconfig.strategy=multi_worker trains with chief and worker tasks only")
    tasks = cluster.jobs.get(cluster.task_type, ())
    if not 0 <= (cluster.task_index or 0) < len(tasks):
        counts = ", ".join(f"{job}: {len(addresses)}" for job, addresses in cluster.jobs.items())
        raise ParamsError(f"{cluster.source}'s task (type {cluster.task_type!r}, index {cluster.task_index!r}) is not "
                          f"one of its cluster's tasks ({counts})")
    return cluster
