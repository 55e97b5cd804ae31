"""The model a serving command runs: params + weights (a model_dir's latest checkpoint, a converted
checkpoint or a Hugging Face directory) + an optional compute dtype, loaded straight into its
weight format (generation/loading.py)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from config.params import ParamsError, Params, load_params

if TYPE_CHECKING:       # TensorFlow loads with the model: the CLIs import DTYPES for their --help without it
    from generation.weights import GenerationModel
    from model import GPTJModel

DTYPES = ("float32", "bfloat16", "float16")


def dtype_overrides(dtype: str | None) -> list[str]:
    """params overrides that make the model compute in `dtype` (None: as the params say)."""
    if dtype is None:
        return []
    if dtype not in DTYPES:
        raise ParamsError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if dtype == "float32":
        return ["model.mixed_precision=false"]
    return ["model.mixed_precision=true", f"model.mixed_precision_dtype={dtype}"]


def serving_params(params_path: str | None, hf_checkpoint: str | None, dtype: str | None = None) -> Params:
    """The params of a serving command: --params, or with --hf-checkpoint its config.json's
    model: section (--params optional then: hf_checkpoint.hf_checkpoint_params)."""
    from checkpoint_utils.hf_checkpoint import hf_checkpoint_params
    overrides = dtype_overrides(dtype)
    if hf_checkpoint is not None:
        return hf_checkpoint_params(hf_checkpoint, params_path, overrides)
    if params_path is None:
        raise ParamsError("--params is required (unless the weights are an --hf-checkpoint)")
    return load_params(params_path, overrides)


def weights_source(model_dir: str | None, checkpoint_path: str | None, hf_checkpoint: str | None = None) -> str:
    """The one weights source given: --model-dir (its latest checkpoint), --checkpoint-path or --hf-checkpoint."""
    given = [s for s in (model_dir, checkpoint_path, hf_checkpoint) if s is not None]
    if len(given) != 1:
        raise ParamsError("give exactly one of --model-dir (a run directory), --checkpoint-path (a checkpoint "
                          "prefix or converted model directory) and --hf-checkpoint (a Hugging Face directory)")
    return given[0]


def load_serving_model(params_path: str | None, model_dir: str | None, checkpoint_path: str | None,
                       dtype: str | None = None, weight_format: str = "float32", hf_checkpoint: str | None = None,
                       check: Callable[[Params], None] | None = None) -> tuple[Params, GPTJModel | GenerationModel]:
    """(params, model with its weights in `weight_format`) from exactly one of model_dir,
    checkpoint_path and hf_checkpoint. check(params) runs before the model is built (the memory
    preflight)."""
    source = weights_source(model_dir, checkpoint_path, hf_checkpoint)
    params = serving_params(params_path, hf_checkpoint, dtype)
    if check is not None:
        check(params)
    from generation.loading import load_generation_model
    return params, load_generation_model(params.model, source, weight_format)
