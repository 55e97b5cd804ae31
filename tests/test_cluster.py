"""runconfig.cluster: the workers and this process's task, read from TF_CONFIG as Kubeflow's TFJob
writes it and from the variables srun sets for the tasks of a SLURM job step; auto's choice; one
error line for each unusable environment. No strategy is built here (that needs a fresh process:
tests/test_multi_worker.py trains on a SLURM-resolved cluster and on the launcher's TF_CONFIG)."""
from __future__ import annotations

import json
import os

import pytest

from config.params import ParamsError, RunConfig, parse_params
from runtime.cluster import resolve_cluster
from tests.runtime_helpers import raw_params

SLURM_VARIABLES = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST", "SLURM_STEP_TASKS_PER_NODE",
                   "SLURM_LOCALID", "SLURMD_NODENAME", "SLURM_DISTRIBUTION")


@pytest.fixture(autouse=True)
def no_cluster_environment(monkeypatch):
    for name in ("TF_CONFIG",) + SLURM_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def multi_worker(**keys) -> RunConfig:
    return RunConfig(strategy="multi_worker", **keys)


def tfjob_tf_config(replicas: dict[str, int], task_type: str, index: int) -> str:
    """TF_CONFIG as Kubeflow's training operator writes it into a TFJob's pod: one headless-service
    address per replica, `<job>-<type>-<i>.<namespace>.svc:2222`, and environment "cloud"."""
    cluster = {kind: [f"gpt-{kind}-{i}.research.svc:2222" for i in range(n)] for kind, n in replicas.items()}
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}, "environment": "cloud"})


def test_a_tfjob_pod_resolves_to_its_workers_and_task(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", tfjob_tf_config({"worker": 3}, "worker", 1))
    cluster = resolve_cluster(multi_worker())
    assert cluster.workers == tuple(f"gpt-worker-{i}.research.svc:2222" for i in range(3))
    assert (cluster.task_type, cluster.task_index, cluster.chief) == ("worker", 1, False)
    assert cluster.describe() == ("cluster from TF_CONFIG: 3 workers gpt-worker-0.research.svc:2222, "
                                  "gpt-worker-1.research.svc:2222, gpt-worker-2.research.svc:2222; "
                                  "this process is worker 1")
    # the strategy gets TensorFlow's own TF_CONFIG resolver, which reads the same cluster
    assert type(cluster.resolver).__name__ == "TFConfigClusterResolver"
    assert cluster.resolver.cluster_spec().as_dict() == {"worker": list(cluster.workers)}

    # a TFJob with a Chief replica: the chief writes model_dir, worker 0 does not
    monkeypatch.setenv("TF_CONFIG", tfjob_tf_config({"chief": 1, "worker": 2}, "chief", 0))
    cluster = resolve_cluster(multi_worker(cluster="tf_config"))
    assert cluster.workers[0] == "gpt-chief-0.research.svc:2222" and len(cluster.workers) == 3 and cluster.chief
    monkeypatch.setenv("TF_CONFIG", tfjob_tf_config({"chief": 1, "worker": 2}, "worker", 0))
    assert not resolve_cluster(multi_worker()).chief


def slurm_step(monkeypatch, nodelist: str, tasks_per_node: str, tasks: int, rank: int, node: str, local: int):
    for name, value in (("SLURM_PROCID", rank), ("SLURM_STEP_NUM_TASKS", tasks), ("SLURM_STEP_NODELIST", nodelist),
                        ("SLURM_STEP_TASKS_PER_NODE", tasks_per_node), ("SLURMD_NODENAME", node),
                        ("SLURM_LOCALID", local)):
        monkeypatch.setenv(name, str(value))


def test_a_slurm_task_resolves_in_slurms_node_order(monkeypatch):
    """Block distribution: tasks 0-1 on node9, 2-3 on node10 (SLURM's order, where sorting the names
    as text would put node10 first); a node's k-th task listens on slurm_port_base + k."""
    slurm_step(monkeypatch, "node[9-10]", "2(x2)", tasks=4, rank=2, node="node10", local=0)
    cluster = resolve_cluster(multi_worker(cluster="slurm", slurm_port_base=7000))
    assert cluster.workers == ("node9:7000", "node9:7001", "node10:7000", "node10:7001")
    assert (cluster.task_type, cluster.task_index, cluster.chief) == ("worker", 2, False)
    assert cluster.describe().startswith("cluster from the SLURM job step: 4 workers node9:7000, ")
    assert cluster.resolver.cluster_spec().as_dict() == {"worker": list(cluster.workers)}
    assert cluster.resolver.task_type == "worker" and cluster.resolver.task_id == 2
    assert cluster.resolver.num_accelerators() == {}          # this CPU machine: each task trains on its CPU

    # a task SLURM placed elsewhere than block distribution says (e.g. --distribution=cyclic)
    slurm_step(monkeypatch, "node[9-10]", "2(x2)", tasks=4, rank=1, node="node10", local=0)
    with pytest.raises(ParamsError, match=r"SLURM started task 1 on node10 as its task 0, but in block distribution "
                                          r"it belongs on node9 as task 1: run srun with --distribution=block"):
        resolve_cluster(multi_worker(cluster="slurm"))


def test_auto_prefers_tf_config_then_slurm_then_one_worker(monkeypatch):
    assert resolve_cluster(multi_worker()).describe() == (
        "cluster: none found (no TF_CONFIG, no SLURM job step): training as a single worker")
    slurm_step(monkeypatch, "localhost", "2", tasks=2, rank=0, node="localhost", local=0)
    cluster = resolve_cluster(multi_worker())
    assert cluster.workers == ("localhost:8888", "localhost:8889") and cluster.chief     # the default port base
    monkeypatch.setenv("TF_CONFIG", tfjob_tf_config({"worker": 2}, "worker", 1))   # e.g. runtime.launch inside salloc
    assert resolve_cluster(multi_worker()).source == "TF_CONFIG"


@pytest.mark.parametrize("environment, config, message", [
    ({}, {"cluster": "tf_config"}, "runconfig.cluster=tf_config needs the TF_CONFIG environment variable"),
    ({"TF_CONFIG": "{not json"}, {}, "TF_CONFIG is not valid JSON"),
    ({"TF_CONFIG": '{"cluster": ["a:1"]}'}, {}, "TF_CONFIG is not a TensorFlow cluster"),
    ({"TF_CONFIG": tfjob_tf_config({"ps": 1, "worker": 2}, "worker", 0)}, {},
     "TF_CONFIG's cluster has 'ps' tasks: runconfig.strategy=multi_worker trains with chief and worker tasks only"),
    ({"TF_CONFIG": tfjob_tf_config({"worker": 2}, "worker", 2)}, {},
     r"TF_CONFIG's task \(type 'worker', index 2\) is not one of its cluster's tasks \(worker: 2\)"),
    ({"SLURM_PROCID": "0"}, {"cluster": "slurm"},
     "runconfig.cluster=slurm needs SLURM_STEP_NUM_TASKS, SLURM_STEP_NODELIST, SLURM_STEP_TASKS_PER_NODE, which srun "
     "sets for each task of a job step: start the workers with srun"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "3", "SLURM_STEP_NODELIST": "n[1-2]",
      "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}, {}, "the SLURM job step's variables disagree"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "n1",
      "SLURM_STEP_TASKS_PER_NODE": "2"}, {"slurm_port_base": 65535},
     r"runconfig.slurm_port_base=65535 leaves no port for task 1 of a node"),
])
def test_an_unusable_cluster_is_one_error_line(monkeypatch, environment, config, message):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ParamsError, match=message) as caught:
        resolve_cluster(multi_worker(**config))
    assert "\n" not in str(caught.value)


def test_cluster_keys_are_validated(tmp_path):
    with pytest.raises(ParamsError, match="runconfig.cluster='slurm' applies to runconfig.strategy=multi_worker "
                                          r"\(got 'auto'\); set strategy: multi_worker or drop runconfig.cluster"):
        parse_params(raw_params(str(tmp_path), runconfig={"cluster": "slurm"}))
    with pytest.raises(ParamsError, match="runconfig.cluster='kubeflow' is not allowed; use one of 'auto', "
                                          "'tf_config', 'slurm'"):
        parse_params(raw_params(str(tmp_path), runconfig={"strategy": "multi_worker", "cluster": "kubeflow"}))
    with pytest.raises(ParamsError, match="runconfig.slurm_port_base=80 must be a port in 1024..65535"):
        parse_params(raw_params(str(tmp_path), runconfig={"strategy": "multi_worker", "slurm_port_base": 80}))
    assert parse_params(raw_params(str(tmp_path), runconfig={"strategy": "multi_worker"})).runconfig.cluster == "auto"
