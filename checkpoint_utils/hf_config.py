"""Translate between a Hugging Face `config.json` (GPT-J, GPT-NeoX) and our `model:` params."""
from __future__ import annotations

import dataclasses

from config.params import InitializerParams, ModelParams, ParamsError
from config.schema import from_dict

MODEL_TYPES = ("gptj", "gpt_neox")

# HF activation names -> ours. gelu_new, gelu_fast and gelu_pytorch_tanh are one formula
# (the tanh approximation) written three ways; they agree to float rounding.
_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_fast": "gelu_new", "gelu_pytorch_tanh": "gelu_new",
                "gelu": "gelu"}


class UnsupportedModelError(ValueError):
    """A checkpoint whose architecture this framework does not implement."""


def _activation(name: str, key: str) -> str:
    if name not in _ACTIVATIONS:
        raise UnsupportedModelError(f"config.json {key}={name!r} is not supported; "
                                    f"supported: {', '.join(sorted(_ACTIVATIONS))}")
    return _ACTIVATIONS[name]


def _neox_rotary(config: dict, head_dim: int) -> tuple[int, float]:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UnsupportedModelError(f"config.json rope type {rope.get('rope_type', rope.get('type'))!r} "
                                    "is not supported; only default rotary embeddings are")
    fraction = rope.get("partial_rotary_factor", config.get("rotary_pct", 0.25))
    base = rope.get("rope_theta", config.get("rotary_emb_base", 10000.0))
    return int(head_dim * fraction), float(base)


def params_from_hf_config(config: dict, vocab_size: int | None = None) -> ModelParams:
    """The `model:` params for a HF config; `vocab_size` may pad the vocabulary beyond the checkpoint's."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise UnsupportedModelError(f"config.json model_type={model_type!r} is not supported; "
                                    f"this framework converts {', '.join(MODEL_TYPES)}")
    std = float(config.get("initializer_range", 0.02))
    init = InitializerParams(name="normal", mean=0.0, stddev=std)
    if model_type == "gptj":
        hidden = config["n_embd"]
        heads = config["n_head"]
        fields = dict(
            vocab_size=config["vocab_size"], hidden_size=hidden, num_hidden_layers=config["n_layer"],
            num_heads=heads, rotary_dim=config.get("rotary_dim") or hidden // heads,
            rotary_style="gptj", filter_size=config.get("n_inner") or 4 * hidden,
            max_position_embeddings=config["n_positions"],
            layer_norm_epsilon=float(config.get("layer_norm_epsilon", 1e-5)),
            nonlinearity=_activation(config.get("activation_function", "gelu_new"), "activation_function"),
            use_ffn_bias=True, use_projection_bias_in_attention=False, use_attention_output_bias=False,
            use_bias_in_output=True, share_embedding_weights=bool(config.get("tie_word_embeddings", False)),
            use_untied_layer_norm=False, use_parallel_residual=True,
            embedding_dropout_rate=float(config.get("embd_pdrop", 0.0)),
            attention_dropout_rate=float(config.get("attn_pdrop", 0.0)),
            residual_dropout_rate=float(config.get("resid_pdrop", 0.0)))
    else:
        hidden = config["hidden_size"]
        heads = config["num_attention_heads"]
        rotary_dim, base = _neox_rotary(config, hidden // heads)
        attention_bias = bool(config.get("attention_bias", True))
        parallel = bool(config.get("use_parallel_residual", True))
        fields = dict(
            vocab_size=config["vocab_size"], hidden_size=hidden,
            num_hidden_layers=config["num_hidden_layers"], num_heads=heads, rotary_dim=rotary_dim,
            rotary_style="neox", rotary_base=base, filter_size=config["intermediate_size"],
            max_position_embeddings=config["max_position_embeddings"],
            layer_norm_epsilon=float(config.get("layer_norm_eps", 1e-5)),
            nonlinearity=_activation(config.get("hidden_act", "gelu"), "hidden_act"),
            use_ffn_bias=True, use_projection_bias_in_attention=attention_bias,
            use_attention_output_bias=attention_bias, use_bias_in_output=False,
            share_embedding_weights=bool(config.get("tie_word_embeddings", False)),
            use_untied_layer_norm=True, use_parallel_residual=parallel,
            # GPT-NeoX drops out the embeddings and both residual branches with one rate.
            embedding_dropout_rate=float(config.get("hidden_dropout", 0.0)),
            attention_dropout_rate=float(config.get("attention_dropout", 0.0)),
            residual_dropout_rate=float(config.get("hidden_dropout", 0.0)))
    if vocab_size is not None:
        if vocab_size < fields["vocab_size"]:
            raise ParamsError(f"--vocab-size {vocab_size} is smaller than the checkpoint's vocab_size "
                              f"{fields['vocab_size']}; it may only pad")
        fields["vocab_size"] = vocab_size
    fields.update(initializer=init, embedding_initializer=init, output_layer_initializer=init)
    raw = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in fields.items()}
    return from_dict(ModelParams, raw, "model")


# model: keys that say how a model is trained or run, not which model it is: params given with a
# Hugging Face checkpoint may set them (the rest comes from its config.json).
RUN_CHOICES = ("fused_qkv", "embedding_dropout_rate", "attention_dropout_rate", "residual_dropout_rate",
               "initializer", "embedding_initializer", "output_layer_initializer", "mixed_precision",
               "mixed_precision_dtype", "lora")


def architecture_differences(hf_model: ModelParams, model: ModelParams) -> list[str]:
    """Where `model` describes another model than `hf_model` (derived from a config.json), as
    "model.key=value (config.json: value)"; RUN_CHOICES may differ and vocab_size may pad."""
    differences = []
    for field in dataclasses.fields(ModelParams):
        ours, theirs = getattr(model, field.name), getattr(hf_model, field.name)
        if field.name in RUN_CHOICES or ours == theirs or (field.name == "vocab_size" and ours > theirs):
            continue
        differences.append(f"model.{field.name}={ours!r} (config.json: {theirs!r})")
    return differences


def model_type_of(model: ModelParams) -> str:
    return "gptj" if model.rotary_style == "gptj" else "gpt_neox"


def _require_switches(model: ModelParams, model_type: str, expected: dict) -> None:
    wrong = {k: getattr(model, k) for k, v in expected.items() if getattr(model, k) != v}
    if wrong:
        desc = ", ".join(f"model.{k}={v!r} (needs {expected[k]!r})" for k, v in wrong.items())
        raise UnsupportedModelError(f"these params cannot be written as a Hugging Face "
                                    f"{model_type} checkpoint: {desc}")


def neox_dropout_note(model: ModelParams) -> str | None:
    """What a GPT-NeoX config.json cannot say about these params' dropouts, if anything."""
    if model_type_of(model) == "gpt_neox" and model.embedding_dropout_rate != model.residual_dropout_rate:
        return (f"model.embedding_dropout_rate={model.embedding_dropout_rate} differs from "
                f"model.residual_dropout_rate={model.residual_dropout_rate}, but GPT-NeoX has one "
                f"hidden_dropout for both; config.json gets hidden_dropout={model.residual_dropout_rate}")
    return None


def hf_config_from_params(model: ModelParams, bos_token_id: int | None, eos_token_id: int | list[int] | None
                          ) -> dict:
    """A config.json that transformers' GPTJConfig / GPTNeoXConfig loads for these params.

    The token ids come from the model's tokenizer or the converted source; None is written as
    null (unknown) rather than left out, since transformers would fill in another model's default."""
    model_type = model_type_of(model)
    activation = model.nonlinearity
    common = dict(model_type=model_type, vocab_size=model.vocab_size,
                  tie_word_embeddings=model.share_embedding_weights,
                  initializer_range=model.initializer.stddev, bos_token_id=bos_token_id,
                  eos_token_id=eos_token_id)
    if model_type == "gptj":
        _require_switches(model, model_type, dict(
            use_ffn_bias=True, use_projection_bias_in_attention=False, use_attention_output_bias=False,
            use_bias_in_output=True, use_untied_layer_norm=False, use_parallel_residual=True,
            rotary_base=10000.0))
        return dict(common, architectures=["GPTJForCausalLM"], n_embd=model.hidden_size,
                    n_layer=model.num_hidden_layers, n_head=model.num_heads, rotary_dim=model.rotary_dim,
                    n_inner=model.filter_size, n_positions=model.max_position_embeddings,
                    layer_norm_epsilon=model.layer_norm_epsilon, activation_function=activation,
                    resid_pdrop=model.residual_dropout_rate, embd_pdrop=model.embedding_dropout_rate,
                    attn_pdrop=model.attention_dropout_rate)
    _require_switches(model, model_type, dict(
        use_ffn_bias=True, use_attention_output_bias=model.use_projection_bias_in_attention,
        use_bias_in_output=False, use_untied_layer_norm=True))
    rotary_pct = model.rotary_dim / model.head_dim
    if int(model.head_dim * rotary_pct) != model.rotary_dim:
        raise UnsupportedModelError(f"model.rotary_dim={model.rotary_dim} is not representable as "
                                    f"GPT-NeoX rotary_pct of head_dim={model.head_dim}")
    return dict(common, architectures=["GPTNeoXForCausalLM"], hidden_size=model.hidden_size,
                num_hidden_layers=model.num_hidden_layers, num_attention_heads=model.num_heads,
                intermediate_size=model.filter_size, max_position_embeddings=model.max_position_embeddings,
                layer_norm_eps=model.layer_norm_epsilon, hidden_act=activation,
                use_parallel_residual=model.use_parallel_residual,
                attention_bias=model.use_projection_bias_in_attention,
                # Both spellings: transformers 4.x reads rotary_pct/rotary_emb_base, 5.x rope_parameters.
                rotary_pct=rotary_pct, rotary_emb_base=model.rotary_base,
                rope_parameters=dict(rope_type="default", rope_theta=model.rotary_base,
                                     partial_rotary_factor=rotary_pct),
                attention_dropout=model.attention_dropout_rate, hidden_dropout=model.residual_dropout_rate)
