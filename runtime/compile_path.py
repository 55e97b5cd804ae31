"""Which compile path a compiled step takes: XLA, or TensorFlow's graph mode (on CPU, graph
mode runs oneDNN's kernels).

`runconfig.jit_compile` is `auto` (the default), `true` (XLA) or `false` (graph mode). `auto`
picks by compute dtype and device, from the measurements in docs/runtime.md:

    GPU / TPU, any dtype   XLA          fuses the many small ops around the matmuls
    CPU, float32           XLA          XLA's fusion beats graph mode's per-op dispatch
    CPU, bfloat16/float16  graph mode   XLA:CPU lowers 16-bit dots without oneDNN's AVX-512
                                        BF16 / AMX kernels; graph mode's matmuls use them
    CPU, several replicas  graph mode   a step over several CPU devices (mirrored) or worker
                                        processes (multi_worker) does not compile on XLA:CPU:
                                        it has no collectives (TF 2.21: "Collectives are not
                                        yet implemented for CPU devices when compiling with
                                        XLA") and one cluster cannot reach another device's
                                        variables ("Trying to access resource ... located in
                                        device CPU:1 from device CPU:0")

Every backend (standard steps, weight-streaming block steps) and the generator compile
through `compile_function`, and the run says once which path it took and why.
"""
from __future__ import annotations

import functools
from typing import Callable, Literal, NamedTuple

import tensorflow as tf

from config.params import ParamsError
from layers.fusion import fusion_islands

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
                        replicas: int = 1) -> CompilePath:
    """The path for `setting` (runconfig.jit_compile) on this dtype and device type; `replicas`:
    the devices (of this and other worker processes) one step runs on in sync. A step over
    several replicas all-reduces across devices, which is not one XLA cluster (and XLA:CPU has
    no collectives in TensorFlow 2.21), so it takes graph mode."""
    if setting is True:
        if replicas > 1:
            raise ParamsError(f"runconfig.jit_compile=true cannot compile a step over {replicas} replicas "
                              "(runconfig.strategy mirrored or multi_worker) into one XLA cluster; "
                              "use jit_compile: auto or false (graph mode)")
        return CompilePath(True, "runconfig.jit_compile: true")
    if setting is False:
        return CompilePath(False, "runconfig.jit_compile: false")
    if setting != "auto":
        raise ValueError(f"jit_compile={setting!r} is not one of auto, true, false")
    if replicas > 1:
        return CompilePath(False, f"auto: graph mode for a step over {replicas} replicas")
    if device_type != "CPU":
        return CompilePath(True, f"auto: XLA on {device_type}")
    if compute_dtype == "float32":
        return CompilePath(True, "auto: XLA for float32 on CPU")
    return CompilePath(False, f"auto: oneDNN graph mode for {compute_dtype} on CPU "
                              "(XLA:CPU does not use the 16-bit matmul units)")


def compile_function(function: Callable, path: CompilePath, islands: bool = True, **kwargs) -> Callable:
    """`function` as a tf.function on `path` (extra kwargs, e.g. input_signature, pass through).
    In graph mode with `islands`, the elementwise-heavy pieces marked `layers.fusion.island`
    (the loss, rotary, the optimizer update) become XLA clusters; a step over several devices
    (a mirrored strategy) passes islands=False, as one XLA cluster cannot span devices."""
    islands = islands and not path.jit_compile

    @functools.wraps(function)
    def traced(*args, **kw):
        with fusion_islands(islands):
            return function(*args, **kw)
    return tf.function(traced, jit_compile=path.jit_compile, **kwargs)
