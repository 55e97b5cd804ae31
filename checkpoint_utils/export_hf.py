"""Export a TF checkpoint of ours to a Hugging Face directory (safetensors + config.json).

    python -m checkpoint_utils.export_hf --params OUT/params.yaml --checkpoint OUT --output-dir HF

`transformers.AutoModelForCausalLM.from_pretrained(HF)` loads the result. Tensors are read
one at a time and written in safetensors shards of at most --max-shard-size, so memory
stays near one shard.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
from safetensors.numpy import save_file
from tqdm import tqdm

from checkpoint_utils.hf_config import hf_config_from_params
from checkpoint_utils.hf_mapping import tensor_groups
from checkpoint_utils.output_dir import atomic_directory
from checkpoint_utils.load import check_checkpoint
from checkpoint_utils.tf_checkpoint import checkpoint_key, resolve_checkpoint
from model import weight_shapes
from config.params import load_params

DTYPES = {"float32": np.float32, "float16": np.float16}


def _parse_size(text: str) -> int:
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[:-len(unit)]) * factor)
    return int(text)


def _existing(directory: str, config: dict) -> str | None:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return "files that are not a Hugging Face checkpoint (no config.json)"
    with open(path, encoding="utf-8") as f:
        existing = json.load(f)
    return None if existing == config else "a different model (its config.json differs)"


def export(params_path: str, checkpoint: str, output_dir: str, dtype: str = "float32",
           max_shard_bytes: int = 2 << 30, progress: bool = True) -> dict:
    """Write `checkpoint` as a HF checkpoint in `output_dir`; returns the config written."""
    model = load_params(params_path).model
    prefix = resolve_checkpoint(checkpoint)
    check_checkpoint(prefix, model)
    config = dict(hf_config_from_params(model), torch_dtype=dtype)
    import tensorflow as tf
    reader = tf.train.load_checkpoint(prefix)
    groups = tensor_groups(model)
    total = sum(4 * math.prod(s) for s in weight_shapes(model).values())
    with atomic_directory(output_dir, lambda d: _existing(d, config)) as work:
        shard_files: list[tuple[str, list[str]]] = []
        pending: dict[str, np.ndarray] = {}
        pending_bytes = 0

        def flush():
            nonlocal pending, pending_bytes
            if pending:
                name = f"shard-{len(shard_files):05d}.safetensors"
                save_file(pending, os.path.join(work, name), metadata={"format": "pt"})
                shard_files.append((name, list(pending)))
            pending, pending_bytes = {}, 0

        with tqdm(total=total, unit="B", unit_scale=True, desc="export", disable=not progress,
                  file=sys.stderr) as bar:
            for group in groups:
                ours = [reader.get_tensor(checkpoint_key("model", p)) for p in group.paths]
                bar.update(sum(a.nbytes for a in ours))
                for name, array in zip(group.hf_names, group.to_hf(ours)):
                    array = np.ascontiguousarray(array.astype(DTYPES[dtype], copy=False))
                    if pending_bytes and pending_bytes + array.nbytes > max_shard_bytes:
                        flush()
                    pending[name] = array
                    pending_bytes += array.nbytes
        flush()
        _name_shards(work, shard_files)
        with open(os.path.join(work, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    return config


def _name_shards(directory: str, shard_files: list[tuple[str, list[str]]]) -> None:
    """One shard becomes model.safetensors; several get HF's names plus an index."""
    if len(shard_files) == 1:
        os.replace(os.path.join(directory, shard_files[0][0]), os.path.join(directory, "model.safetensors"))
        return
    weight_map, total_size = {}, 0
    for i, (temp_name, names) in enumerate(shard_files):
        final = f"model-{i + 1:05d}-of-{len(shard_files):05d}.safetensors"
        os.replace(os.path.join(directory, temp_name), os.path.join(directory, final))
        total_size += os.path.getsize(os.path.join(directory, final))
        weight_map.update({n: final for n in names})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, f, indent=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", required=True, help="params YAML with the model: section")
    parser.add_argument("--checkpoint", required=True, help="checkpoint prefix or directory")
    parser.add_argument("--output-dir", required=True, help="directory for the HF checkpoint")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--max-shard-size", default="2GB", help="e.g. 500MB, 2GB")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        config = export(args.params, args.checkpoint, args.output_dir, args.dtype,
                        _parse_size(args.max_shard_size), progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {config['model_type']} checkpoint to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
