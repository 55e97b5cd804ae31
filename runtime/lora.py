"""LoRA training state: the frozen base loaded leanly in model.lora.base_dtype, the adapters, and
the record of the base that every checkpoint carries (checkpoint_utils/lora_checkpoint.py).

The base is runconfig.checkpoint_path (a converted checkpoint, another run, or a Hugging Face
directory), read one tensor at a time into its format (checkpoint_utils.load.load_weight_tree):
GPT-J 6B's base is 12.1 GB in bfloat16 and 6.1 GB in int8 with no float32 copy on the way.
Checkpoints hold the adapters, the optimizer's slots for them and the step; never the base.
"""
from __future__ import annotations

import json
import os

import tensorflow as tf

from checkpoint_utils.fingerprint import FingerprintedWeights
from checkpoint_utils.lora_checkpoint import (BASE_RECORD, check_base, is_lora_checkpoint,
                                              read_adapters, read_base_record, run_params)
from checkpoint_utils.load import CheckpointMismatchError, load_weight_tree
from checkpoint_utils.peft_adapter import is_peft_adapter, read_peft_adapter
from checkpoint_utils.tf_checkpoint import resolve_checkpoint
from checkpoint_utils.weight_source import open_weights
from config.params import Params, ParamsError
from layers.lora import LoraAdapters
from model import LoraModel
from runtime.logging_utils import log


def base_path(params: Params) -> str:
    path = params.runconfig.checkpoint_path
    if not path:
        raise ParamsError("model.lora trains adapters on a frozen base: set runconfig.checkpoint_path (or "
                          "--checkpoint-path) to it: a converted checkpoint, a run's model_dir or a Hugging Face "
                          "directory")
    if not os.path.exists(path) and not os.path.exists(path + ".index"):
        raise FileNotFoundError(f"runconfig.checkpoint_path {path} (the LoRA base) does not exist; pass the "
                                "base model's directory or checkpoint prefix")
    return path


def build_lora_model(params: Params) -> tuple[LoraModel, tf.Variable]:
    """(the model: base + adapters, the base record variable {"path", "fingerprint"} as JSON)."""
    config, lora = params.model, params.model.lora
    path = base_path(params)
    source = FingerprintedWeights(open_weights(path))
    log(f"LoRA: loading the base {source.description} as {lora.base_dtype} (frozen)")
    base = load_weight_tree(config, source, lora.base_dtype)
    adapters = LoraAdapters(config, params.runconfig.seed)
    record = {"path": os.path.abspath(path), "fingerprint": source.fingerprint}
    if lora.init_adapter:
        adapters.assign(initial_adapters(params, lora.init_adapter), lora.init_adapter)
        log(f"LoRA: adapters start from {lora.init_adapter}")
    trainable = sum(v.shape.num_elements() for v in adapters.trainable_variables)
    log(f"LoRA: rank {lora.rank} on {', '.join(lora.targets)}: {trainable:,} trainable parameters")
    return LoraModel(config, base, adapters), tf.Variable(json.dumps(record), trainable=False, name=BASE_RECORD)


def initial_adapters(params: Params, source: str) -> dict:
    """{path: (A, B)} from a PEFT adapter directory or another LoRA run (its latest checkpoint)."""
    if os.path.isdir(source) and is_peft_adapter(source):
        return read_peft_adapter(source, params.model)
    prefix = resolve_checkpoint(source)
    if not is_lora_checkpoint(prefix):
        raise ValueError(f"model.lora.init_adapter {source} is neither a PEFT adapter directory (adapter_config.json) "
                         "nor a LoRA run's checkpoint")
    lora = run_params(prefix).model.lora
    if (lora.rank, lora.projections()) != (params.model.lora.rank, params.model.lora.projections()):
        raise ValueError(f"model.lora.init_adapter {source} has rank {lora.rank} on {list(lora.targets)}; set "
                         "model.lora.rank and targets to those")
    return read_adapters(prefix, lora, params.model.num_hidden_layers)


def check_lora_checkpoint(prefix: str, record_variable: tf.Variable) -> None:
    """A checkpoint this LoRA run may resume from: a LoRA checkpoint, on this run's base."""
    if not is_lora_checkpoint(prefix):
        raise CheckpointMismatchError(f"checkpoint {prefix} holds no LoRA adapters (it is a full model's); a LoRA "
                                      "run needs a model_dir of its own: pass a new --model-dir and this checkpoint "
                                      "as its base (--checkpoint-path)")
    ours = json.loads(record_variable.numpy().decode())
    check_base(read_base_record(prefix), ours["fingerprint"], ours["path"], prefix)
