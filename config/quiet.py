"""Quiet start-up for the command-line tools: TensorFlow's known start-up notices are hidden
unless `--verbose`.

What was measured (TF 2.21 CPU wheel, Linux): `TF_CPP_MIN_LOG_LEVEL` filters TensorFlow's
C++ log only once absl's logging is initialised. While the shared libraries load, absl
writes everything straight to file descriptor 2 whatever the level: its own "All log
messages before absl::InitializeLog() is called" warning, the oneDNN notice and the CUDA
stub notice (each twice, once per library that carries absl). No variable of absl or TF
reaches those lines (ABSL_MIN_LOG_LEVEL, GLOG_minloglevel and TF_CPP_MIN_LOG_LEVEL=3 all
leave them). The first device probe then logs `E... failed call to cuInit` on a machine
without a GPU, at ERROR, which only level 3 would hide, together with every real error.

So: `TF_CPP_MIN_LOG_LEVEL` defaults to 2 (the user's own value is kept), and the import of
TensorFlow plus the device probe run with fd 2 pointed at a temporary file; afterwards every
captured line that is not one of the known notices below goes to the real stderr, in order.
Nothing else is hidden and nothing about the devices changes: hiding GPUs with
CUDA_VISIBLE_DEVICES or disabling oneDNN would silence the same lines but change what runs.
A crash inside the import itself would lose the captured lines; `--verbose` turns all of
this off.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile
from typing import Iterator

__all__ = ["add_verbose_flag", "quiet_tensorflow", "is_known_noise"]

# absl's line prefix: severity, date, time, thread id, then `file:line]`.
_ABSL_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ (?P<file>[\w.]+):\d+\] (?P<message>.*)$")
_KNOWN_NOTICES = {   # file -> start of the message
    "port.cc": "oneDNN custom operations are on",
    "cudart_stub.cc": "Could not find cuda drivers",
    "cuda_platform.cc": "failed call to cuInit",
    "cpu_feature_guard.cc": "This TensorFlow binary is optimized",
}
_KNOWN_LINES = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",)
_KNOWN_CONTINUATION = re.compile(r"^To enable the following instructions: .*rebuild TensorFlow with the "
                                 r"appropriate compiler flags\.$")     # second line of cpu_feature_guard's


def is_known_noise(line: str) -> bool:
    """Whether `line` (without its newline) is one of TensorFlow's known start-up notices."""
    if line in _KNOWN_LINES or _KNOWN_CONTINUATION.match(line):
        return True
    found = _ABSL_LINE.match(line)
    return bool(found) and found["message"].startswith(_KNOWN_NOTICES.get(found["file"], "\0"))


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="show TensorFlow's start-up log lines (oneDNN, CUDA probing), hidden by default")


@contextlib.contextmanager
def _known_noise_filtered() -> Iterator[None]:
    """Capture fd 2 in a file for the block, then pass on every line that is not known noise."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:              # no stderr to filter
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().splitlines(keepends=True)
                    if not is_known_noise(line.decode("utf-8", "replace").rstrip("\r\n"))]
            if kept:
                os.write(2, b"".join(kept))


class _FilteredLoader(importlib.abc.Loader):
    """TensorFlow's own loader, run inside the filter, followed by the device probe."""

    def __init__(self, finder: "_QuietTensorFlowImport", loader):
        self.finder, self.loader = finder, loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)      # once: later imports are the ordinary ones
        with _known_noise_filtered():
            self.loader.exec_module(module)
            module.config.list_physical_devices()    # the probe that logs `failed call to cuInit`


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Wraps the first `import tensorflow` of the process, whichever module does it."""

    def __init__(self):
        self._finding = False

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow" or self._finding:
            return None
        self._finding = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._finding = False
        if spec is not None and spec.loader is not None:
            spec.loader = _FilteredLoader(self, spec.loader)
        return spec


def quiet_tensorflow(verbose: bool) -> None:
    """Call first thing after parsing a CLI's arguments (before TensorFlow is imported)."""
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules or any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietTensorFlowImport())
