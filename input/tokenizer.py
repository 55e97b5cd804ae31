"""GPT-2 byte-level BPE, the tokenizer of GPT-J, through the `tokenizers` library.

`load_tokenizer(source)` accepts what people have at hand: a directory holding
`tokenizer.json` or `vocab.json` + `merges.txt`, one of those files, or a hub id such as
"EleutherAI/gpt-j-6b" (fetched with `huggingface_hub`; an existing local path never
touches the network). The end-of-document id is the id of the `<|endoftext|>` token:
50256 for the GPT-2/GPT-J files, whatever the trainer gave it for our own tokenizers.

Model vocab vs tokenizer vocab: GPT-J pads its embedding to 50400 rows while the tokenizer
knows 50257 tokens. Encoding never produces an id past the tokenizer's vocab; decoding
such an id (a model may sample one) raises `InputDataError` unless `skip_unknown=True`,
which drops it, so a padded row never turns silently into text.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from input.errors import InputDataError

__all__ = ["EOS_TOKEN", "GPT2_EOS_ID", "GptTokenizer", "load_tokenizer", "gpt2_tokenizer_from_files"]

EOS_TOKEN = "<|endoftext|>"
GPT2_EOS_ID = 50256          # id of EOS_TOKEN in the GPT-2 / GPT-J vocab.json
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: the printable bytes stand for themselves,
    the other 68 (controls, space, 0x7f-0xa0, 0xad) for the characters from U+0100 on, in order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    alphabet = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in alphabet.values()]
    alphabet.update({chr(0x100 + i): b for i, b in enumerate(others)})
    return alphabet


_BYTE_OF_CHAR = _byte_level_alphabet()


class GptTokenizer:
    """A loaded byte-level BPE with its EOS id; picklable through `to_json` for worker processes."""

    def __init__(self, tokenizer: Tokenizer, *, eos_token: str = EOS_TOKEN, source: str = "<memory>"):
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise InputDataError(
                f"tokenizer {source} has no {eos_token!r} token to end documents with; use a GPT-2 "
                f"style vocab (input/scripts/train_tokenizer.py adds it) or pass eos_token=")
        self._tokenizer = tokenizer
        # tokenizers >= 0.20 has encode_batch_fast: the same ids without computing character offsets.
        self._encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        self.eos_token = eos_token
        self.eos_id = eos_id
        self.source = source
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; `<|endoftext|>` written in the text maps to the EOS id, as in HF GPT-2."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of many texts at once (the Rust side may use several threads)."""
        return [e.ids for e in self._encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], *, skip_unknown: bool = False) -> str:
        """Text of `ids`; ids past the tokenizer vocab (GPT-J's padding rows) raise unless skipped."""
        ids = [int(i) for i in ids]
        unknown = [i for i in ids if not 0 <= i < self.vocab_size]
        if unknown and not skip_unknown:
            raise InputDataError(
                f"token id {unknown[0]} is outside the tokenizer vocab of {self.vocab_size} "
                f"({self.source}); such ids are model padding rows (e.g. GPT-J's 50400) and have "
                "no text: pass skip_unknown=True to drop them")
        return self._tokenizer.decode([i for i in ids if 0 <= i < self.vocab_size],
                                      skip_special_tokens=False)

    @property
    def base_vocab_size(self) -> int:
        """Tokens of the BPE model itself, without added tokens (50257 for GPT-2/GPT-J's files)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes one token stands for (a piece of a UTF-8 character, possibly), or None for an
        id past the tokenizer vocab. Added tokens (`<|endoftext|>`) are their own text."""
        token = self._tokenizer.id_to_token(int(token_id)) if 0 <= token_id < self.vocab_size else None
        if token is None:
            return None
        if all(c in _BYTE_OF_CHAR for c in token):
            return bytes(_BYTE_OF_CHAR[c] for c in token)
        return token.encode("utf-8")

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id)

    def check_fits_model(self, model_vocab_size: int, where: str = "model.vocab_size") -> None:
        """Fail early when the model cannot embed every id this tokenizer produces."""
        if self.vocab_size > model_vocab_size:
            raise InputDataError(
                f"tokenizer {self.source} has {self.vocab_size} tokens but {where}={model_vocab_size}; "
                f"set {where} to at least {self.vocab_size} or use a smaller tokenizer")

    def to_json(self) -> str:
        return self._tokenizer.to_str()

    @classmethod
    def from_json(cls, text: str, *, eos_token: str = EOS_TOKEN, source: str = "<json>") -> "GptTokenizer":
        return cls(Tokenizer.from_str(text), eos_token=eos_token, source=source)

    @property
    def fingerprint(self) -> str:
        """Short hash of the whole tokenizer definition (so outputs can record what made them)."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()[:16]


def gpt2_tokenizer_from_files(vocab_path: str, merges_path: str, *, eos_token: str = EOS_TOKEN) -> Tokenizer:
    """The GPT-2 pipeline around a vocab.json/merges.txt pair: byte-level split, BPE, byte-level decode."""
    try:
        model = models.BPE.from_file(vocab_path, merges_path)
    except Exception as err:  # the Rust side raises plain Exception with a terse message
        raise InputDataError(f"cannot read BPE files {vocab_path} and {merges_path}: {err}; they must be "
                             "a GPT-2 style vocab.json and merges.txt") from None
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    with open(vocab_path, encoding="utf-8") as f:
        vocab = json.load(f)
    if eos_token in vocab:
        # Registered as special so the text "<|endoftext|>" maps to one id, as in HF's GPT-2.
        tokenizer.add_special_tokens([eos_token])
    return tokenizer


def _from_local(path: str, eos_token: str) -> GptTokenizer:
    if os.path.isdir(path):
        candidates = [os.path.join(path, "tokenizer.json")]
        vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
        if os.path.isfile(candidates[0]):
            return _from_local(candidates[0], eos_token)
        if os.path.isfile(vocab) and os.path.isfile(merges):
            return GptTokenizer(gpt2_tokenizer_from_files(vocab, merges, eos_token=eos_token),
                                eos_token=eos_token, source=path)
        raise InputDataError(f"tokenizer directory {path} has neither tokenizer.json nor vocab.json + "
                             "merges.txt; point at a directory holding them (train one with "
                             "python -m input.scripts.train_tokenizer)")
    name = os.path.basename(path)
    if name == "merges.txt" or name == "vocab.json":
        return _from_local(os.path.dirname(path) or ".", eos_token)
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as err:
        raise InputDataError(f"cannot read tokenizer file {path}: {err}; expected a tokenizers "
                             "tokenizer.json, or pass the directory with vocab.json + merges.txt") from None
    return GptTokenizer(tokenizer, eos_token=eos_token, source=path)


def _download(repo_id: str, revision: str | None, cache_dir: str | None) -> str:
    """Fetch the tokenizer files of a hub repo and return the local path to load."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    def fetch(filename: str) -> str:
        return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir)

    try:
        try:
            return fetch("tokenizer.json")
        except EntryNotFoundError:
            vocab = fetch("vocab.json")
            fetch("merges.txt")
            return os.path.dirname(vocab)
    except Exception as err:
        raise InputDataError(
            f"cannot fetch the tokenizer of hub repo {repo_id!r} ({type(err).__name__}: {err}); "
            "check the id and the network, or pass a local directory with vocab.json + merges.txt") from None


def load_tokenizer(source: str | os.PathLike, *, eos_token: str = EOS_TOKEN,
                   revision: str | None = None, cache_dir: str | None = None) -> GptTokenizer:
    """Load a GPT-2 style tokenizer from a local dir/file, or from a hub id such as "EleutherAI/gpt-j-6b"."""
    text = os.fspath(source)
    path = os.path.expanduser(text)
    if os.path.exists(path):
        return _from_local(path, eos_token)
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return _from_local(_download(text, revision, cache_dir), eos_token)
    raise InputDataError(f"tokenizer {text!r} is neither an existing file/directory nor a hub id "
                         "like 'EleutherAI/gpt-j-6b'; fix the path")
