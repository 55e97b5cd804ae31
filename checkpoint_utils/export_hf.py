"""Export a TF checkpoint of ours to a Hugging Face directory (safetensors, config.json, tokenizer).

    python -m checkpoint_utils.export_hf --params OUT/params.yaml --checkpoint OUT --output-dir HF \
        [--tokenizer TOKENIZER] [--merge-lora | --lora-only]

A LoRA run (model.lora) exports with --merge-lora (its base with the adapters merged, a whole
model) or --lora-only (the adapters as a PEFT adapter directory, a few MB).

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
           max_shard_bytes: int = 2 << 30, progress: bool = True, tokenizer: str | None = None,
           merge_lora: bool = False) -> Exported:
    """Write `checkpoint` as a HF checkpoint in `output_dir` (with the tokenizer, when given or known).
    A LoRA run's checkpoint needs merge_lora: its base with the adapters merged is written."""
    from tqdm import tqdm

    from checkpoint_utils.hf_mapping import tensor_groups
    from checkpoint_utils.lora_checkpoint import MergedLoraWeights
    from checkpoint_utils.tf_checkpoint import resolve_checkpoint
    from checkpoint_utils.weight_source import open_weights
    from model import weight_shapes

    params = load_params(params_path)
    model = params.model
    prefix = resolve_checkpoint(checkpoint)
    source = open_weights(prefix)
    lora = isinstance(source, MergedLoraWeights)
    if lora and not merge_lora:
        raise ValueError(f"{prefix} holds LoRA adapters, not a whole model: pass --merge-lora to write the base with "
                         "them merged, or --lora-only for a PEFT adapter directory")
    if merge_lora and not lora:
        raise ValueError(f"--merge-lora: {prefix} holds no LoRA adapters (it is a whole model); drop --merge-lora")
    source.check(model)
    bos, eos, ids_from, tokenizer_source, loaded = _token_ids(tokenizer, params, prefix)
    config = dict(hf_config_from_params(model, bos, eos), torch_dtype=dtype)
    group_of = {path: group for group in tensor_groups(model) for path in group.paths}
    total = sum(4 * math.prod(s) for s in weight_shapes(model).values())
    with atomic_directory(output_dir, lambda d: _existing(d, config), _WEIGHT_FILES.match) as work:
        shard_files: list[tuple[str, list[str]]] = []
        pending: dict[str, np.ndarray] = {}
        pending_bytes = 0
        waiting: dict[tuple[str, ...], dict[str, np.ndarray]] = {}   # groups of several tensors, part read

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
            # The source's tensors one at a time (largest first), each group written once it is whole.
            for path, array in source.arrays(model):
                bar.update(4 * array.size)
                group = group_of[path]
                parts = waiting.setdefault(group.paths, {})
                parts[path] = array
                if len(parts) < len(group.paths):
                    continue
                ours = [parts[p] for p in group.paths]
                del waiting[group.paths]
                for name, hf_array in zip(group.hf_names, group.to_hf(ours)):
                    hf_array = np.ascontiguousarray(hf_array.astype(DTYPES[dtype], copy=False))
                    if pending_bytes and pending_bytes + hf_array.nbytes > max_shard_bytes:
                        flush()
                    pending[name] = hf_array
                    pending_bytes += hf_array.nbytes
                ours = parts = array = hf_array = None
        flush()
        _name_shards(work, shard_files)
        with open(os.path.join(work, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        if tokenizer_source is not None:
            copy_tokenizer(tokenizer_source, loaded, work, model_type_of(model), model.max_position_embeddings)
    return Exported(config, ids_from, tokenizer_source, neox_dropout_note(model))


def export_lora_adapter(params_path: str, checkpoint: str, output_dir: str) -> str:
    """A LoRA run's adapters as a PEFT adapter directory (checkpoint_utils/peft_adapter.py); returns
    the base recorded in the checkpoint (adapter_config.json's base_model_name_or_path)."""
    from checkpoint_utils.lora_checkpoint import is_lora_checkpoint, read_adapters, read_base_record
    from checkpoint_utils.peft_adapter import write_peft_adapter
    from checkpoint_utils.tf_checkpoint import resolve_checkpoint

    params = load_params(params_path)
    prefix = resolve_checkpoint(checkpoint)
    if params.model.lora is None or not is_lora_checkpoint(prefix):
        raise ValueError(f"--lora-only: {prefix} holds no LoRA adapters (or --params {params_path} has no "
                         "model.lora); pass a LoRA run's model_dir and its params.yaml")
    base = read_base_record(prefix)["path"]
    arrays = read_adapters(prefix, params.model.lora, params.model.num_hidden_layers)
    write_peft_adapter(output_dir, params.model, arrays, base)
    return base


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
    lora = parser.add_mutually_exclusive_group()
    lora.add_argument("--merge-lora", action="store_true",
                      help="the checkpoint is a LoRA run's: write its base with the adapters merged (W + alpha/r A B)")
    lora.add_argument("--lora-only", action="store_true",
                      help="the checkpoint is a LoRA run's: write its adapters as a PEFT adapter directory "
                           "(adapter_config.json + adapter_model.safetensors) for peft.PeftModel.from_pretrained")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    quiet_tensorflow(args.verbose)
    try:
        if args.lora_only:
            base = export_lora_adapter(args.params, args.checkpoint, args.output_dir)
            print(f"exported the LoRA adapters to {args.output_dir} (PEFT format, on the base {base})")
            return 0
        result = export(args.params, args.checkpoint, args.output_dir, args.dtype,
                        _parse_size(args.max_shard_size), progress=not args.no_progress, tokenizer=args.tokenizer,
                        merge_lora=args.merge_lora)
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
