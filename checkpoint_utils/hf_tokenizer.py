"""Tokenizer files beside a checkpoint: recorded by convert_hf, copied into an export.

A Hugging Face directory loads with `transformers.AutoTokenizer.from_pretrained(dir)` when
it holds `tokenizer.json` (or `vocab.json` + `merges.txt`) and a `tokenizer_config.json`
naming the class and the special tokens. convert_hf records the source's tokenizer files
in `<converted>/tokenizer/`, so an export of that checkpoint (or of a run warm-started
from it) finds them without being told.
"""
from __future__ import annotations

import json
import os
import shutil

from input.tokenizer import GptTokenizer

__all__ = ["TOKENIZER_FILES", "RECORDED_TOKENIZER_DIR", "tokenizer_files", "record_tokenizer",
           "recorded_tokenizer", "copy_tokenizer"]

# The files transformers reads for a GPT-2 style BPE; whichever exist are copied.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
RECORDED_TOKENIZER_DIR = "tokenizer"
# transformers' tokenizer class per model_type (both load tokenizer.json or vocab.json + merges.txt).
_TOKENIZER_CLASS = {"gptj": "GPT2Tokenizer", "gpt_neox": "GPTNeoXTokenizer"}


def tokenizer_files(directory: str) -> list[str]:
    """Names of the TOKENIZER_FILES present in `directory`."""
    return [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(directory, name))]


def record_tokenizer(source_dir: str, output_dir: str) -> bool:
    """Copy the tokenizer files of a HF checkpoint directory to `output_dir/tokenizer/`, if it has any."""
    names = tokenizer_files(source_dir)
    if "tokenizer.json" not in names and not {"vocab.json", "merges.txt"} <= set(names):
        return False
    target = os.path.join(output_dir, RECORDED_TOKENIZER_DIR)
    os.makedirs(target, exist_ok=True)
    for name in names:
        shutil.copyfile(os.path.join(source_dir, name), os.path.join(target, name))
    return True


def recorded_tokenizer(checkpoint_dir: str) -> str | None:
    """The tokenizer directory convert_hf recorded beside a converted checkpoint, if any."""
    directory = os.path.join(checkpoint_dir, RECORDED_TOKENIZER_DIR)
    return directory if os.path.isdir(directory) and tokenizer_files(directory) else None


def copy_tokenizer(source: str, tokenizer: GptTokenizer, output_dir: str, model_type: str,
                   max_length: int) -> list[str]:
    """Copy the tokenizer files at `source` (a directory, a file, or a hub id that `tokenizer`
    was loaded from) into `output_dir`, adding a tokenizer_config.json when there is none.

    Returns the names written."""
    local = os.path.expanduser(source)
    if not os.path.exists(local):             # a hub id: the files load_tokenizer fetched
        local = tokenizer.source
    if os.path.isfile(local) and os.path.basename(local) in ("vocab.json", "merges.txt"):
        local = os.path.dirname(local) or "."
    if os.path.isdir(local):
        copies = {name: os.path.join(local, name) for name in tokenizer_files(local)}
    else:                                     # one tokenizers JSON file, whatever its name
        copies = {"tokenizer.json": local}
    for name, path in copies.items():
        shutil.copyfile(path, os.path.join(output_dir, name))
    written = list(copies)
    if "tokenizer_config.json" not in written:
        config = {"tokenizer_class": _TOKENIZER_CLASS[model_type], "bos_token": tokenizer.eos_token,
                  "eos_token": tokenizer.eos_token, "unk_token": tokenizer.eos_token,
                  "add_prefix_space": False, "model_max_length": max_length}
        with open(os.path.join(output_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        written.append("tokenizer_config.json")
    return written
