"""What machine a benchmark ran on: CPU model, cores, memory and the ISA features that decide
CPU matmul speed (AVX-512, AVX-512 BF16, AMX), read from /proc/cpuinfo. Every bench prints
`describe_machine()` above its table so its figures can be compared across machines."""
from __future__ import annotations

import os
import platform

__all__ = ["cpu_info", "describe_machine"]

# /proc/cpuinfo flag -> the name people know it by
ISA_FLAGS = {"avx2": "AVX2", "fma": "FMA", "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI",
             "avx512_bf16": "AVX-512 BF16", "avx512_fp16": "AVX-512 FP16", "amx_tile": "AMX",
             "amx_bf16": "AMX BF16", "amx_int8": "AMX INT8"}


def cpu_info(path: str = "/proc/cpuinfo") -> dict:
    """{"model": str, "logical_cpus": int, "isa": {name: bool}} (model from platform where no cpuinfo)."""
    model, flags = None, set()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model or platform.processor() or platform.machine(),
            "logical_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "isa": {name: flag in flags for flag, name in ISA_FLAGS.items()}}


def describe_machine() -> str:
    """One line: `CPU: <model>, N cores available, M GiB RAM; ISA: AVX2 yes, AVX-512 yes, ...`."""
    info = cpu_info()
    memory = ""
    try:
        import psutil
        memory = f", {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        pass
    isa = ", ".join(f"{name} {'yes' if present else 'no'}" for name, present in info["isa"].items())
    return f"CPU: {info['model']}, {info['logical_cpus']} cores available{memory}; ISA: {isa}"
