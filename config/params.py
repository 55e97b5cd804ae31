"""The params file: one YAML with `train_input`, `eval_input`, `model`, `optimizer`, `runconfig`.

The shape follows the Cerebras Model Zoo GPT-J params. `load_params` parses and validates it
once; the result is a tree of frozen dataclasses that the rest of the code reads as is.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import yaml

from config.files import atomic_write_text
from config.lora import LoraParams
from config.schema import ParamsError, from_dict, to_dict

__all__ = [
    "ParamsError", "InitializerParams", "ModelParams", "TrainInputParams", "EvalInputParams",
    "LearningRateSegment", "OptimizerParams", "WeightStreamingParams", "MeshParams", "RunConfig", "Params",
    "load_params", "parse_params", "save_params", "apply_overrides",
]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ParamsError(message)


def _positive(obj, path: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(value > 0, f"{path}.{name}={value} must be positive")


@dataclass(frozen=True)
class InitializerParams:
    name: Literal["truncated_normal", "normal"] = "truncated_normal"
    mean: float = 0.0
    stddev: float = 0.02

    def validate(self, path: str) -> None:
        _require(self.stddev >= 0, f"{path}.stddev={self.stddev} must be >= 0")


@dataclass(frozen=True)
class ModelParams:
    """Architecture. GPT-J and GPT-NeoX differ only by the switches below."""
    vocab_size: int = 50400
    hidden_size: int = 4096
    num_hidden_layers: int = 28
    num_heads: int = 16
    rotary_dim: int = 64
    # "gptj": rotate interleaved pairs (x0,x1),(x2,x3)...; "neox": rotate first half against second.
    rotary_style: Literal["gptj", "neox"] = "gptj"
    rotary_base: float = 10000.0
    filter_size: int = 16384
    max_position_embeddings: int = 2048
    layer_norm_epsilon: float = 1e-5
    nonlinearity: Literal["gelu_new", "gelu"] = "gelu_new"
    use_ffn_bias: bool = True
    use_projection_bias_in_attention: bool = False   # biases of q, k, v
    use_attention_output_bias: bool = False          # bias of the attention output projection
    use_bias_in_output: bool = True                  # bias of the LM head
    share_embedding_weights: bool = False            # tie the LM head to the token embedding
    use_untied_layer_norm: bool = False              # GPT-NeoX: separate LayerNorms for attention and MLP
    use_parallel_residual: bool = True               # x + attn(ln(x)) + mlp(ln(x))
    fused_qkv: bool = False                          # one [hidden, 3*hidden] kernel instead of three
    embedding_dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    residual_dropout_rate: float = 0.0
    initializer: InitializerParams = field(default_factory=InitializerParams)
    embedding_initializer: InitializerParams = field(default_factory=InitializerParams)
    output_layer_initializer: InitializerParams = field(default_factory=InitializerParams)
    mixed_precision: bool = False
    mixed_precision_dtype: Literal["float16", "bfloat16"] = "bfloat16"
    lora: LoraParams | None = None                   # low-rank adapters on a frozen base (config/lora.py)

    # Old names still read (and reported): {old key: current key}.
    RENAMED_KEYS: ClassVar[dict[str, str]] = {"use_ffn_bias_in_attention": "use_attention_output_bias"}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def compute_dtype(self) -> str:
        return self.mixed_precision_dtype if self.mixed_precision else "float32"

    def validate(self, path: str) -> None:
        _positive(self, path, "vocab_size", "hidden_size", "num_hidden_layers", "num_heads",
                  "rotary_dim", "filter_size", "max_position_embeddings", "layer_norm_epsilon",
                  "rotary_base")
        _require(self.hidden_size % self.num_heads == 0,
                 f"{path}.hidden_size={self.hidden_size} is not divisible by "
                 f"{path}.num_heads={self.num_heads}; choose num_heads dividing hidden_size")
        _require(self.rotary_dim % 2 == 0,
                 f"{path}.rotary_dim={self.rotary_dim} must be even (rotary turns pairs of dims)")
        _require(self.rotary_dim <= self.head_dim,
                 f"{path}.rotary_dim={self.rotary_dim} exceeds head_dim={self.head_dim} "
                 f"(hidden_size/num_heads); use at most {self.head_dim}")
        _require(self.use_parallel_residual or self.use_untied_layer_norm,
                 f"{path}.use_parallel_residual=false needs {path}.use_untied_layer_norm=true "
                 "(the sequential block normalises attention and MLP inputs separately)")
        for name in ("embedding_dropout_rate", "attention_dropout_rate", "residual_dropout_rate"):
            rate = getattr(self, name)
            _require(0.0 <= rate < 1.0, f"{path}.{name}={rate} must be in [0, 1)")
        if self.lora is not None:
            self.lora.check_model(f"{path}.lora", self.fused_qkv)


@dataclass(frozen=True)
class TrainInputParams:
    """Where and how a mode reads its data; see docs/data.md for the record format."""
    data_processor: Literal["GptTfRecordsProcessor", "SummarizationTfRecordsProcessor"] = "GptTfRecordsProcessor"
    data_dir: str | tuple[str, ...] = ""
    batch_size: int = 8
    max_sequence_length: int = 2048
    shuffle: bool = True
    shuffle_buffer: int = 10000
    shuffle_seed: int = 0
    repeat: bool = True
    drop_remainder: bool = True
    num_parallel_reads: int = 4
    prefetch_buffer: int = 2
    skip_corrupt_records: bool = False

    @property
    def data_dirs(self) -> tuple[str, ...]:
        return (self.data_dir,) if isinstance(self.data_dir, str) else tuple(self.data_dir)

    def validate(self, path: str) -> None:
        _require(bool(self.data_dirs) and all(self.data_dirs),
                 f"{path}.data_dir is empty; set it to the directory holding the TFRecords")
        _positive(self, path, "batch_size", "max_sequence_length", "shuffle_buffer",
                  "num_parallel_reads", "prefetch_buffer")


@dataclass(frozen=True)
class EvalInputParams(TrainInputParams):
    shuffle: bool = False
    repeat: bool = False
    drop_remainder: bool = False


@dataclass(frozen=True)
class LearningRateSegment:
    """One piece of the Cerebras-style schedule list, run for `steps` (or `decay_steps`)."""
    scheduler: Literal["Linear", "Cosine", "Constant", "Exponential"]
    initial_learning_rate: float | None = None
    end_learning_rate: float | None = None
    learning_rate: float | None = None     # Constant only
    steps: int | None = None
    decay_steps: int | None = None
    alpha: float = 0.0                     # Cosine: final value as a fraction of the initial one
    decay_rate: float | None = None        # Exponential only

    @property
    def length(self) -> int | None:
        return self.steps if self.steps is not None else self.decay_steps

    def validate(self, path: str) -> None:
        needs = {
            "Linear": ("initial_learning_rate", "end_learning_rate"),
            "Cosine": ("initial_learning_rate",),
            "Constant": ("learning_rate",),
            "Exponential": ("initial_learning_rate", "decay_rate"),
        }[self.scheduler]
        for name in needs:
            _require(getattr(self, name) is not None,
                     f"{path}.{name} is required for scheduler {self.scheduler!r}")
        if self.scheduler != "Constant":
            _require(self.length is not None,
                     f"{path}: scheduler {self.scheduler!r} needs `steps` or `decay_steps`")
        if self.length is not None:
            _require(self.length > 0, f"{path}.steps={self.length} must be positive")


@dataclass(frozen=True)
class OptimizerParams:
    optimizer_type: Literal["adamw", "adam", "sgd"] = "adamw"
    learning_rate: float | tuple[LearningRateSegment, ...] = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8
    momentum: float = 0.0
    weight_decay_rate: float = 0.0
    max_gradient_norm: float | None = None
    grad_accum_steps: int = 1
    loss_scaling_factor: float | Literal["dynamic"] = 1.0
    initial_loss_scale: float = 2.0 ** 15
    max_loss_scale: float = 2.0 ** 31
    steps_per_loss_scale_increase: int = 2000

    def validate(self, path: str) -> None:
        _positive(self, path, "epsilon", "grad_accum_steps", "initial_loss_scale",
                  "max_loss_scale", "steps_per_loss_scale_increase")
        _require(0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0,
                 f"{path}.beta1/beta2 must be in [0, 1)")
        _require(self.weight_decay_rate >= 0, f"{path}.weight_decay_rate must be >= 0")
        if self.max_gradient_norm is not None:
            _require(self.max_gradient_norm > 0, f"{path}.max_gradient_norm must be positive")
        if isinstance(self.learning_rate, tuple):
            _require(len(self.learning_rate) > 0, f"{path}.learning_rate is an empty list")
            for i, segment in enumerate(self.learning_rate[:-1]):
                _require(segment.length is not None,
                         f"{path}.learning_rate[{i}] needs `steps`: only the last segment may be open-ended")
        else:
            _require(self.learning_rate >= 0, f"{path}.learning_rate must be >= 0")
        if self.optimizer_type == "adam":
            _require(self.weight_decay_rate == 0.0,
                     f"{path}.weight_decay_rate={self.weight_decay_rate} needs optimizer_type 'adamw' "
                     "(adam has no decoupled weight decay)")


@dataclass(frozen=True)
class WeightStreamingParams:
    host_store: Literal["memory", "disk"] = "memory"
    store_dir: str | None = None          # disk store location; default: <model_dir>/weight_store
    prefetch_blocks: int = 1
    compute_device: str | None = None     # default: first GPU if any, else the CPU

    def validate(self, path: str) -> None:
        _require(self.prefetch_blocks >= 0, f"{path}.prefetch_blocks must be >= 0")


@dataclass(frozen=True)
class MeshParams:
    """A device mesh (data, model): the batch split `data` ways, each layer's weights split
    `model` ways (Megatron layouts, runtime/mesh_layouts.py). data x model must equal the number
    of devices (GPUs, else CPUs: `runconfig.cpu_devices` makes logical ones); that is checked when
    the mesh is built."""
    data: int = 1
    model: int = 1

    @property
    def devices(self) -> int:
        return self.data * self.model

    def validate(self, path: str) -> None:
        _positive(self, path, "data", "model")


@dataclass(frozen=True)
class RunConfig:
    model_dir: str | None = None
    checkpoint_path: str | None = None    # warm start (weights only)
    max_steps: int | None = None
    eval_steps: int | None = None         # None: until the eval input is exhausted
    eval_every_steps: int | None = None
    save_checkpoints_steps: int = 1000
    keep_checkpoint_max: int = 5          # 0 keeps every checkpoint
    save_summary_steps: int = 100
    log_steps: int = 10
    seed: int = 0
    deterministic: bool = False
    jit_compile: Literal["auto"] | bool = "auto"   # auto: per dtype and device (runtime/compile_path.py)
    strategy: Literal["auto", "one_device", "mirrored", "multi_worker"] = "auto"
    # multi_worker: where the workers come from (runtime/cluster.py); slurm: task k of a node listens on port base + k
    cluster: Literal["auto", "tf_config", "slurm"] = "auto"
    slurm_port_base: int = 8888
    execution: Literal["standard", "weight_streaming"] = "standard"
    weight_streaming: WeightStreamingParams = field(default_factory=WeightStreamingParams)
    mesh: MeshParams | None = None        # tensor parallelism: {data: D, model: M}; absent: no mesh
    # Split the host CPU into N logical devices (runtime/devices.py), e.g. for a mesh on a machine
    # without GPUs; absent: TensorFlow's one CPU device.
    cpu_devices: int | None = None
    # Keep only each decoder block's input for the backward pass and recompute the block there
    # (standard execution): activations of one block instead of all, for one more forward pass.
    recompute_activations: bool = False

    def validate(self, path: str) -> None:
        _positive(self, path, "save_checkpoints_steps", "save_summary_steps", "log_steps")
        _require(self.cluster == "auto" or self.strategy == "multi_worker",
                 f"{path}.cluster={self.cluster!r} applies to {path}.strategy=multi_worker (got {self.strategy!r}); "
                 f"set strategy: multi_worker or drop {path}.cluster")
        _require(1024 <= self.slurm_port_base <= 65535,
                 f"{path}.slurm_port_base={self.slurm_port_base} must be a port in 1024..65535")
        if self.cpu_devices is not None:
            _require(self.cpu_devices > 0, f"{path}.cpu_devices={self.cpu_devices} must be a positive number of "
                                           "logical CPU devices (or absent: one)")
        if self.mesh is not None:
            _require(self.execution == "standard",
                     f"{path}.mesh needs {path}.execution=standard (got {self.execution!r}); weight streaming "
                     f"runs on one device: drop {path}.mesh or {path}.execution")
            _require(self.strategy == "auto",
                     f"{path}.mesh replaces {path}.strategy (got {self.strategy!r}): the mesh's data axis is "
                     f"the data parallelism; drop {path}.strategy")
        _require(self.keep_checkpoint_max >= 0, f"{path}.keep_checkpoint_max must be >= 0")
        for name in ("max_steps", "eval_steps", "eval_every_steps"):
            value = getattr(self, name)
            _require(value is None or value > 0, f"{path}.{name}={value} must be positive")


@dataclass(frozen=True)
class Params:
    model: ModelParams
    train_input: TrainInputParams | None = None
    eval_input: EvalInputParams | None = None
    optimizer: OptimizerParams = field(default_factory=OptimizerParams)
    runconfig: RunConfig = field(default_factory=RunConfig)

    def validate(self, path: str) -> None:
        mesh, model = self.runconfig.mesh, self.model
        if mesh is not None:
            # Whole heads and whole filter columns on each device (a vocabulary mesh.model does not
            # divide splits the embedding and head over hidden_size instead: runtime/mesh_layouts.py).
            for name in ("num_heads", "filter_size"):
                _require(getattr(model, name) % mesh.model == 0,
                         f"model.{name}={getattr(model, name)} is not divisible by runconfig.mesh.model="
                         f"{mesh.model}; choose a mesh.model dividing num_heads and filter_size")
            _require(self.optimizer.grad_accum_steps == 1,
                     f"runconfig.mesh runs optimizer.grad_accum_steps=1 only (got {self.optimizer.grad_accum_steps}; "
                     "DTensor cannot split the data-split batch into micro-batches); raise mesh.data instead")
            rates = {name: getattr(model, name) for name in
                     ("embedding_dropout_rate", "attention_dropout_rate", "residual_dropout_rate")}
            _require(not any(rates.values()),
                     f"runconfig.mesh does not run dropout ({', '.join(f'model.{k}={v}' for k, v in rates.items() if v)}): "
                     "DTensor draws stateless masks per device piece, which differ from one device's and are not "
                     "checked to be independent across pieces; set the rates to 0 or drop runconfig.mesh")
            _require(not model.fused_qkv,
                     "runconfig.mesh does not split model.fused_qkv=true ([q | k | v] columns would put "
                     "another projection's heads on a device); use fused_qkv: false")
        if model.lora is not None:
            run = self.runconfig
            _require(mesh is None, "model.lora does not run on runconfig.mesh: the adapters' low-rank products "
                                   "have no Megatron layout here; drop runconfig.mesh (LoRA fits one device)")
            _require(run.execution == "standard",
                     "model.lora runs with runconfig.execution=standard: weight streaming exists to train "
                     "weights larger than memory, while LoRA freezes them (use base_dtype bfloat16 or int8)")
        for name in ("train_input", "eval_input"):
            section = getattr(self, name)
            if section is not None:
                _require(section.max_sequence_length <= self.model.max_position_embeddings,
                         f"{name}.max_sequence_length={section.max_sequence_length} exceeds "
                         f"model.max_position_embeddings={self.model.max_position_embeddings}")


def parse_params(raw: dict, source: str = "params") -> Params:
    """Validate a raw mapping (as read from YAML) into `Params`."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: the top level must be a mapping with sections "
                          "train_input, eval_input, model, optimizer, runconfig")
    try:
        return from_dict(Params, raw, "")
    except ParamsError as err:
        raise ParamsError(f"{source}: {err}") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings (value parsed as YAML) to a raw params mapping."""
    raw = dict(raw)
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key.strip():
            raise ParamsError(f"override {override!r} is not of the form section.key=value "
                              "(e.g. --set model.num_hidden_layers=2)")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ParamsError(f"override {override!r}: value is not valid YAML ({err})") from None
        parts = key.strip().split(".")
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ParamsError(f"override {override!r}: {'.'.join(parts[:depth + 1])} is not a section")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return raw


def load_params(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
                model_defaults: dict | None = None) -> Params:
    """Read, override and validate a params YAML file. model_defaults: values of the model: keys
    the file does not set (a Hugging Face checkpoint's config.json), in place of the schema's."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ParamsError(f"params file {path!r} does not exist; pass --params with a YAML file "
                          "(see configs/ for examples)")
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ParamsError(f"{path}: not valid YAML{where}: "
                              f"{getattr(err, 'problem', None) or err}") from None
    if raw is None:
        raise ParamsError(f"{path} is empty; it needs at least a `model:` section")
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of sections")
    if model_defaults is not None:
        raw = dict(raw, model={**model_defaults, **(raw.get("model") or {})})
    overrides = list(overrides)
    try:
        return from_dict(Params, apply_overrides(raw, overrides), "")
    except ParamsError as err:
        raise ParamsError(f"{_blame(str(err), raw, overrides, path)}: {err}") from None


def _blame(message: str, raw: dict, overrides: list[str], path: str) -> str:
    """What to name as the source of a params error: the override whose key the message names
    (first as its subject, then anywhere), else the file, or the file with the overrides when
    the file alone is valid."""
    keys = [(o, o.partition("=")[0].strip()) for o in overrides]
    for anywhere in (False, True):
        for override, key in reversed(keys):            # the last override of a key is the one in effect
            pattern = rf"(?<![\w.]){re.escape(key)}(?![\w])" if anywhere else rf"{re.escape(key)}(?![\w])"
            if (re.search if anywhere else re.match)(pattern, message):
                return f"override {override!r}"
    if overrides:
        try:
            from_dict(Params, raw, "")
        except ParamsError:
            return path
        return f"{path} with override{'s' if len(overrides) > 1 else ''} {', '.join(map(repr, overrides))}"
    return path


def save_params(params: Params, path: str | os.PathLike) -> None:
    """Write the effective params atomically."""
    atomic_write_text(os.fspath(path), yaml.safe_dump(to_dict(params), sort_keys=False))
