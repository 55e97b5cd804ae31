"""A LoRA run's checkpoints (runtime/lora.py writes them): the adapters under `lora/tree/...`, the
optimizer and step, and `lora_base`, a JSON record of the base they sit on ({"path", "fingerprint"}:
checkpoint_utils/fingerprint.py). No base weight is in them: a checkpoint of GPT-J 6B's attention
adapters at rank 8 is a few MB.

`MergedLoraWeights` reads such a run as one model: its base's tensors with every targeted kernel
merged, W + (alpha / rank) A B, in float32. Generation, serving and the Hugging Face export load it
like any checkpoint (checkpoint_utils.weight_source.open_weights), in any weight format.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator

import numpy as np

from checkpoint_utils.fingerprint import FingerprintedWeights
from checkpoint_utils.tf_checkpoint import checkpoint_key
from config.lora import LoraParams, lora_paths
from config.params import ModelParams, Params, load_params

BASE_RECORD = "lora_base"          # the tf.train.Checkpoint attribute holding the record
BASE_RECORD_KEY = checkpoint_key("", BASE_RECORD)


class LoraBaseMismatchError(ValueError):
    """LoRA adapters used with another base than the one they were trained on."""


def is_lora_checkpoint(prefix: str) -> bool:
    import tensorflow as tf
    return BASE_RECORD_KEY in tf.train.load_checkpoint(prefix).get_variable_to_shape_map()


def read_base_record(prefix: str) -> dict:
    """{"path": the base's path, "fingerprint": its digest} recorded in a LoRA checkpoint."""
    import tensorflow as tf
    value = tf.train.load_checkpoint(prefix).get_tensor(BASE_RECORD_KEY)
    return json.loads(value.decode() if isinstance(value, bytes) else str(value))


def read_adapters(prefix: str, lora: LoraParams, num_layers: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{projection path: (A [in, r], B [r, out])} of a LoRA checkpoint."""
    import tensorflow as tf
    reader = tf.train.load_checkpoint(prefix)
    return {path: (reader.get_tensor(checkpoint_key("lora", f"tree/{path}/lora_a")),
                   reader.get_tensor(checkpoint_key("lora", f"tree/{path}/lora_b")))
            for path in lora_paths(lora, num_layers)}


def run_params(prefix: str) -> Params:
    """The params.yaml of the run whose checkpoint `prefix` is (it names model.lora)."""
    path = os.path.join(os.path.dirname(os.path.abspath(prefix)), "params.yaml")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{prefix} is a LoRA checkpoint but {path} is missing: it holds the adapters' "
                                "model.lora settings; pass the run's model_dir as it was written")
    params = load_params(path)
    if params.model.lora is None:
        raise ValueError(f"{prefix} is a LoRA checkpoint but {path} has no model.lora section; restore the "
                         "run's own params.yaml")
    return params


def check_base(record: dict, fingerprint: str, base: str, adapters: str) -> None:
    """The base just read is the one `record` names (by content), else one error naming both."""
    if record["fingerprint"] != fingerprint:
        raise LoraBaseMismatchError(
            f"{adapters} holds LoRA adapters trained on the base {record['path']} (fingerprint "
            f"{record['fingerprint'][:16]}), but the base read is {base} (fingerprint {fingerprint[:16]}): "
            "adapters only fit the weights they were trained on; use that base (runconfig.checkpoint_path), "
            "or a new --model-dir for this one")


def merge_kernel(kernel: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """kernel [in, out] + scale * A [in, r] @ B [r, out], in float32 (float64 products summed over r,
    rounded once)."""
    delta = (a.astype(np.float64) @ b.astype(np.float64)) * scale                              # [in, out]
    return (kernel.astype(np.float64) + delta).astype(np.float32)


class MergedLoraWeights:
    """A LoRA run's latest checkpoint as a weight source: the base's tensors, one at a time, each
    targeted kernel merged with its adapter. The base's fingerprint is checked once all is read."""

    def __init__(self, prefix: str, base: str | None = None):
        """base: where the base is now (default: the path the checkpoint recorded)."""
        from checkpoint_utils.weight_source import open_weights
        params = run_params(prefix)
        self.prefix = prefix
        self.lora = params.model.lora
        self.record = read_base_record(prefix)
        self.base_path = base or self.record["path"]
        if not os.path.exists(self.base_path):
            raise FileNotFoundError(f"{prefix} holds LoRA adapters on the base {self.base_path}, which is missing; "
                                    "put the base back at that path")
        self.base = FingerprintedWeights(open_weights(self.base_path))
        self.adapters = read_adapters(prefix, self.lora, params.model.num_hidden_layers)
        self.description = f"LoRA run {prefix} (adapters merged into {self.base.description})"

    def check(self, model: ModelParams) -> None:
        self.base.check(model)

    def arrays(self, model: ModelParams) -> Iterator[tuple[str, np.ndarray]]:
        kernels = {f"{path}/kernel": pair for path, pair in self.adapters.items()}
        for path, array in self.base.arrays(model):
            if path in kernels:
                array = merge_kernel(array, *kernels[path], self.lora.scale)
            yield path, array
            array = None
        check_base(self.record, self.base.fingerprint, self.base_path, self.prefix)
