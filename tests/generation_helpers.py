"""Shared builders for the generation tests: a tiny HF model converted to ours, and a
left-padding wrapper around transformers' `generate` to compare against."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from checkpoint_utils.convert_hf import convert
from checkpoint_utils.load import load_model
from tests.hf_models import make_hf_model, save_hf_model

HF_PAD = 1          # pad id given to transformers: never compared (outputs are cut at the stop token)


@dataclass
class ConvertedPair:
    hf: object        # transformers model (eval, float32)
    ours: object      # GPTJModel with the same weights
    vocab_size: int


def converted_pair(kind: str, directory: str, seed: int = 1) -> ConvertedPair:
    """A randomized tiny HF model (every weight perturbed) saved, converted and loaded."""
    hf_model = make_hf_model(kind, seed=seed)
    hf_model.generation_config.eos_token_id = None   # stop tokens are given per test
    save_hf_model(hf_model, os.path.join(directory, "hf"))
    params = convert(os.path.join(directory, "hf"), os.path.join(directory, "tf"), progress=False)
    return ConvertedPair(hf_model, load_model(params, os.path.join(directory, "tf")), params.vocab_size)


def random_prompts(vocab_size: int, lengths: Sequence[int], seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(2, vocab_size, size=n).tolist() for n in lengths]


def hf_generate(hf_model, prompts: Sequence[Sequence[int]], stop_token_ids: Sequence[int] = (),
                **kwargs) -> list[list[int]]:
    """transformers' generate on left-padded prompts with an attention mask (it derives the
    position ids from the mask); new tokens per prompt, cut after the first stop token."""
    import torch
    slots = max(len(p) for p in prompts)
    ids = np.full([len(prompts), slots], HF_PAD, np.int64)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, slots - len(prompt):] = prompt
        mask[row, slots - len(prompt):] = 1
    eos = list(stop_token_ids) or None
    with torch.no_grad():
        out = hf_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), pad_token_id=HF_PAD,
                                eos_token_id=eos, **kwargs)
    return [cut_after_stop(row[slots:].tolist(), stop_token_ids) for row in out]


def cut_after_stop(ids: list[int], stop_token_ids: Sequence[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in stop_token_ids:
            return ids[:i + 1]
    return ids
