"""LoRA adapters in Hugging Face PEFT's directory format, both ways:

    adapter_config.json            {"peft_type": "LORA", "r", "lora_alpha", "lora_dropout", "target_modules", ...}
    adapter_model.safetensors      base_model.model.<module>.lora_A.weight [r, in]
                                   base_model.model.<module>.lora_B.weight [out, r]

with <module> GPT-J's `transformer.h.{i}.attn.q_proj` (k_proj, v_proj, out_proj) and
`transformer.h.{i}.mlp.fc_in` (fc_out), or GPT-NeoX's `gpt_neox.layers.{i}.attention.query_key_value`
(dense) and `gpt_neox.layers.{i}.mlp.dense_h_to_4h` (dense_4h_to_h). Ours are A [in, r], B [r, out]
(kernels are [in, out]); NeoX's query_key_value rows are [heads, (q|k|v), head_dim] where our fused
columns are [q | k | v], so B's rows are reordered as the kernel's are (checkpoint_utils/hf_mapping.py).
`peft.PeftModel.from_pretrained(hf_base, directory)` loads what `write_peft_adapter` writes.
"""
from __future__ import annotations

import json
import os

import numpy as np

from checkpoint_utils.hf_config import model_type_of
from checkpoint_utils.output_dir import atomic_directory
from config.lora import NEOX_NAMES, LoraParams, lora_paths
from config.params import ModelParams

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_GPTJ_MODULES = {"q_proj": "attn.q_proj", "k_proj": "attn.k_proj", "v_proj": "attn.v_proj",
                 "out_proj": "attn.out_proj", "fc_in": "mlp.fc_in", "fc_out": "mlp.fc_out"}
_NEOX_MODULES = {ours: ("attention." if ours in ("qkv_proj", "out_proj") else "mlp.") + hf
                 for hf, ours in NEOX_NAMES.items()}


class PeftAdapterError(ValueError):
    """A PEFT adapter directory this model cannot use, or adapters PEFT cannot express."""


def hf_module(model: ModelParams, path: str) -> str:
    """Our projection path "blocks/3/attn/q_proj" -> PEFT's module name of it (without the
    base_model.model. prefix)."""
    _, index, _, name = path.split("/")
    if model_type_of(model) == "gptj":
        if name not in _GPTJ_MODULES:
            raise PeftAdapterError(f"a {name} adapter has no GPT-J module in Hugging Face (it has q_proj, k_proj "
                                   "and v_proj apart); train with model.fused_qkv=false to share it with PEFT")
        return f"transformer.h.{index}.{_GPTJ_MODULES[name]}"
    if name not in _NEOX_MODULES:
        raise PeftAdapterError(f"a {name} adapter has no GPT-NeoX module in Hugging Face (q, k and v are one "
                               "query_key_value there); train with model.fused_qkv=true and target qkv_proj")
    return f"gpt_neox.layers.{index}.{_NEOX_MODULES[name]}"


def _neox_rows(model: ModelParams, inverse: bool):
    """Row order of a fused qkv output between ours ([3, heads, head_dim]) and NeoX's ([heads, 3, head_dim])."""
    h, hd = model.num_heads, model.head_dim
    order = np.arange(3 * h * hd).reshape(3, h, hd).transpose(1, 0, 2).reshape(-1)   # NeoX row -> our row
    return np.argsort(order) if inverse else order


def to_peft_tensors(model: ModelParams, arrays: dict) -> dict[str, np.ndarray]:
    """{our path: (A [in, r], B [r, out])} -> PEFT's {key: tensor} (torch layout, float32)."""
    tensors = {}
    for path, (a, b) in arrays.items():
        b_rows = np.asarray(b, np.float32).T                                                  # [out, r]
        if path.endswith("/qkv_proj") and model_type_of(model) != "gptj":
            b_rows = b_rows[_neox_rows(model, inverse=False)]
        key = f"base_model.model.{hf_module(model, path)}"
        tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(np.asarray(a, np.float32).T)    # [r, in]
        tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(b_rows)
    return tensors


def peft_config(model: ModelParams, lora: LoraParams, base: str | None) -> dict:
    names = {p.rsplit("/", 1)[-1] for p in lora_paths(lora, 1)}
    modules = sorted({hf_module(model, f"blocks/0/x/{n}").rsplit(".", 1)[-1] for n in names})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": lora.rank,
            "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "target_modules": modules, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
            "rank_pattern": {}, "alpha_pattern": {}}


def write_peft_adapter(directory: str, model: ModelParams, arrays: dict, base: str | None = None) -> None:
    """Write adapters {our path: (A, B)} of `model` (model.lora set) as a PEFT directory, atomically."""
    from safetensors.numpy import save_file
    config = peft_config(model, model.lora, base)
    tensors = to_peft_tensors(model, arrays)

    def existing(target: str) -> str | None:
        return None if os.path.isfile(os.path.join(target, CONFIG_FILE)) else "files that are not a PEFT adapter"

    with atomic_directory(directory, existing, lambda name: name in (CONFIG_FILE, WEIGHTS_FILE)) as work:
        save_file(tensors, os.path.join(work, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(work, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)


def is_peft_adapter(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def read_peft_adapter(directory: str, model: ModelParams) -> dict:
    """{our path: (A [in, r], B [r, out])} of a PEFT LoRA directory, checked against `model`
    (model.lora set: its rank, alpha and targets must be the adapter's; one error naming what differs)."""
    from safetensors.numpy import load_file
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{directory} is not a PEFT adapter directory (no {CONFIG_FILE})")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    where = f"PEFT adapter {directory}"
    if config.get("peft_type") != "LORA":
        raise PeftAdapterError(f"{where} is a {config.get('peft_type')} adapter; only LORA loads here")
    unsupported = [k for k in ("use_dora", "use_rslora", "fan_in_fan_out") if config.get(k)]
    unsupported += [k for k in ("rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save")
                    if config.get(k)]
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']!r}")
    if unsupported:
        raise PeftAdapterError(f"{where} uses {', '.join(unsupported)}, which this framework's LoRA does not run; "
                               "retrain it with PEFT's defaults for those")
    lora = model.lora
    wanted = peft_config(model, lora, None)
    differences = [f"model.lora.{ours}={getattr(lora, ours)!r} ({key}: {config.get(key)!r})"
                   for ours, key in (("rank", "r"), ("alpha", "lora_alpha"))
                   if float(getattr(lora, ours)) != float(config.get(key, -1))]
    targets = config.get("target_modules")
    if isinstance(targets, str) or sorted(targets or []) != wanted["target_modules"]:
        differences.append(f"model.lora.targets={list(lora.targets)!r} (target_modules: {targets!r})")
    if differences:
        raise PeftAdapterError(f"{where} differs from this run's adapters: {'; '.join(differences)}; set those "
                               "model.lora keys to the adapter's")
    tensors = load_file(os.path.join(directory, WEIGHTS_FILE))
    prefixes = ("base_model.model.", "")
    arrays = {}
    for path in lora_paths(lora, model.num_hidden_layers):
        module = hf_module(model, path)
        found = [p for p in prefixes if f"{p}{module}.lora_A.weight" in tensors]
        if not found:
            raise PeftAdapterError(f"{where} has no tensor {prefixes[0]}{module}.lora_A.weight; it was trained on "
                                   "another model (the number of layers or the model type differs)")
        key = f"{found[0]}{module}"
        a, b_rows = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]   # [r, in], [out, r]
        if path.endswith("/qkv_proj") and model_type_of(model) != "gptj":
            b_rows = b_rows[_neox_rows(model, inverse=True)]
        arrays[path] = (np.ascontiguousarray(a.T.astype(np.float32)), np.ascontiguousarray(b_rows.T.astype(np.float32)))
    return arrays
