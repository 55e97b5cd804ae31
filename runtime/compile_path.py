"""Which compile path a compiled step takes: XLA, or TensorFlow's graph mode (on CPU, graph
mode runs oneDNN's kernels).

`runconfig.jit_compile` is `auto` (the default), `true` (XLA) or `false` (graph mode). `auto`
picks by compute dtype and device, from the measurements in docs/runtime.md:

    GPU / TPU, any dtype   XLA          fuses the many small ops around the matmuls
    CPU, float32           XLA          XLA's fusion beats graph mode's per-op dispatch
    CPU, bfloat16/float16  graph mode   XLA:CPU lowers 16-bit dots without oneDNN's AVX-512
                                        BF16 / AMX kernels; graph mode's matmuls use them
    CPU, multi-worker      graph mode   XLA:CPU cannot compile collectives (TF 2.21 raises
                                        "Collectives are not yet implemented for CPU devices
                                        when compiling with XLA"), and the step all-reduces

Every backend (standard steps, weight-streaming block steps) and the generator compile
through `compile_function`, and the run says once which path it took and why.
"""
from __future__ import annotations

from typing import Callable, Literal, NamedTuple

import tensorflow as tf

from config.params import ParamsError

JitSetting = Literal["auto"] | bool


class CompilePath(NamedTuple):
    jit_compile: bool       # True: XLA; False: graph mode
    reason: str             # why, for the run's log line

    @property
    def name(self) -> str:
        return "XLA" if self.jit_compile else "graph mode"

    def describe(self) -> str:
        return f"compile path: {self.name} ({self.reason})"


def device_type_of(device: str | None) -> str:
    """"GPU", "TPU" or "CPU" for a device string; None: the default device (the first GPU if any)."""
    if device is None:
        return "GPU" if tf.config.list_logical_devices("GPU") else "CPU"
    spec = tf.DeviceSpec.from_string(device)
    return (spec.device_type or "CPU").upper()


def choose_compile_path(setting: JitSetting, compute_dtype: str, device_type: str,
                        cross_worker: bool = False) -> CompilePath:
    """The path for `setting` (runconfig.jit_compile) on this dtype and device type; `cross_worker`:
    the compiled step runs collectives across worker processes (strategy multi_worker)."""
    cpu_collectives = cross_worker and device_type == "CPU"
    if setting is True and cpu_collectives:
        raise ParamsError("runconfig.jit_compile=true cannot run with runconfig.strategy=multi_worker on CPU: "
                          "XLA:CPU has no cross-worker collectives (TensorFlow 2.21); use jit_compile: auto "
                          "or false (graph mode)")
    if setting is True:
        return CompilePath(True, "runconfig.jit_compile: true")
    if setting is False:
        return CompilePath(False, "runconfig.jit_compile: false")
    if setting != "auto":
        raise ValueError(f"jit_compile={setting!r} is not one of auto, true, false")
    if device_type != "CPU":
        return CompilePath(True, f"auto: XLA on {device_type}")
    if cpu_collectives:
        return CompilePath(False, "auto: graph mode for multi-worker on CPU (XLA:CPU has no collectives)")
    if compute_dtype == "float32":
        return CompilePath(True, "auto: XLA for float32 on CPU")
    return CompilePath(False, f"auto: oneDNN graph mode for {compute_dtype} on CPU "
                              "(XLA:CPU does not use the 16-bit matmul units)")


def compile_function(function: Callable, path: CompilePath, **kwargs) -> Callable:
    """`function` as a tf.function on `path` (extra kwargs, e.g. input_signature, pass through)."""
    return tf.function(function, jit_compile=path.jit_compile, **kwargs)
