"""`model.lora`: low-rank adapters (LoRA, Hu et al. 2021; Hugging Face PEFT's conventions).

Each targeted projection y = x W (+ b) becomes y = x W (+ b) + (alpha / rank) * dropout(x) A B with
A [in, rank] and B [rank, out] trained and W frozen. Targets are named as GPT-J's modules are
(q_proj, k_proj, v_proj, out_proj, fc_in, fc_out; qkv_proj with fused_qkv) or as GPT-NeoX's
(query_key_value, dense, dense_h_to_4h, dense_4h_to_h), which name the same switches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from config.schema import ParamsError

# Our projection names (Dense layers of layers/attention.py and layers/mlp.py) and where they sit.
PROJECTIONS = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "qkv_proj": "attn",
               "out_proj": "attn", "fc_in": "mlp", "fc_out": "mlp"}
# GPT-NeoX's module names for the same projections (PEFT's target_modules for GPT-NeoX).
NEOX_NAMES = {"query_key_value": "qkv_proj", "dense": "out_proj", "dense_h_to_4h": "fc_in",
              "dense_4h_to_h": "fc_out"}


@dataclass(frozen=True)
class LoraParams:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    # How the frozen base weights are held: float32 as trained; bfloat16 (2 bytes per weight); int8
    # weight-only with one scale per output channel (QLoRA's idea with int8). LayerNorms and biases
    # stay float32.
    base_dtype: Literal["float32", "bfloat16", "int8"] = "float32"
    # A PEFT adapter directory (adapter_config.json + adapter_model.safetensors) or a LoRA run's
    # model_dir whose adapters this run starts from, instead of PEFT's initialisation.
    init_adapter: str | None = None

    @property
    def scale(self) -> float:
        """PEFT's scaling of the low-rank product (not rsLoRA's alpha / sqrt(rank))."""
        return self.alpha / self.rank

    def projections(self) -> tuple[str, ...]:
        """The targets as our projection names (GPT-NeoX's names translated), in the given order."""
        return tuple(NEOX_NAMES.get(t, t) for t in self.targets)

    def validate(self, path: str) -> None:
        if self.rank <= 0:
            raise ParamsError(f"{path}.rank={self.rank} must be positive (PEFT recipes for GPT-J use 8 to 16)")
        if self.alpha <= 0:
            raise ParamsError(f"{path}.alpha={self.alpha} must be positive (the update is scaled by alpha / rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise ParamsError(f"{path}.dropout={self.dropout} must be in [0, 1)")
        known = sorted(PROJECTIONS) + sorted(NEOX_NAMES)
        if not self.targets:
            raise ParamsError(f"{path}.targets is empty; name projections among {', '.join(known)}")
        for target in self.targets:
            if target not in PROJECTIONS and target not in NEOX_NAMES:
                raise ParamsError(f"{path}.targets: {target!r} is not a projection; use some of {', '.join(known)}")
        ours = self.projections()
        repeated = sorted({t for t in ours if ours.count(t) > 1})
        if repeated:
            raise ParamsError(f"{path}.targets names {repeated[0]!r} twice (GPT-NeoX names count as GPT-J's: "
                              f"{', '.join(f'{k}={v}' for k, v in NEOX_NAMES.items())}); keep one")

    def check_model(self, path: str, fused_qkv: bool) -> None:
        """The targets exist in a model with (or without) the fused qkv projection."""
        ours = self.projections()
        if fused_qkv and {"q_proj", "k_proj", "v_proj"} & set(ours):
            raise ParamsError(f"{path}.targets names q_proj/k_proj/v_proj but model.fused_qkv=true has one qkv "
                              "projection; target qkv_proj (query_key_value) instead")
        if not fused_qkv and "qkv_proj" in ours:
            raise ParamsError(f"{path}.targets names qkv_proj (query_key_value) but model.fused_qkv=false has "
                              "separate projections; target q_proj, k_proj and/or v_proj instead")


def lora_paths(lora: LoraParams, num_layers: int) -> list[str]:
    """The weights_tree paths of the targeted Dense layers, e.g. "blocks/3/attn/q_proj", in block order."""
    return [f"blocks/{i}/{PROJECTIONS[name]}/{name}" for i in range(num_layers) for name in lora.projections()]



def projection_shape(config, name: str) -> tuple[int, int]:
    """(in, out) of the projection `name` in a model of `config` (ModelParams)."""
    d, f = config.hidden_size, config.filter_size
    return {"q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "qkv_proj": (d, 3 * d),
            "out_proj": (d, d), "fc_in": (d, f), "fc_out": (f, d)}[name]


def adapter_parameters(config) -> int:
    """Trainable parameters of config.lora's adapters: rank x (in + out) per targeted projection."""
    lora = config.lora
    return sum(lora.rank * sum(projection_shape(config, p.rsplit("/", 1)[-1]))
               for p in lora_paths(lora, config.num_hidden_layers))
