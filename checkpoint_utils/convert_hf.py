"""Convert a Hugging Face GPT-J / GPT-NeoX checkpoint to a TF checkpoint plus params.yaml.

    python -m checkpoint_utils.convert_hf --source EleutherAI/gpt-j-6b --output-dir converted/gptj6b
    python -m checkpoint_utils.convert_hf --source /path/to/hf_dir --output-dir converted/mine [--dtype bfloat16]

Tensors are read, transformed and written one group at a time (see checkpoint_utils.tf_checkpoint),
so peak memory stays near the largest tensor, not the model. The output directory gets
`ckpt-0.*` + `checkpoint` (for --checkpoint-path), `params.yaml` (the `model:` section derived
from config.json), `conversion.json` (where it came from) and, when the source has one,
`tokenizer/` (its tokenizer files, which export_hf copies into an export). `--dtype bfloat16`
stores the tensors in bfloat16 (half the bytes; a bfloat16 source converts exactly).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import ml_dtypes
import numpy as np
import yaml
from tqdm import tqdm

from checkpoint_utils.hf_checkpoint import ConversionError, HFCheckpoint, check_tensors  # noqa: F401  (re-exported)
from checkpoint_utils.hf_config import params_from_hf_config
from checkpoint_utils.hf_source import HFWeights, resolve_source
from checkpoint_utils.hf_tokenizer import RECORDED_TOKENIZER_DIR, record_tokenizer
from checkpoint_utils.host_arrays import aligned_copy
from checkpoint_utils.output_dir import atomic_directory
from config.params import ModelParams
from config.quiet import add_verbose_flag, quiet_tensorflow
from config.schema import from_dict, to_dict
from config.cli import ArgumentParser

CHECKPOINT_NAME = "ckpt-0"
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}   # --dtype
# What convert writes; anything else in an output directory it rewrites is kept.
_OWN_FILES = {"checkpoint", "params.yaml", "conversion.json", RECORDED_TOKENIZER_DIR}


def _is_own(name: str) -> bool:
    return name in _OWN_FILES or name.startswith(CHECKPOINT_NAME + ".")


def _converted_tensors(weights: HFWeights, groups, shapes: dict, dtype: str, progress: bool):
    """(path, array in `dtype`) of every variable, one group of HF tensors at a time."""
    itemsize = np.dtype(DTYPES[dtype]).itemsize
    total = sum(itemsize * int(math.prod(shapes[p])) for g in groups for p in g.paths)
    with tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not progress,
              file=sys.stderr) as bar:
        for group in groups:
            arrays = group.to_ours([weights.read(name, keep_dtype=True) for name in group.hf_names])
            for path, array in zip(group.paths, arrays):
                if tuple(array.shape) != shapes[path]:  # a bug in the mapping, not in the input
                    raise AssertionError(f"{path}: converted shape {array.shape} != {shapes[path]}")
                if array.dtype != DTYPES[dtype]:        # bfloat16 rounds to nearest even; float32 is exact
                    array = aligned_copy(array, DTYPES[dtype])
                bar.update(array.nbytes)
                yield path, array
            # Drop this group before reading the next: holding it would add one more
            # largest-tensor copy to the peak.
            arrays = array = None


def _existing_model(directory: str, model: ModelParams) -> str | None:
    params_file = os.path.join(directory, "params.yaml")
    if not os.path.isfile(params_file):
        return "files that are not a converted model (no params.yaml)"
    with open(params_file, encoding="utf-8") as f:
        existing = (yaml.safe_load(f) or {}).get("model")
    if existing != to_dict(model):
        return "a different converted model (its params.yaml model section differs)"
    return None


def convert(source: str, output_dir: str, revision: str | None = None, vocab_size: int | None = None,
            fused_qkv: bool = False, progress: bool = True, cache_dir: str | None = None,
            dtype: str = "float32") -> ModelParams:
    """Convert `source` (hub id or directory) into `output_dir` with tensors in `dtype`
    ("float32", or "bfloat16": half the size; loading widens it to float32 variables exactly);
    returns the model params."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    local = resolve_source(source, revision, cache_dir)
    checkpoint = HFCheckpoint(local)
    hf_config = checkpoint.config
    model = params_from_hf_config(hf_config, vocab_size)
    if fused_qkv:
        model = dataclasses.replace(model, fused_qkv=True)
    weights = checkpoint.weights
    groups = checkpoint.check(model)
    from checkpoint_utils.tf_checkpoint import write_checkpoint, write_checkpoint_state
    from model import weight_shapes      # both load TensorFlow: only once the source checks out
    shapes = weight_shapes(model)
    with atomic_directory(output_dir, lambda d: _existing_model(d, model), _is_own) as work:
        keys = write_checkpoint(os.path.join(work, CHECKPOINT_NAME),
                                _converted_tensors(weights, groups, shapes, dtype, progress))
        if len(keys) != len(shapes):
            raise AssertionError(f"wrote {len(keys)} variables, the model has {len(shapes)}")
        write_checkpoint_state(work, CHECKPOINT_NAME)
        with open(os.path.join(work, "params.yaml"), "w", encoding="utf-8") as f:
            f.write(f"# model: section converted from {source} ({hf_config['model_type']}).\n"
                    "# Merge it into a training params file, and pass this directory as "
                    "--checkpoint-path to warm start.\n")
            yaml.safe_dump({"model": to_dict(model)}, f, sort_keys=False)
        with open(os.path.join(work, "conversion.json"), "w", encoding="utf-8") as f:
            json.dump({"source": source, "revision": revision, "resolved_path": os.path.abspath(local),
                       "model_type": hf_config["model_type"], "hf_tensors": len(weights.names()),
                       "variables": len(keys), "dtype": dtype, "hf_config": hf_config}, f, indent=2)
        record_tokenizer(local, work)
    return model


def load_converted_params(directory: str) -> ModelParams:
    with open(os.path.join(directory, "params.yaml"), encoding="utf-8") as f:
        return from_dict(ModelParams, yaml.safe_load(f)["model"], "model")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True,
                        help="hub id (e.g. EleutherAI/gpt-j-6b) or a local HF checkpoint directory")
    parser.add_argument("--output-dir", required=True, help="directory to write the TF checkpoint to")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    parser.add_argument("--cache-dir", default=None, help="huggingface_hub cache (default: HF_HUB_CACHE)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="pad the vocabulary to this size (e.g. a multiple of 64); default: as in config.json")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                        help="tensors of the TF checkpoint: float32, or bfloat16 (half the size, e.g. 12 GB "
                             "for GPT-J 6B; training widens them to float32 variables, generation loads them "
                             "as they are)")
    parser.add_argument("--fused-qkv", action="store_true",
                        help="store attention q/k/v as one fused kernel (model.fused_qkv)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    quiet_tensorflow(args.verbose)
    start = time.time()
    try:
        model = convert(args.source, args.output_dir, args.revision, args.vocab_size, args.fused_qkv,
                        progress=not args.no_progress, cache_dir=args.cache_dir, dtype=args.dtype)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from model import weight_shapes
    n_params = sum(int(math.prod(s)) for s in weight_shapes(model).values())
    print(f"converted {args.source} -> {args.output_dir}: {n_params:,} parameters, "
          f"{model.num_hidden_layers} layers, {args.dtype}, in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
