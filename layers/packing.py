"""How a packed dense kernel (generation/weights.py: int8 or bfloat16 rows [out, in]) is
converted for its product, free of TensorFlow: layers/dense.py converts it, and the memory
preflight (runtime/memory_model.py) counts the float32 block this leaves live."""
from __future__ import annotations

# Float32 bytes of a packed kernel's rows converted at a time: 64 MiB is a GPT-J-6B attention
# projection whole, its MLP kernels in 4 blocks and its LM head in 13.
CONVERT_BLOCK_BYTES = 64 << 20


def block_rows(in_dim: int, block_bytes: int | None = None) -> int:
    """Output rows of a kernel with `in_dim` inputs whose float32 values fill `block_bytes`
    (default CONVERT_BLOCK_BYTES), at least one."""
    return max(1, (block_bytes or CONVERT_BLOCK_BYTES) // (4 * in_dim))


def largest_block_bytes(kernel_shapes) -> int:
    """Float32 bytes of the largest block converted at a time, over kernels [in, out]."""
    return max(4 * in_dim * min(out_dim, block_rows(in_dim)) for in_dim, out_dim in kernel_shapes)
