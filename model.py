"""GPT-J (and GPT-NeoX, by config switches): the one model definition for training,
evaluation, weight streaming and generation.

    token ids [b, s] -> embedding -> N x DecoderBlock -> final LayerNorm -> LM head -> logits [b, s, V]

Variables are float32; under `model.mixed_precision` the math runs in float16/bfloat16 with
LayerNorm, attention softmax and logits in float32.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, NamedTuple

import tensorflow as tf

from layers import initializers
from layers.attention import KVCache
from layers.base import Layer, weight_variable
from layers.decoder_block import DecoderBlock
from layers.dense import Dense
from layers.dropout import EMBEDDING, dropout, fold_seed
from layers.embedding import TokenEmbedding
from layers.fusion import island
from layers.layer_norm import LayerNorm
from layers.lora import LoraAdapters
from layers.masks import causal_attention_bias
from layers.rotary import rotary_sin_cos
from layers.weight_specs import WeightSpec, weight_shapes, weight_specs  # noqa: F401  (re-exported: model.weight_shapes)
from config import modes
from config.params import ModelParams, Params


class ModelSpec(NamedTuple):
    """What model_fn returns. Sums are kept beside the mean so micro-batches, replicas and
    eval batches aggregate exactly (a mean over counted tokens, not a mean of means)."""
    loss: tf.Tensor                 # scalar float32: cross-entropy averaged over counted tokens
    sums: dict                      # {"loss", "correct", "tokens"}: scalar float32 sums (see loss_sums)


# (block weights, hidden, sin, cos, bias, cache, cache_index, dropout_seed) -> (hidden, cache)
BlockForward = Callable[..., tuple[tf.Tensor, "KVCache | None"]]


class ModelOutput(NamedTuple):
    logits: tf.Tensor                       # [b, s, V] float32
    cache: tuple[KVCache, ...] | None       # one (keys, values) per block, when a cache was given


class GPTJModel(Layer):
    def __init__(self, config: ModelParams, seed: int = 0, name: str = "gptj"):
        super().__init__(name=name)
        self.config = config
        seeds = initializers.SeedStream(seed)
        kernel_init = initializers.Initializer(config.initializer, seeds)
        output_init = initializers.Initializer(config.output_layer_initializer, seeds)
        embedding_init = initializers.Initializer(config.embedding_initializer, seeds)
        self.embedding = TokenEmbedding(config.vocab_size, config.hidden_size, embedding_init,
                                        name="embedding")
        self.blocks = [DecoderBlock(config, kernel_init, output_init, name=f"block_{i}")
                       for i in range(config.num_hidden_layers)]
        self.ln_f = LayerNorm(config.hidden_size, config.layer_norm_epsilon, name="ln_f")
        if not config.share_embedding_weights:
            self.lm_head = Dense(config.hidden_size, config.vocab_size, config.use_bias_in_output,
                                 kernel_init, name="lm_head")
        elif config.use_bias_in_output:
            self.lm_head_bias = weight_variable(initializers.zeros, [config.vocab_size], "lm_head_bias")

    @property
    def compute_dtype(self) -> tf.DType:
        return tf.as_dtype(self.config.compute_dtype)

    def with_compute_dtype(self, dtype: str) -> "GPTJModel":
        """The same layers and variables, running their math in `dtype` ("float32", or
        "bfloat16"/"float16" as mixed precision): generation in 16 bits without a second model."""
        twin = copy.copy(self)
        mixed = dtype != "float32"
        twin.config = dataclasses.replace(self.config, mixed_precision=mixed,
                                          mixed_precision_dtype=dtype if mixed else self.config.mixed_precision_dtype)
        return twin

    # The pieces below are what weight streaming runs one at a time; `forward` chains them.

    def embed(self, weights: dict, input_ids: tf.Tensor, dropout_seed: tf.Tensor | None = None) -> tf.Tensor:
        """input_ids [b, s] -> hidden [b, s, D] in the compute dtype. weights: {"embedding": ...}."""
        hidden = self.embedding.forward(weights["embedding"], input_ids, self.compute_dtype)
        return dropout(hidden, self.config.embedding_dropout_rate, self.layer_seed(dropout_seed, 0), EMBEDDING)

    def weight_compute_dtype(self, path: str) -> tf.DType:
        """The dtype the layer code computes with the weight at `path` (a weights_tree path) in:
        LayerNorm's in float32; every other weight is cast to the compute dtype before use, so
        weight streaming may copy it to the device in that dtype already."""
        return tf.float32 if path.rsplit("/", 1)[-1] in LayerNorm.FLOAT32_WEIGHTS else self.compute_dtype

    def head_weight_names(self) -> tuple[str, ...]:
        """Top-level weight entries the LM head reads (the tied head reads the embedding)."""
        if self.config.share_embedding_weights:
            return ("ln_f", "embedding") + (("lm_head_bias",) if self.config.use_bias_in_output else ())
        return ("ln_f", "lm_head")

    def head(self, weights: dict, hidden: tf.Tensor, float32_logits: bool = True) -> tf.Tensor:
        """hidden [b, s, D] -> logits [b, s, V] float32 (float32_logits=False: in the compute
        dtype, for a loss that casts inside its own fused computation). weights: the entries
        named by head_weight_names."""
        hidden = self.ln_f.forward(weights["ln_f"], hidden)
        if self.config.share_embedding_weights:
            logits = TokenEmbedding.attend(weights["embedding"], hidden)
            if "lm_head_bias" in weights:
                logits = logits + tf.cast(weights["lm_head_bias"], logits.dtype)
        else:
            logits = self.lm_head.forward(weights["lm_head"], hidden)
        return tf.cast(logits, tf.float32) if float32_logits else logits

    def positions(self, position_ids: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """position_ids [b, s] -> rotary (sin, cos), each [b, s, 1, rotary_dim]."""
        c = self.config
        return rotary_sin_cos(position_ids, c.rotary_dim, c.rotary_base, c.rotary_style)

    @staticmethod
    def layer_seed(dropout_seed: tf.Tensor | None, layer: int) -> tf.Tensor | None:
        """The dropout seed of layer 0 (the embedding) or layer i + 1 (block i), from the micro-batch's
        (see layers/dropout.py); None when dropout is off."""
        return None if dropout_seed is None else fold_seed(dropout_seed, layer)

    @classmethod
    def block_seed(cls, dropout_seed: tf.Tensor | None, index: int) -> tf.Tensor | None:
        return cls.layer_seed(dropout_seed, index + 1)

    def forward(self, weights: dict, input_ids: tf.Tensor, position_ids: tf.Tensor | None = None,
                attention_mask: tf.Tensor | None = None, cache: tuple[KVCache, ...] | None = None,
                cache_index: tf.Tensor | int = 0, dropout_seed: tf.Tensor | None = None,
                last_only: bool = False, float32_logits: bool = True, recompute_blocks: bool = False) -> ModelOutput:
        """Logits for input_ids [b, s] ([b, 1] of the last position only with last_only).

        position_ids [b, s]: default cache_index + 0..s-1.
        attention_mask [b, s_k]: 1 for real tokens; s_k = s without a cache, the cache length with one.
        cache: per-block (keys, values) [b, h, L, hd]; the new tokens are written at slots
            [cache_index, cache_index + s) and attend to every valid earlier slot. cache_index
            is a scalar, or [b] when each row writes at its own slot (serving's slot batch).
        dropout_seed [2] int: enables dropout (training) with masks derived from it.
        last_only: run the LM head on the last position only (generation's prefill needs no
            other logits, and at V=50k the head is most of a prompt's cost).
        float32_logits=False: logits in the compute dtype (see `head`).
        recompute_blocks: a backward pass keeps each block's input only and runs the block again
            (runconfig.recompute_activations): one block's activations at a time instead of all.
        """
        if cache is not None:
            _check_cache_room(input_ids, cache, cache_index)
        sin, cos, bias = self.attention_inputs(input_ids, position_ids, attention_mask, cache, cache_index)
        block_forward = recomputed(self.blocks[0].forward) if recompute_blocks and cache is None else None
        hidden, new_cache = self.trunk(weights, input_ids, sin, cos, bias, cache, cache_index, dropout_seed,
                                       block_forward)
        if last_only:
            hidden = hidden[:, -1:]                                                # [b, 1, D]
        logits = self.head({name: weights[name] for name in self.head_weight_names()}, hidden, float32_logits)
        return ModelOutput(logits, new_cache)

    def attention_inputs(self, input_ids: tf.Tensor, position_ids: tf.Tensor | None = None,
                         attention_mask: tf.Tensor | None = None, cache: tuple[KVCache, ...] | None = None,
                         cache_index: tf.Tensor | int = 0) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Rotary (sin, cos) [b, s, 1, r] and the causal + padding bias [b, 1, s, s_k] of input_ids [b, s]
        (the defaults of `forward`'s arguments are applied here)."""
        batch, length = tf.shape(input_ids)[0], tf.shape(input_ids)[1]
        cache_index = tf.cast(cache_index, tf.int32)
        if cache_index.shape.rank == 0:
            query_slots = tf.range(length) + cache_index                           # [s]
        else:
            query_slots = cache_index[:, None] + tf.range(length)[None, :]         # [b, s]: per-row starts
        if position_ids is None:
            position_ids = tf.broadcast_to(query_slots, [batch, length])            # [b, s]
        if attention_mask is None:
            key_length = length if cache is None else tf.shape(cache[0][0])[2]
            attention_mask = tf.ones([batch, key_length], tf.int32)
        sin, cos = self.positions(position_ids)
        return sin, cos, causal_attention_bias(query_slots, attention_mask)

    def trunk(self, weights: dict, input_ids: tf.Tensor, sin: tf.Tensor, cos: tf.Tensor, bias: tf.Tensor,
              cache: tuple[KVCache, ...] | None = None, cache_index: tf.Tensor | int = 0,
              dropout_seed: tf.Tensor | None = None, block_forward: BlockForward | None = None,
              on_hidden: Callable[[int, tf.Tensor], None] | None = None
              ) -> tuple[tf.Tensor, tuple[KVCache, ...] | None]:
        """The chain every forward runs: embed, then each block -> (hidden [b, s, D], new cache).

        weights["blocks"] may be any sequence: weight streaming passes one that copies a block to
        the compute device when it is indexed. block_forward(weights, hidden, sin, cos, bias,
        cache, cache_index, seed) replaces the blocks' own code (streaming runs one compiled
        function for every block: blocks differ only by their weights). on_hidden(i, hidden)
        sees the embedding output (i = -1) and every block's output (i = 0..N-1).
        """
        hidden = self.embed(weights, input_ids, dropout_seed)                      # [b, s, D]
        if on_hidden is not None:
            on_hidden(-1, hidden)
        new_cache = []
        for i in range(len(weights["blocks"])):
            run = block_forward or self.blocks[i].forward
            hidden, block_cache = run(weights["blocks"][i], hidden, sin, cos, bias,
                                      None if cache is None else cache[i], cache_index,
                                      self.block_seed(dropout_seed, i))
            new_cache.append(block_cache)
            if on_hidden is not None:
                on_hidden(i, hidden)
        return hidden, None if cache is None else tuple(new_cache)

    def empty_cache(self, batch_size: int, cache_length: int) -> tuple[KVCache, ...]:
        """Zeroed per-block (keys, values), each [b, h, L, hd] in the compute dtype."""
        c = self.config
        shape = [batch_size, c.num_heads, cache_length, c.head_dim]
        return tuple((tf.zeros(shape, self.compute_dtype), tf.zeros(shape, self.compute_dtype))
                     for _ in self.blocks)


def recomputed(block_forward: BlockForward) -> BlockForward:
    """A block's forward (without a cache) whose backward pass runs it again from its input, rather
    than keeping its activations (tf.recompute_grad). Every block's code is the same, so one serves
    all. Under XLA the compiler may merge the two runs (common subexpressions): the saving is
    graph mode's, the result is the same on both paths."""
    def run(weights, hidden, sin, cos, bias, cache, cache_index, seed):
        @tf.recompute_grad
        def block(x):                                                          # [b, s, D] -> [b, s, D]
            return block_forward(weights, x, sin, cos, bias, None, cache_index, seed)[0]
        return block(hidden), None
    return run


class LoraModel(tf.Module):
    """Low-rank adapters (layers/lora.py) over a frozen base: `base` is a weights tree of
    GPTJModel(config) whose variables are not trainable, in model.lora.base_dtype
    (checkpoint_utils.load.load_weight_tree: float32, or packed bfloat16 / int8 kernels). Called
    like a GPTJModel, as model_fn does; its trainable variables are the adapters'."""

    def __init__(self, config: ModelParams, base: dict, adapters: LoraAdapters):
        super().__init__(name="lora_model")
        self.model = build_model_with(config, lambda spec: None)      # the layers' code, without weights
        self.base = base
        self.adapters = adapters

    @property
    def config(self) -> ModelParams:
        return self.model.config

    @property
    def compute_dtype(self) -> tf.DType:
        return self.model.compute_dtype

    def weights(self) -> dict:
        """The base's tree with the adapters attached to their projections."""
        return self.adapters.attach(self.base)

    def empty_cache(self, batch_size: int, cache_length: int) -> tuple[KVCache, ...]:
        return self.model.empty_cache(batch_size, cache_length)

    def __call__(self, *args, **kwargs) -> ModelOutput:
        return self.model.forward(self.weights(), *args, **kwargs)


def _check_cache_room(input_ids: tf.Tensor, cache: tuple[KVCache, ...], cache_index) -> None:
    """The new tokens' slots fit in the cache, checked when the sizes are known while tracing
    (a dynamic update slice would otherwise clamp the start and overwrite earlier slots)."""
    index = tf.get_static_value(cache_index)
    length, slots = input_ids.shape[1], cache[0][0].shape[2]
    if index is None or length is None or slots is None:
        return
    starts = [int(i) for i in getattr(index, "flat", [index])]       # one start, or one per row
    index = min(starts) if min(starts) < 0 else max(starts)
    if int(index) < 0 or int(index) + length > slots:
        raise ValueError(f"writing {length} tokens at cache slot {int(index)} needs {int(index) + length} slots "
                         f"but the cache has {slots}; build it with empty_cache(batch, cache_length >= "
                         f"{int(index) + length})")


def initial_values(config: ModelParams, seed: int):
    """(spec, initial value as float32 NumPy) in creation order, one at a time: the values
    GPTJModel(config, seed) starts from, for stores that cannot build the model in memory."""
    seeds = initializers.SeedStream(seed)
    draw = {"kernel": initializers.Initializer(config.initializer, seeds),
            "output": initializers.Initializer(config.output_layer_initializer, seeds),
            "embedding": initializers.Initializer(config.embedding_initializer, seeds),
            "zeros": initializers.zeros, "ones": initializers.ones}
    for spec in weight_specs(config):
        yield spec, draw[spec.init](spec.shape).numpy()


def loss_weights(features: dict) -> tf.Tensor:
    """[b, s] float32 weight of each label in the loss: the record's input_mask (1 where the
    label is a real token whose loss counts, 0 on padding; see docs/data.md)."""
    return tf.cast(features["input_mask"], tf.float32)


def build_model(params: Params) -> GPTJModel:
    return GPTJModel(params.model, seed=params.runconfig.seed)


def build_model_with(config: ModelParams, variable_for: Callable[[WeightSpec], "tf.Variable | None"]) -> GPTJModel:
    """GPTJModel(config) whose variables are variable_for(spec), asked in creation order, instead
    of initialised ones; no initialiser runs. A loader passes variables it made from checkpoint
    tensors. None leaves that weight out (the layer's attribute holds its WeightSpec, which
    weights_tree() skips): None for every weight gives the model's code without weights, for a
    generation format that keeps its weights in a tree of its own (generation/loading.py)."""
    specs = iter(weight_specs(config))

    def creator(next_creator, **kwargs):
        spec = next(specs, None)
        if (spec is None or spec.path.rsplit("/", 1)[-1] != kwargs.get("name")
                or tuple(kwargs.get("shape") or ()) != spec.shape):
            raise AssertionError(f"variable {kwargs.get('name')} {kwargs.get('shape')} is not the next of "
                                 f"weight_specs ({spec}): layers create their weights with layers.base.weight_variable")
        variable = variable_for(spec)
        return spec if variable is None else variable     # a creator may not return None

    with tf.variable_creator_scope(creator):
        return GPTJModel(config)


@island
def loss_sums(logits: tf.Tensor, labels: tf.Tensor, weights: tf.Tensor) -> dict:
    """The one loss: {"loss": sum of weighted cross-entropy, "correct": weighted count of argmax
    hits, "tokens": sum of weights}, scalars float32. logits [b, s, V] (float32, or the compute
    dtype: cast here, inside the loss's XLA island, rather than as a pass of its own), labels
    [b, s] int, weights [b, s] float32 (`loss_weights`). Every execution path sums with this."""
    logits = tf.cast(logits, tf.float32)
    labels = tf.cast(labels, tf.int32)
    cross_entropy = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)   # [b, s]
    hits = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels), tf.float32)  # [b, s]
    return {"loss": tf.reduce_sum(cross_entropy * weights), "correct": tf.reduce_sum(hits * weights),
            "tokens": tf.reduce_sum(weights)}


def model_fn(features: dict, labels: tf.Tensor, mode: str, params: Params, model: "GPTJModel | LoraModel",
             dropout_seed: tf.Tensor | None = None) -> ModelSpec:
    """Loss for one batch (train and eval; generation calls the model directly).

    features: {"input_ids": int32 [b, s], "input_mask": int32 [b, s]}; labels: int32 [b, s].
    TF2 variables need an owner that outlives one call, so the runtime builds the model once
    (`build_model`) and passes it in; model_fn itself touches no optimizer, checkpoint or device.
    dropout_seed ([2] int) turns dropout on (training).
    """
    if mode not in (modes.TRAIN, modes.EVAL):
        raise ValueError(f"model_fn computes the loss of modes {modes.TRAIN!r} and {modes.EVAL!r}, not {mode!r}")
    logits = model(features["input_ids"], dropout_seed=dropout_seed, float32_logits=False,
                   recompute_blocks=params.runconfig.recompute_activations).logits                # [b, s, V]
    sums = loss_sums(logits, labels, loss_weights(features))
    return ModelSpec(tf.math.divide_no_nan(sums["loss"], sums["tokens"]), sums)
