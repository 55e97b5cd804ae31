"""checkpoint_utils/integrity.py: a checkpoint's files are checked against its index without
reading a tensor, and a directory's checkpoints are tried newest first. The CLI cases (resume,
eval, predict, warm start, export) are in tests/test_corrupt_checkpoint.py and
tests/test_bad_input_cli.py."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from checkpoint_utils.integrity import (CorruptCheckpointError, checkpoint_problem, checkpoints_newest_first,
                                        index_extents, newest_whole_checkpoint)
from checkpoint_utils.tf_checkpoint import (drop_from_checkpoint_state, resolve_checkpoint, write_checkpoint,
                                            write_checkpoint_state)


def sharded_checkpoint(directory: str, name: str = "ckpt-0") -> str:
    """A checkpoint of three 4 KB tensors in a data shard each (write_checkpoint's 4 KB groups), and a
    fourth shard for the object graph."""
    arrays = [(f"w{i}", np.full([1024], i, np.float32)) for i in range(3)]
    prefix = os.path.join(directory, name)
    write_checkpoint(prefix, iter(arrays), group_bytes=4096)
    return prefix


def saved_checkpoints(directory: str, steps=(2, 4, 6)) -> tf.train.Checkpoint:
    """ckpt-<step> for each step, saved as the runtime does (a CheckpointManager)."""
    checkpoint = tf.train.Checkpoint(w=tf.Variable(tf.ones([256])))
    manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=5, checkpoint_name="ckpt")
    for number in steps:
        manager.save(checkpoint_number=number)
    return checkpoint


def test_the_index_tells_each_shard_its_length_and_every_damage_is_named(tmp_path):
    directory, pristine = tmp_path / "ckpt", tmp_path / "pristine"
    prefix = sharded_checkpoint(str(directory))
    count, needed = index_extents(prefix + ".index")
    assert count == 4 and needed == {s: os.path.getsize(directory / f"ckpt-0.data-{s:05d}-of-00004") for s in range(4)}
    assert checkpoint_problem(prefix) is None
    shutil.copytree(directory, pristine)

    def damaged(damage) -> str:
        shutil.rmtree(directory)
        shutil.copytree(pristine, directory)
        damage()
        return checkpoint_problem(prefix)

    middle = directory / "ckpt-0.data-00001-of-00004"
    assert damaged(lambda: os.truncate(middle, needed[1] - 1)) == (
        f"its data file ckpt-0.data-00001-of-00004 is cut short ({needed[1] - 1:,} bytes; its index needs "
        f"{needed[1]:,})")
    assert damaged(lambda: os.unlink(middle)) == "its data file ckpt-0.data-00001-of-00004 is missing"
    assert damaged(lambda: os.unlink(prefix + ".index")) == "its index ckpt-0.index is missing"
    assert damaged(lambda: os.truncate(prefix + ".index", os.path.getsize(prefix + ".index") - 3)).startswith(
        "its index ckpt-0.index is damaged (it does not end in a table footer")
    assert checkpoint_problem(str(directory / "ckpt-9")) == "none of its files exist"


def test_newest_first_follows_the_state_file(tmp_path):
    directory = str(tmp_path)
    saved_checkpoints(directory)
    named = [os.path.join(directory, f"ckpt-{n}") for n in (6, 4, 2)]
    assert checkpoints_newest_first(directory) == named
    write_checkpoint_state(directory, "ckpt-4", ["ckpt-2", "ckpt-4", "ckpt-6"])    # pointed back by hand: obeyed
    assert checkpoints_newest_first(directory) == named[1:]
    moved = str(tmp_path / "former_place")                # an old state file's absolute paths, from before a move
    write_checkpoint_state(directory, os.path.join(moved, "ckpt-6"), [os.path.join(moved, "ckpt-6")])
    assert newest_whole_checkpoint(directory, "") == (named[0], [(os.path.join(moved, "ckpt-6"),
                                                                   "none of its files exist")])
    os.unlink(os.path.join(directory, "checkpoint"))                               # no state file: the files
    assert checkpoints_newest_first(directory) == named
    assert checkpoints_newest_first(str(tmp_path / "nothing")) == []


def test_a_directory_falls_back_with_a_warning_and_a_broken_prefix_is_refused(tmp_path, capsys):
    directory = str(tmp_path)
    saved_checkpoints(directory)
    data = os.path.join(directory, "ckpt-6.data-00000-of-00001")
    os.truncate(data, os.path.getsize(data) // 2)
    os.unlink(os.path.join(directory, "ckpt-4.index"))
    assert resolve_checkpoint(directory) == os.path.join(directory, "ckpt-2")
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and warning.startswith(f"warning: skipped unusable checkpoints in {directory} "
                                                           "(ckpt-6: its data file ckpt-6.data-00000-of-00001 is "
                                                           "cut short (")
    assert "; ckpt-4: its index ckpt-4.index is missing); using ckpt-2, the newest whole one" in warning
    with pytest.raises(CorruptCheckpointError, match=r"checkpoint .*ckpt-6 is unusable: its data file "):
        resolve_checkpoint(os.path.join(directory, "ckpt-6"))
    os.unlink(os.path.join(directory, "ckpt-2.data-00000-of-00001"))
    with pytest.raises(CorruptCheckpointError, match=r"holds checkpoint files \(checkpoint, ckpt-2.index, "
                                                     r"ckpt-4.data-00000-of-00001, ckpt-6.*\) but no whole checkpoint "
                                                     r"\(ckpt-6: .*; ckpt-4: .*; ckpt-2: its data file .* is missing\)"):
        newest_whole_checkpoint(directory, "fix")


def test_a_dropped_checkpoint_is_neither_counted_nor_rotated_by_a_new_manager(tmp_path):
    directory = str(tmp_path)
    checkpoint = saved_checkpoints(directory, steps=(2, 4))
    stamps = list(tf.train.get_checkpoint_state(directory).all_model_checkpoint_timestamps)
    drop_from_checkpoint_state(directory, [os.path.join(directory, "ckpt-4")], os.path.join(directory, "ckpt-2"))
    state = tf.train.get_checkpoint_state(directory)
    assert os.path.basename(state.model_checkpoint_path) == "ckpt-2"
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == ["ckpt-2"]
    assert list(state.all_model_checkpoint_timestamps) == stamps[:1]
    rebuilt = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=1, checkpoint_name="ckpt")
    assert rebuilt.checkpoints == [os.path.join(directory, "ckpt-2")]      # managed: rotated out by the next save
    rebuilt.save(checkpoint_number=3)
    assert sorted(f for f in os.listdir(directory) if f.endswith(".index")) == ["ckpt-3.index", "ckpt-4.index"]
