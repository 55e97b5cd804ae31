"""Suite-wide settings: quiet TensorFlow, no GPU probing, no network."""
import os

import pytest

from config.quiet import quiet_tensorflow

quiet_tensorflow(verbose=False)     # as the CLIs do: TF_CPP_MIN_LOG_LEVEL=2 and the start-up notices filtered
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Modules whose tests train, start processes or serve: most of the suite's time (pytest
# --durations=60, 2026-12-07: the 60 slowest tests, all from these, took 84% of it). They run
# first, so that pytest-xdist hands the long tests out while the short ones remain to even the
# workers' ends (longest first), instead of one worker finishing a long test alone.
LONG_MODULES = ("test_run_cli", "test_run_dir", "test_weight_streaming", "test_multi_worker", "test_mesh",
                "test_distribution", "test_bench_real_size", "test_dropout", "test_estimator", "test_preflight",
                "test_corrupt_checkpoint", "test_lora", "test_bad_input_cli")


def pytest_collection_modifyitems(config, items):
    """Long modules first (LONG_MODULES), the rest in collection order.

    With ONEDNN_MAX_CPU_ISA below the CPU's own level, TensorFlow still sends bfloat16/float16
    matmuls to oneDNN (it asks the CPU, which has AVX512-BF16/FP16 or AMX) and oneDNN, held to
    the lower ISA, has no kernel for them: the process dies (SIGSEGV, TF 2.21). A CPU without
    those instructions runs them in TensorFlow's own kernels, which TF_ENABLE_ONEDNN_OPTS=0
    selects; .ci/run runs the mixed_precision tests that way."""
    items.sort(key=lambda item: getattr(item.module, "__name__", "").rsplit(".", 1)[-1] not in LONG_MODULES)
    if os.environ.get("ONEDNN_MAX_CPU_ISA") and os.environ.get("TF_ENABLE_ONEDNN_OPTS") != "0":
        skip = pytest.mark.skip(reason="bfloat16/float16 under ONEDNN_MAX_CPU_ISA needs TF_ENABLE_ONEDNN_OPTS=0 "
                                       "(see tests/conftest.py)")
        for item in items:
            if item.get_closest_marker("mixed_precision"):
                item.add_marker(skip)
