"""Export a TF checkpoint of ours to a Hugging Face directory (safetensors, config.json, tokenizer).

    python -m checkpoint_utils.export_hf --params OUT/params.yaml --checkpoint OUT --output-dir HF \
        [--tokenizer TOKENIZER]

`transformers.AutoModelForCausalLM.from_pretrained(HF)` loads the result, and
`AutoTokenizer.from_pretrained(HF)` too when a tokenizer is given or known. Tensors are
read one at a time and written in safetensors shards of at most --max-shard-size, so
memory stays near one shard.

config.json takes the dropouts from the params and `bos_token_id`/`eos_token_id` from, in
order: --tokenizer, the `conversion.json` of the converted checkpoint the weights came from
(the checkpoint directory itself, or the run's runconfig.checkpoint_path), or the tokenizer
convert_hf recorded there. With none of them the ids are written as null (unknown).
Re-exporting into the same directory replaces only the exporter's own files.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass

import numpy as np

from checkpoint_utils.hf_config import hf_config_from_params, model_type_of, neox_dropout_note
from checkpoint_utils.hf_tokenizer import copy_tokenizer, recorded_tokenizer
from checkpoint_utils.output_dir import atomic_directory
from config.params import Params, load_params
from config.quiet import add_verbose_flag, quiet_tensorflow
from config.cli import ArgumentParser

DTYPES = {"float32": np.float32, "float16": np.float16}
# Files that only this exporter writes: an earlier export's ones the new export lacks are dropped.
_WEIGHT_FILES = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$|^model\.safetensors\.index\.json$")
# config.json keys that do not change which model it is: a re-export may change them.
_NOT_THE_MODEL = ("torch_dtype", "bos_token_id", "eos_token_id", "embd_pdrop", "attn_pdrop", "resid_pdrop",
                  "attention_dropout", "hidden_dropout", "transformers_version")


@dataclass(frozen=True)
class Exported:
    config: dict
    ids_from: str                  # where bos/eos came from, for the report
    tokenizer_from: str | None     # the tokenizer copied, if any
    dropout_note: str | None       # what config.json cannot say about the dropouts


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

    def model_of(c: dict) -> dict:
        return {k: v for k, v in c.items() if k not in _NOT_THE_MODEL}

    return None if model_of(existing) == model_of(config) else "a different model (its config.json differs)"


def _origin_dirs(params: Params, prefix: str) -> list[str]:
    """Directories that may say where the weights came from: the checkpoint's own, then the
    converted checkpoint a run was warm-started from."""
    dirs = [os.path.dirname(os.path.abspath(prefix))]
    warm = params.runconfig.checkpoint_path
    if warm:
        dirs.append(os.path.abspath(warm if os.path.isdir(warm) else os.path.dirname(warm)))
    return list(dict.fromkeys(dirs))


def _token_ids(tokenizer_arg: str | None, params: Params, prefix: str):
    """(bos, eos, where from, tokenizer source to copy or None, loaded tokenizer or None)."""
    from input.tokenizer import load_tokenizer

    if tokenizer_arg:
        tokenizer = load_tokenizer(tokenizer_arg)
        tokenizer.check_fits_model(params.model.vocab_size)
        return tokenizer.eos_id, tokenizer.eos_id, f"--tokenizer {tokenizer_arg}", tokenizer_arg, tokenizer
    origins = _origin_dirs(params, prefix)
    recorded = next((r for r in map(recorded_tokenizer, origins) if r), None)
    tokenizer = load_tokenizer(recorded) if recorded else None
    for directory in origins:
        path = os.path.join(directory, "conversion.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                source = json.load(f).get("hf_config", {})
            if "eos_token_id" in source:
                return source.get("bos_token_id"), source["eos_token_id"], path, recorded, tokenizer
    if tokenizer is not None:
        return tokenizer.eos_id, tokenizer.eos_id, recorded, recorded, tokenizer
    return None, None, "nowhere (unknown)", None, None


def export(params_path: str, checkpoint: str, output_dir: str, dtype: str = "float32",
           max_shard_bytes: int = 2 << 30, progress: bool = True, tokenizer: str | None = None) -> Exported:
    """Write `checkpoint` as a HF checkpoint in `output_dir` (with the tokenizer, when given or known)."""
    import tensorflow as tf
    from tqdm import tqdm

    from checkpoint_utils.hf_mapping import tensor_groups
    from checkpoint_utils.load import check_checkpoint
    from checkpoint_utils.tf_checkpoint import checkpoint_key, resolve_checkpoint
    from model import weight_shapes

    params = load_params(params_path)
    model = params.model
    prefix = resolve_checkpoint(checkpoint)
    check_checkpoint(prefix, model)
    bos, eos, ids_from, tokenizer_source, loaded = _token_ids(tokenizer, params, prefix)
    config = dict(hf_config_from_params(model, bos, eos), torch_dtype=dtype)
    reader = tf.train.load_checkpoint(prefix)
    groups = tensor_groups(model)
    total = sum(4 * math.prod(s) for s in weight_shapes(model).values())
    with atomic_directory(output_dir, lambda d: _existing(d, config), _WEIGHT_FILES.match) as work:
        shard_files: list[tuple[str, list[str]]] = []
        pending: dict[str, np.ndarray] = {}
        pending_bytes = 0

        def flush():
            from safetensors.numpy import save_file
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
        if tokenizer_source is not None:
            copy_tokenizer(tokenizer_source, loaded, work, model_type_of(model), model.max_position_embeddings)
    return Exported(config, ids_from, tokenizer_source, neox_dropout_note(model))


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
    parser = ArgumentParser(prog="python -m checkpoint_utils.export_hf",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", required=True, help="params YAML with the model: section")
    parser.add_argument("--checkpoint", required=True, help="checkpoint prefix or directory")
    parser.add_argument("--output-dir", required=True,
                        help="directory for the HF checkpoint; re-exporting replaces only the exporter's files")
    parser.add_argument("--tokenizer", default=None,
                        help="the model's tokenizer (directory, tokenizer.json or hub id): copied into the "
                             "export, and its end-of-text id becomes bos/eos_token_id; default: the one "
                             "recorded beside a converted checkpoint, if any")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weight dtype in the export")
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors file, e.g. 500MB, 2GB")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    quiet_tensorflow(args.verbose)
    try:
        result = export(args.params, args.checkpoint, args.output_dir, args.dtype,
                        _parse_size(args.max_shard_size), progress=not args.no_progress, tokenizer=args.tokenizer)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    config = result.config
    if result.dropout_note:
        print(f"note: {result.dropout_note}", file=sys.stderr)
    if config["eos_token_id"] is None:
        print("warning: no tokenizer given or recorded: config.json has bos/eos_token_id null, so generation "
              "will not stop at end-of-text; re-export with --tokenizer", file=sys.stderr)
    tokenizer = f"tokenizer from {result.tokenizer_from}" if result.tokenizer_from else "no tokenizer"
    print(f"exported {config['model_type']} checkpoint to {args.output_dir} (bos/eos_token_id "
          f"{config['bos_token_id']}/{config['eos_token_id']} from {result.ids_from}; {tokenizer})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
