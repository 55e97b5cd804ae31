"""Benchmark: tensor parallelism on a device mesh (runconfig.mesh) beside one device.

    python -m bench.mesh [--data 2] [--model 2] [--hidden-size 256] [--layers 4] [--steps 6]

Trains the same GPT-J-shaped model on the same synthetic batches on one device (graph mode,
as the mesh runs) and on a data x model mesh, and prints: the seconds per step, the largest
loss difference, and the bytes of weights + Adam state each mesh device holds against one
device's. Without GPUs the mesh is made of logical CPU devices that share this machine's
cores: the step time then shows the cost of DTensor's expansion and collectives, not a speedup.
"""
from __future__ import annotations

import os
import sys
import tempfile

if __name__ == "__main__":
    from config.quiet import quiet_tensorflow
    quiet_tensorflow("--verbose" in sys.argv[1:])

from config.cli import ArgumentParser
from config.quiet import add_verbose_flag

MiB = 1 << 20


def device_bytes(estimator) -> int:
    """Bytes of weights and optimizer state on the first device (the whole of it without a mesh)."""
    import tensorflow as tf
    from runtime.mesh_layouts import local_shapes
    state = list(estimator.model.trainable_variables) + list(estimator.execution.optimizer.variables)
    total = 0
    for variable in state:
        shape = local_shapes(variable)[0] if hasattr(estimator.execution, "mesh") else tuple(variable.shape)
        count = 1
        for n in shape:
            count *= n
        total += count * tf.as_dtype(variable.dtype).size
    return total


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=int, default=2, help="mesh data axis size")
    parser.add_argument("--model", type=int, default=2, help="mesh model axis size (splits each layer)")
    parser.add_argument("--hidden-size", type=int, default=256, help="model.hidden_size")
    parser.add_argument("--layers", type=int, default=4, help="model.num_hidden_layers")
    parser.add_argument("--steps", type=int, default=6, help="training steps per run (the first two are not timed)")
    add_verbose_flag(parser)
    args = parser.parse_args()
    import tensorflow as tf
    from runtime.devices import set_cpu_devices
    if not tf.config.list_physical_devices("GPU"):       # the mesh is made of logical CPU devices
        set_cpu_devices(args.data * args.model)
    from bench.machine import describe_machine
    from bench.weight_streaming import make_params, synthetic_input_fn
    from runtime.estimator import Estimator
    import time
    print(describe_machine())
    d = args.hidden_size
    model = {"vocab_size": 8192, "hidden_size": d, "num_hidden_layers": args.layers, "num_heads": 8,
             "rotary_dim": 16, "filter_size": 4 * d}
    batch, seq = 8, 128
    input_fn = synthetic_input_fn(batch, seq, model["vocab_size"])
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-mesh-") as work:
        for name, extra in (("one device", {}), (f"mesh {args.data}x{args.model}",
                                                 {"mesh": {"data": args.data, "model": args.model}})):
            params = make_params(model, batch, seq, args.steps, {"jit_compile": False, **extra})
            estimator = Estimator(params, os.path.join(work, name.replace(" ", "_")), input_fn=input_fn)
            stamps, losses = [time.perf_counter()], []

            def on_step(step, logs):
                stamps.append(time.perf_counter())
                losses.append(logs["loss"])
            estimator.train(on_step=on_step)
            times = [b - a for a, b in zip(stamps, stamps[1:])][2:]
            rows[name] = (sum(times) / len(times), losses, device_bytes(estimator))
    (one_time, one_losses, one_bytes), (mesh_time, mesh_losses, mesh_bytes) = rows.values()
    print(f"\nGPT-J d={d}, {args.layers} layers, 8 heads, vocab 8192, batch {batch} x seq {seq}, AdamW, fp32, graph mode")
    for name, (seconds, _, held) in rows.items():
        print(f"    {name:<12} {seconds:7.3f} s/step   weights + Adam state per device {held / MiB:8.2f} MiB")
    print(f"    per-device state, mesh / one device: {mesh_bytes / one_bytes:.3f} "
          f"(1/model = {1 / args.model:.3f} for the split weights; LayerNorms and row biases are replicated)")
    print(f"    step time, mesh / one device: {mesh_time / one_time:.2f}x")
    print(f"    largest |loss difference| over {len(one_losses)} steps: "
          f"{max(abs(a - b) for a, b in zip(one_losses, mesh_losses)):.2e}")


if __name__ == "__main__":
    main()
