"""Tiny data and params for runtime tests."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

from config.params import Params, parse_params
from tests.data_helpers import make_tiny_tfrecords

SEQ = 16
VOCAB = 64


def make_data(root: str, train_examples: int = 96, val_examples: int = 16) -> tuple[str, str]:
    train, val = os.path.join(root, "train"), os.path.join(root, "val")
    if not os.path.isdir(train):
        make_tiny_tfrecords(train, num_examples=train_examples, seq_len=SEQ, vocab_size=VOCAB, shard_size=16)
        make_tiny_tfrecords(val, num_examples=val_examples, seq_len=SEQ, vocab_size=VOCAB, shard_size=8,
                            prefix="val", padded_last=True)
    return train, val


def raw_params(data_root: str, **sections) -> dict:
    """A raw params mapping for a 2-layer d=32 GPT-J on the tiny records; `sections` update it."""
    train, val = make_data(data_root)
    raw = {
        "train_input": {"data_dir": train, "batch_size": 8, "max_sequence_length": SEQ, "shuffle_seed": 3},
        "eval_input": {"data_dir": val, "batch_size": 8, "max_sequence_length": SEQ},
        "model": {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_heads": 4,
                  "rotary_dim": 4, "filter_size": 64, "max_position_embeddings": 32},
        "optimizer": {"learning_rate": 3e-3, "weight_decay_rate": 0.01, "max_gradient_norm": 1.0},
        "runconfig": {"max_steps": 6, "log_steps": 1, "save_checkpoints_steps": 2, "save_summary_steps": 2,
                      "deterministic": True},
    }
    raw = copy.deepcopy(raw)
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def tiny_params(data_root: str, **sections) -> Params:
    return parse_params(raw_params(data_root, **sections))


def saved_random_model(root, seed: int, **model):
    """(params.yaml path, the model, its checkpoint prefix) of the tiny params with `model` overrides,
    random weights drawn with `seed`: what the serving tests load."""
    import tensorflow as tf
    import yaml

    from model import GPTJModel
    raw = raw_params(str(root), model=model)
    path = os.path.join(str(root), "params.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(raw, f)
    built = GPTJModel(parse_params(raw).model, seed=seed)
    return path, built, tf.train.Checkpoint(model=built).save(os.path.join(str(root), "weights", "ckpt"))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_result_script(script: str, *args: str, timeout: float = 600) -> dict:
    """Run a Python script in a fresh interpreter (this checkout importable) and return the JSON it
    prints on its `RESULT ` line; its stderr tail is the failure message."""
    done = subprocess.run([sys.executable, "-c", script, *args], env=dict(os.environ, PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
