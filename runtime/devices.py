"""`runconfig.cpu_devices`: the host CPU split into N logical devices.

A device mesh (`runconfig.mesh`) or a mirrored strategy needs several devices; on a machine
without GPUs TensorFlow shows one CPU device unless the CPU is split into logical ones, which
must happen before TensorFlow initialises its devices (the first op, or the first listing of
logical devices). Every caller that needs logical CPUs (run.py, bench/mesh.py, the tests that
start their own TensorFlow) calls `set_cpu_devices`, first thing.
"""
from __future__ import annotations

from config.params import ParamsError, RunConfig


def set_cpu_devices(count: int) -> None:
    """Split the (first) physical CPU into `count` logical devices. A no-op when TensorFlow has
    already started with `count` of them; ParamsError when it started with another count."""
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]          # listing physical devices starts nothing
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:                                      # "cannot be modified after being initialized"
        have = len(tf.config.list_logical_devices("CPU"))
        if have != count:
            raise ParamsError(f"runconfig.cpu_devices={count}: TensorFlow has already started in this process with "
                              f"{have} CPU device(s), and the count is fixed from then on; apply it before "
                              "TensorFlow runs anything (run.py does, first thing), or use a fresh process") from None


def configure_devices(run: RunConfig) -> None:
    """Apply runconfig's device settings (before anything starts TensorFlow)."""
    if run.cpu_devices is not None:
        set_cpu_devices(run.cpu_devices)
