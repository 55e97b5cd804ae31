"""The model a serving command runs: params + a model_dir's latest checkpoint (or a converted
checkpoint) + an optional compute dtype."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from config.params import ParamsError, Params, load_params

if TYPE_CHECKING:       # TensorFlow loads with the model: the CLIs import DTYPES for their --help without it
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


def load_serving_model(params_path: str, model_dir: str | None, checkpoint_path: str | None,
                       dtype: str | None = None, check: Callable[[Params], None] | None = None
                       ) -> tuple[Params, GPTJModel]:
    """(params, model with restored weights). Exactly one of model_dir (its latest checkpoint) and
    checkpoint_path (a prefix or a converted model directory) names the weights. check(params)
    runs before the model is built (the memory preflight)."""
    if (model_dir is None) == (checkpoint_path is None):
        raise ParamsError("give exactly one of --model-dir (a run directory) and --checkpoint-path "
                          "(a checkpoint prefix or converted model directory)")
    from checkpoint_utils.load import load_model
    params = load_params(params_path, dtype_overrides(dtype))
    if check is not None:
        check(params)
    return params, load_model(params.model, model_dir or checkpoint_path)
