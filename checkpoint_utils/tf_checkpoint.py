"""Write and read TF2 object-based checkpoints one tensor at a time.

`tf.train.Checkpoint.write` needs every variable in memory at once. To convert a model
larger than RAM we write the same on-disk format piecewise: each group of tensors goes
to its own temporary shard with `SaveV2`, `MergeV2Checkpoints` joins the shards' indexes
into one checkpoint (the data files are renamed, not copied), and the object graph that
`tf.train.Checkpoint(model=...).restore` matches against is built from the key paths.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from checkpoint_utils.host_arrays import as_tensor
from checkpoint_utils.integrity import (CorruptCheckpointError, checkpoint_problem, newest_whole_checkpoint,
                                        warn_skipped)
from config.files import atomic_write_text

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"


def checkpoint_key(root: str, path: str) -> str:
    """`model`, `blocks/0/attn/q_proj/kernel` -> the key tf.train.Checkpoint(model=...) uses
    (root "" for paths that already start at the checkpoint's root)."""
    return f"{root}/{path}{VALUE_SUFFIX}" if root else f"{path}{VALUE_SUFFIX}"


def object_graph_proto(keys: Iterable[str]) -> bytes:
    """The TrackableObjectGraph of a tree of objects whose leaves are variables at `keys`."""
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    root = graph.nodes.add()
    node_ids: dict[tuple[str, ...], int] = {(): 0}
    for key in sorted(keys):
        parts = tuple(key.removesuffix(VALUE_SUFFIX).split("/"))
        for depth in range(1, len(parts) + 1):
            prefix = parts[:depth]
            if prefix in node_ids:
                continue
            node_ids[prefix] = len(graph.nodes)
            graph.nodes.add()
            parent = graph.nodes[node_ids[prefix[:-1]]]
            child = parent.children.add()
            child.node_id = node_ids[prefix]
            child.local_name = prefix[-1]
        leaf = graph.nodes[node_ids[parts]]
        attribute = leaf.attributes.add()
        attribute.name = "VARIABLE_VALUE"
        attribute.full_name = parts[-1]
        attribute.checkpoint_key = key
    for node in graph.nodes:
        node.has_checkpoint_values.value = True
    del root
    return graph.SerializeToString()


def _save_shard(prefix: str, names: list[str], values: list) -> None:
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=values)


def write_checkpoint(prefix: str, tensors: Iterable[tuple[str, np.ndarray]], root: str = "model",
                     group_bytes: int = 64 << 20) -> list[str]:
    """Write (path, array) pairs as a checkpoint at `prefix` holding `root`'s variables.

    Small tensors are grouped up to `group_bytes` per shard; a large tensor gets its own,
    so peak memory stays near the largest tensor. Returns the checkpoint keys written."""
    directory = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(directory, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".shards-", dir=directory)
    shard_prefixes, keys = [], []
    pending_names, pending_values, pending_bytes = [], [], 0

    def flush():
        nonlocal pending_names, pending_values, pending_bytes
        if pending_names:
            shard = os.path.join(work, f"part-{len(shard_prefixes):05d}")
            _save_shard(shard, pending_names, pending_values)
            shard_prefixes.append(shard)
        pending_names, pending_values, pending_bytes = [], [], 0

    try:
        for path, array in tensors:
            key = checkpoint_key(root, path)
            if key in keys:
                raise ValueError(f"tensor {path!r} was given twice")
            keys.append(key)
            if pending_bytes and pending_bytes + array.nbytes > group_bytes:
                flush()
            pending_names.append(key)
            pending_values.append(as_tensor(array))
            pending_bytes += array.nbytes
            del array  # the tensor holds the data now; keep one copy, not two
            if pending_bytes >= group_bytes:
                flush()
        # tf.train.Checkpoint keeps a save counter beside its objects; write one so a restore
        # into a fresh Checkpoint binds every object (assert_consumed passes).
        counter_key = f"save_counter{VALUE_SUFFIX}"
        pending_names += [counter_key, OBJECT_GRAPH_KEY]
        pending_values += [tf.constant(1, tf.int64), tf.constant(object_graph_proto(keys + [counter_key]))]
        flush()
        tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=shard_prefixes, destination_prefix=prefix,
                                      delete_old_dirs=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return keys


def write_checkpoint_state(directory: str, checkpoint_name: str, all_names: list[str] | None = None,
                           timestamps: list[float] | None = None, last_preserved_timestamp: float | None = None
                           ) -> None:
    """The `checkpoint` file that lets tf.train.latest_checkpoint(directory) find `checkpoint_name`
    (paths relative to `directory`, so the directory stays movable); `all_names` lists every
    checkpoint kept, oldest first (default: just this one). `timestamps` (one per name) and
    `last_preserved_timestamp` are what tf.train.CheckpointManager keeps there to rotate them."""
    names = all_names or [checkpoint_name]
    text = f'model_checkpoint_path: "{checkpoint_name}"\n' + "".join(
        f'all_model_checkpoint_paths: "{name}"\n' for name in names)
    text += "".join(f"all_model_checkpoint_timestamps: {stamp!r}\n" for stamp in timestamps or [])
    if last_preserved_timestamp is not None:
        text += f"last_preserved_timestamp: {last_preserved_timestamp!r}\n"
    atomic_write_text(os.path.join(directory, "checkpoint"), text)


def drop_from_checkpoint_state(directory: str, prefixes: list[str], latest: str) -> None:
    """Rewrite `directory`'s `checkpoint` file without `prefixes` (their files stay where they are)
    and with `latest` as the latest: a CheckpointManager built afterwards neither counts nor
    rotates them."""
    state = tf.train.get_checkpoint_state(directory)
    if state is None:
        return
    dropped = {os.path.normpath(p) for p in prefixes}
    paths = list(state.all_model_checkpoint_paths)
    stamps = list(state.all_model_checkpoint_timestamps)
    kept = [i for i, path in enumerate(paths) if os.path.normpath(path) not in dropped]

    def name(path: str) -> str:
        inside = os.path.dirname(os.path.normpath(path)) == os.path.normpath(directory)
        return os.path.basename(path) if inside else path

    write_checkpoint_state(directory, name(latest), [name(paths[i]) for i in kept] or [name(latest)],
                           timestamps=[stamps[i] for i in kept] if len(stamps) == len(paths) and kept else None,
                           last_preserved_timestamp=state.last_preserved_timestamp or None)


def resolve_checkpoint(path: str) -> str:
    """A checkpoint prefix from a prefix or a directory holding a `checkpoint` state file, checked
    to be whole (checkpoint_utils/integrity.py). A directory's newest whole checkpoint is used, with
    a warning naming any newer one that is not; a broken prefix, or a directory whose checkpoints
    are all broken, is one CorruptCheckpointError."""
    if os.path.isdir(path):
        latest, skipped = newest_whole_checkpoint(
            path, fix="pass a whole checkpoint's prefix or another directory (or restore these files)")
        if latest is None:
            raise FileNotFoundError(f"{path!r} holds no TF checkpoint (no `checkpoint` file or "
                                    "*.index); pass a checkpoint prefix or a converted model directory")
        if skipped:
            warn_skipped(skipped, latest)
        return latest
    if not os.path.exists(path + ".index"):
        raise FileNotFoundError(f"no TF checkpoint at {path!r} ({path}.index is missing)")
    problem = checkpoint_problem(path)
    if problem:
        raise CorruptCheckpointError(f"checkpoint {path} is unusable: {problem}; pass a whole checkpoint "
                                     "(e.g. an older ckpt-N of the same run) or write this one again")
    return path


def read_variables(prefix: str, root: str = "model") -> Iterator[tuple[str, np.ndarray]]:
    """(path, array) for every variable under `root`, one at a time, sorted by path."""
    reader = tf.train.load_checkpoint(prefix)
    start = f"{root}/"
    for key in sorted(reader.get_variable_to_shape_map()):
        if key.startswith(start) and key.endswith(VALUE_SUFFIX):
            yield key[len(start):-len(VALUE_SUFFIX)], reader.get_tensor(key)


def variable_shapes(prefix: str, root: str = "model") -> dict[str, list[int]]:
    reader = tf.train.load_checkpoint(prefix)
    start = f"{root}/"
    return {key[len(start):-len(VALUE_SUFFIX)]: shape
            for key, shape in reader.get_variable_to_shape_map().items()
            if key.startswith(start) and key.endswith(VALUE_SUFFIX)}
