"""Low-rank adapters (config/lora.py): their variables, initialisation and product.

The adapters live apart from the model's weights (`LoraAdapters`), so the base's weight specs,
checkpoints and loaders stay as they are. At a forward pass `attach` puts each pair into the
targeted Dense layer's weights as {"lora": {"a", "b", "scale", "dropout"}}, and Dense adds its
low-rank update (layers.dense.low_rank_update) to its product: one layer code with and without them.
"""
from __future__ import annotations

import math

import tensorflow as tf

from config.lora import LoraParams, lora_paths, projection_shape
from layers.dropout import fold_seed
from layers.tree import flatten_weights, unflatten_weights

# The dropout site of an adapter's input within its layer (layers/dropout.py; the others use 0-3).
LORA_INPUT = 4


def kaiming_uniform_a(shape: list[int], seed: tf.Tensor) -> tf.Tensor:
    """PEFT's A initialisation, torch's kaiming_uniform_(a=sqrt(5)) of a Linear(in, rank) weight:
    U(-b, b) with b = gain * sqrt(3 / fan_in), gain = sqrt(2 / (1 + 5)), so b = 1 / sqrt(in).
    shape [in, rank]; stateless, so the same seed draws the same A."""
    bound = 1.0 / math.sqrt(shape[0])
    return tf.random.stateless_uniform(shape, seed=seed, minval=-bound, maxval=bound, dtype=tf.float32)


class LoraAdapters(tf.Module):
    """float32 A [in, rank] and B [rank, out] per targeted projection: A drawn as PEFT draws it, B
    zeros (so a fresh adapter leaves the base's outputs unchanged). Only these are trainable.
    `tree` nests them as the model's weights nest ({"blocks": [{"attn": {"q_proj": {"lora_a",
    "lora_b"}}}]}), so a checkpoint of LoraAdapters keys them `lora/tree/blocks/3/attn/q_proj/lora_a`."""

    def __init__(self, config, seed: int = 0):
        """config: ModelParams with `lora` set; seed: the run's (A's draws)."""
        super().__init__(name="lora")
        lora: LoraParams = config.lora
        self.lora = lora
        flat = {}
        for index, path in enumerate(lora_paths(lora, config.num_hidden_layers)):
            in_dim, out_dim = projection_shape(config, path.rsplit("/", 1)[-1])
            seed_of = tf.constant([seed, index], tf.int64)
            flat[f"{path}/lora_a"] = tf.Variable(lambda: kaiming_uniform_a([in_dim, lora.rank], seed_of),
                                                 name="lora_a")                                    # [in, r]
            flat[f"{path}/lora_b"] = tf.Variable(tf.zeros([lora.rank, out_dim]), name="lora_b")   # [r, out]
        self.tree = unflatten_weights(flat)

    @property
    def pairs(self) -> dict[str, tuple[tf.Variable, tf.Variable]]:
        """{projection path: (A, B)} in block order."""
        flat = flatten_weights(self.tree)
        return {path[:-len("/lora_a")]: (a, flat[path[:-len("/lora_a")] + "/lora_b"])
                for path, a in flat.items() if path.endswith("/lora_a")}

    def arrays(self) -> dict[str, tuple]:
        """{projection path: (A [in, r], B [r, out]) as NumPy float32}."""
        return {path: (a.numpy(), b.numpy()) for path, (a, b) in self.pairs.items()}

    def assign(self, arrays: dict[str, tuple], source: str) -> None:
        """Set every pair from {path: (A, B)} (a warm start from `source`); the paths and shapes must
        be these."""
        pairs = self.pairs
        missing = sorted(set(pairs) - set(arrays))
        if missing:
            raise ValueError(f"{source} lacks adapters for {len(missing)} of this run's targets, e.g. {missing[0]}; "
                             "it was trained with other targets: set model.lora.targets to its own")
        for path, (a, b) in pairs.items():
            new_a, new_b = arrays[path]
            if tuple(new_a.shape) != tuple(a.shape) or tuple(new_b.shape) != tuple(b.shape):
                raise ValueError(f"{source}: adapter {path} has A {list(new_a.shape)} and B {list(new_b.shape)}, "
                                 f"but this run needs A {a.shape.as_list()} and B {b.shape.as_list()}: another "
                                 "rank or model (set model.lora.rank to its own)")
            a.assign(new_a)
            b.assign(new_b)

    def attach(self, tree: dict) -> dict:
        """`tree` (a model's weights tree) with each targeted Dense's weights extended by its adapter;
        the rest of the tree is shared, not copied."""
        tree = dict(tree)
        tree["blocks"] = list(tree["blocks"])
        for path, (a, b) in self.pairs.items():
            _, index, group, name = path.split("/")
            block = tree["blocks"][int(index)] = dict(tree["blocks"][int(index)])
            block[group] = dict(block[group])
            block[group][name] = dict(block[group][name], lora={"a": a, "b": b, "scale": self.lora.scale,
                                                                "dropout": self.lora.dropout})
        return tree


PROJECTION_INDEX = {name: i for i, name in enumerate(("q_proj", "k_proj", "v_proj", "qkv_proj", "out_proj",
                                                      "fc_in", "fc_out"))}


def adapter_seed(layer_seed: tf.Tensor | None, projection: str) -> tf.Tensor | None:
    """The dropout seed of `projection`'s adapter input within a layer (None: dropout off)."""
    return None if layer_seed is None else fold_seed(layer_seed, LORA_INPUT, PROJECTION_INDEX[projection])
