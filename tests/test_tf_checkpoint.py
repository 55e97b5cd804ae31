"""The piecewise checkpoint writer produces what tf.train.Checkpoint would, and loads check shapes."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf

from layers.tree import flatten_weights
from checkpoint_utils.load import CheckpointMismatchError, load_model
from checkpoint_utils.tf_checkpoint import (read_variables, resolve_checkpoint, write_checkpoint,
                                            write_checkpoint_state)
from model import GPTJModel
from config.params import ModelParams

CONFIG = ModelParams(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_heads=2, rotary_dim=4,
                     filter_size=32, max_position_embeddings=16, use_untied_layer_norm=True)


def _write_model(model, directory, group_bytes=2000):
    arrays = ((path, v.numpy()) for path, v in flatten_weights(model.weights_tree()).items())
    write_checkpoint(os.path.join(directory, "ckpt-0"), arrays, group_bytes=group_bytes)
    write_checkpoint_state(directory, "ckpt-0")


def test_same_keys_as_tf_checkpoint_and_full_restore(tmp_path):
    source = GPTJModel(CONFIG, seed=1)
    _write_model(source, str(tmp_path / "ours"))
    shards = [f for f in os.listdir(tmp_path / "ours") if ".data-" in f]
    assert len(shards) > 3  # small groups really were written separately
    reference = tf.train.Checkpoint(model=source).save(str(tmp_path / "tf" / "ckpt"))
    ours_keys = set(tf.train.load_checkpoint(resolve_checkpoint(str(tmp_path / "ours"))).get_variable_to_shape_map())
    assert ours_keys == set(tf.train.load_checkpoint(reference).get_variable_to_shape_map())
    target = GPTJModel(CONFIG, seed=2)
    tf.train.Checkpoint(model=target).restore(resolve_checkpoint(str(tmp_path / "ours"))).assert_consumed()
    for a, b in zip(source.trainable_variables, target.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    read_back = dict(read_variables(resolve_checkpoint(str(tmp_path / "ours"))))
    np.testing.assert_array_equal(read_back["blocks/1/ln_2/gamma"], source.blocks[1].ln_2.gamma.numpy())


def test_checkpoint_of_the_wrong_shape_is_named(tmp_path):
    _write_model(GPTJModel(CONFIG), str(tmp_path))
    wider = dataclasses.replace(CONFIG, filter_size=48)
    with pytest.raises(CheckpointMismatchError, match=r"blocks/0/mlp/fc_in/kernel has shape \[16, 32\] but "
                                                      r"the params imply \[16, 48\]"):
        load_model(wider, str(tmp_path))
    deeper = dataclasses.replace(CONFIG, num_hidden_layers=3)
    with pytest.raises(CheckpointMismatchError, match="lacks 12 variable"):
        load_model(deeper, str(tmp_path))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no TF checkpoint"):
        resolve_checkpoint(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="ckpt-7.index is missing"):
        resolve_checkpoint(str(tmp_path / "ckpt-7"))


def test_duplicate_tensor_rejected(tmp_path):
    with pytest.raises(ValueError, match="given twice"):
        write_checkpoint(str(tmp_path / "c"), [("a", np.zeros(2)), ("a", np.zeros(2))])
