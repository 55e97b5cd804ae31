"""Tiny random Hugging Face GPT-J / GPT-NeoX models, built offline, as parity oracles."""
from __future__ import annotations

import os

import numpy as np

GPTJ_SHAPES = {
    # rotary_dim < head_dim, vocab not a multiple of 8, odd layer count
    "gptj_basic": dict(vocab_size=101, n_embd=32, n_layer=3, n_head=4, rotary_dim=4, n_inner=None,
                       n_positions=64, bos_token_id=0, eos_token_id=0),
    # rotary over the whole head, one layer, explicit inner size
    "gptj_full_rotary": dict(vocab_size=64, n_embd=24, n_layer=1, n_head=2, rotary_dim=12, n_inner=40,
                             n_positions=32, activation_function="gelu", bos_token_id=0, eos_token_id=0),
}
NEOX_SHAPES = {
    "neox_basic": dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=64, rotary_pct=0.5,
                       hidden_act="gelu", attention_bias=True, use_parallel_residual=True),
    "neox_sequential_nobias": dict(vocab_size=70, hidden_size=48, num_hidden_layers=2,
                                   num_attention_heads=3, intermediate_size=96, max_position_embeddings=32,
                                   rotary_pct=0.25, hidden_act="gelu_new", attention_bias=False,
                                   use_parallel_residual=False, rotary_emb_base=500.0),
}


def _randomize(model, seed: int) -> None:
    """Default init leaves LayerNorms at 1/0 and biases at 0: perturb every tensor so each matters."""
    import torch
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator) * 0.1
            is_norm_scale = name.endswith(".weight") and ("ln" in name or "norm" in name)
            param.copy_(noise + 1.0 if is_norm_scale else noise)


def make_hf_model(kind: str, seed: int = 0, **overrides):
    """A tiny random transformers model (eval mode, float32) for a name in GPTJ_SHAPES / NEOX_SHAPES,
    with `overrides` of its config (e.g. eos_token_id=5)."""
    import torch
    import transformers
    torch.manual_seed(seed)
    if kind in GPTJ_SHAPES:
        config = transformers.GPTJConfig(**{**GPTJ_SHAPES[kind], **overrides})
        model = transformers.GPTJForCausalLM(config)
    else:
        config = transformers.GPTNeoXConfig(**{**NEOX_SHAPES[kind], **overrides})
        model = transformers.GPTNeoXForCausalLM(config)
    _randomize(model, seed)
    return model.eval()


def save_hf_model(model, directory: str, max_shard_size: str | None = None) -> str:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return directory


def save_pytorch_bin(model, directory: str, shards: int = 1) -> str:
    """The legacy pytorch_model.bin layout (transformers 5 only writes safetensors)."""
    import json

    import torch
    os.makedirs(directory, exist_ok=True)
    model.config.to_json_file(os.path.join(directory, "config.json"))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if shards == 1:
        torch.save(state, os.path.join(directory, "pytorch_model.bin"))
        return directory
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        filename = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = names[i::shards]
        torch.save({n: state[n] for n in part}, os.path.join(directory, filename))
        weight_map.update({n: filename for n in part})
    with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return directory


def hf_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    import torch
    with torch.no_grad():
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = torch.tensor(attention_mask)
        return model(torch.tensor(input_ids), **kwargs).logits.float().numpy()


def random_ids(vocab_size: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, size=(batch, length)).astype(np.int64)
