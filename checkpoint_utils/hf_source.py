"""Find a Hugging Face checkpoint (hub id or local directory) and read its tensors one by one.

Supported weight files, in order of preference: sharded safetensors (with
`model.safetensors.index.json`), `model.safetensors`, sharded or single `pytorch_model.bin`
(needs torch; loaded memory-mapped).
"""
from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np

from checkpoint_utils.hf_tokenizer import TOKENIZER_FILES
from checkpoint_utils.host_arrays import aligned_copy
from checkpoint_utils.safetensors_reader import SafetensorsFile

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


def _looks_like_path(source: str) -> bool:
    """Hub ids are `name` or `owner/name`; anything else is meant as a local path."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1


def resolve_source(source: str, revision: str | None = None, cache_dir: str | None = None) -> str:
    """A local directory holding config.json and the weights; hub ids are downloaded
    (or taken from the huggingface_hub cache) with huggingface_hub. A path never touches the network."""
    expanded = os.path.expanduser(source)
    if os.path.isdir(expanded):
        return expanded
    if os.path.exists(expanded) or _looks_like_path(source):
        raise FileNotFoundError(f"--source {source!r} is not a directory; pass the directory that "
                                "holds config.json and the weight files, or a hub id like EleutherAI/gpt-j-6b")
    # Safetensors when the repo has them, else PyTorch bins; only config, weights and the
    # tokenizer files are fetched. With HF_HUB_OFFLINE=1 both calls resolve from the local
    # huggingface_hub cache.
    for patterns in (["config.json", "*.safetensors", SAFETENSORS_INDEX],
                     ["config.json", "pytorch_model*.bin", BIN_INDEX]):
        local = _snapshot(source, revision, cache_dir, patterns + list(TOKENIZER_FILES))
        if any(name.endswith((".safetensors", ".bin")) for name in os.listdir(local)):
            return local
    raise FileNotFoundError(f"hub repo {source!r} (revision {revision or 'main'}) has no "
                            "safetensors or pytorch_model.bin weights")


def _snapshot(source: str, revision: str | None, cache_dir: str | None, patterns: list[str]) -> str:
    """huggingface_hub's snapshot_download, its many-line errors turned into one line for people."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RevisionNotFoundError

    try:
        return snapshot_download(source, revision=revision, cache_dir=cache_dir, allow_patterns=patterns)
    except RevisionNotFoundError:
        raise FileNotFoundError(f"hub repo {source!r} has no revision {revision!r}; check --revision") from None
    except GatedRepoError:
        raise FileNotFoundError(f"hub repo {source!r} is gated: accept its terms on the hub and log in "
                                "(hf auth login), or pass a local directory") from None
    except (HfHubHTTPError, OSError, ValueError) as err:     # not found, offline, no network, bad id
        from huggingface_hub import constants
        if constants.HF_HUB_OFFLINE:
            reason = "HF_HUB_OFFLINE is set and the local hub cache holds no snapshot of it"
        else:
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            reason = first_line.split(". ")[0][:200]
        raise FileNotFoundError(f"--source {source!r} is not a local directory and not reachable on the hub "
                                f"({reason}); pass the directory holding config.json and the weights, or "
                                "check the hub id and the network") from None


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} has no config.json; a Hugging Face checkpoint "
                                "directory needs it to know the architecture")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class HFWeights:
    """Tensor names, shapes and one-at-a-time float32 reads over a checkpoint's weight files."""

    def __init__(self, directory: str):
        self.directory = directory
        self._bin_cache: tuple[str, dict] | None = None
        self._safetensors_files: dict[str, SafetensorsFile] = {}
        self._stored_name: dict[str, str] = {}
        listing = set(os.listdir(directory))
        if SAFETENSORS_INDEX in listing:
            self.kind, self.file_of = "safetensors", self._index(SAFETENSORS_INDEX)
        elif SAFETENSORS_SINGLE in listing:
            self.kind = "safetensors"
            self.file_of = {n: SAFETENSORS_SINGLE for n in self._safetensors(SAFETENSORS_SINGLE).keys()}
        elif BIN_INDEX in listing:
            self.kind, self.file_of = "bin", self._index(BIN_INDEX)
        elif BIN_SINGLE in listing:
            self.kind = "bin"
            self.file_of = {n: BIN_SINGLE for n in self._bin(BIN_SINGLE)}
        else:
            raise FileNotFoundError(
                f"{directory} holds no weights: expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, "
                f"{BIN_SINGLE} or {BIN_INDEX}")

    def _index(self, name: str) -> dict[str, str]:
        with open(os.path.join(self.directory, name), encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{os.path.join(self.directory, name)} has no weight_map")
        missing = sorted({v for v in weight_map.values()
                          if not os.path.isfile(os.path.join(self.directory, v))})
        if missing:
            raise FileNotFoundError(f"{self.directory}: shard(s) listed in {name} are missing: "
                                    f"{', '.join(missing)}; re-download the checkpoint")
        return dict(weight_map)

    def _safetensors(self, filename: str) -> SafetensorsFile:
        if filename not in self._safetensors_files:
            self._safetensors_files[filename] = SafetensorsFile(os.path.join(self.directory, filename))
        return self._safetensors_files[filename]

    def _bin(self, filename: str) -> dict:
        if self._bin_cache is None or self._bin_cache[0] != filename:
            try:
                import torch
            except ImportError:
                raise RuntimeError(f"{filename} is a PyTorch file and torch is not installed: "
                                   "pip install torch (CPU build), or convert a safetensors checkpoint") from None
            path = os.path.join(self.directory, filename)
            try:
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
            self._bin_cache = (filename, state)
        return self._bin_cache[1]

    def use_aliases(self, aliases: dict[str, str]) -> None:
        """Know tensors stored under an alias by their canonical name (when the canonical is absent)."""
        for alias, canonical in aliases.items():
            if alias in self.file_of and canonical not in self.file_of:
                self._stored_name[canonical] = alias
                self.file_of[canonical] = self.file_of.pop(alias)

    def names(self) -> list[str]:
        return sorted(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        filename, stored = self.file_of[name], self._stored_name.get(name, name)
        if self.kind == "safetensors":
            return self._safetensors(filename).shape(stored)
        return tuple(self._bin(filename)[stored].shape)

    def read(self, name: str, keep_dtype: bool = False) -> np.ndarray:
        """The tensor as float32 (our variables are float32; fp16/bf16 widen exactly), or with
        keep_dtype in its stored 16- or 32-bit float type (a bfloat16 loader or converter then
        never holds a float32 copy)."""
        filename, stored = self.file_of[name], self._stored_name.get(name, name)
        if self.kind == "safetensors":
            array = self._safetensors(filename).read(stored)
        else:
            array = _torch_to_numpy(self._bin(filename)[stored])
        keep = keep_dtype and array.dtype in _KEPT_DTYPES
        return array if keep or array.dtype == np.float32 else aligned_copy(array, np.float32)


_KEPT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


def _torch_to_numpy(tensor) -> np.ndarray:
    """A torch CPU tensor's values in an aligned NumPy array of its own (bfloat16 as ml_dtypes'
    bfloat16, which torch's .numpy() refuses), not a view of the memory-mapped file."""
    import torch
    if tensor.dtype == torch.bfloat16:
        return aligned_copy(tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16))
    return aligned_copy(tensor.numpy())
