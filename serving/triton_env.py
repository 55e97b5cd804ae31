"""The Python that Triton's Python backend stub runs (serving/triton.py), and what the stub needs
from this process's environment.

PyTriton (nvidia-pytriton 0.7.0) serves a Python function through Triton's Python backend: a
C++ stub process embeds CPython, runs PyTriton's proxy (NumPy + ZeroMQ) and forwards each batch
to this process. Two facts of that stub break it in this project's environment:

1. The stub links `libpython3.X.so.1.0` by name. With a Python built elsewhere (pyenv here) the
   dynamic linker finds the system's libpython first (Debian's 3.11.2) while the stub imports
   this interpreter's standard library (3.11.7): the mix fails in multiprocessing's
   resource tracker (`'_thread.RLock' object has no attribute '_recursion_count'`). Fix: this
   interpreter's LIBDIR leads the server's LD_LIBRARY_PATH.
2. The stub's C++ reads NumPy arrays with the NumPy 1 ABI (PyTriton pins numpy<2 for it): under
   NumPy 2, which TensorFlow 2.21 needs here, every output tensor arrives empty. Fix: the stub
   runs in its own small virtual environment with NumPy 1.x and pyzmq (`create`, run once by
   `make test` or `python -m serving.triton_env`); the model itself stays in this process.

    python -m serving.triton_env [--path DIR]     # create or refresh the stub environment
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

# The stub's packages: PyTriton's proxy imports only these two (pytriton.server.triton_server).
STUB_REQUIREMENTS = ("numpy>=1.21,<2", "pyzmq>=23")


class TritonEnvError(RuntimeError):
    """The Triton stub's environment is missing or unusable; the message names the fix."""


def default_stub_env() -> Path:
    """Where `make test` creates the stub environment: beside this interpreter's own packages."""
    return Path(sys.prefix) / "triton-stub"


def create(path: Path) -> None:
    """A virtual environment of this interpreter's Python version holding STUB_REQUIREMENTS."""
    venv.EnvBuilder(with_pip=True, clear=False).create(path)
    subprocess.run([str(path / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    *STUB_REQUIREMENTS], check=True)


def check_stub_env(path: Path) -> str:
    """The stub environment's NumPy version, after checking it is this Python's version with
    NumPy 1.x and pyzmq; TritonEnvError names `--stub-env` and the command that makes one."""
    fix = f"create it with `python -m serving.triton_env --path {path}` (or give --stub-env)"
    python = path / "bin" / "python"
    if not python.exists():
        raise TritonEnvError(f"--stub-env {path} is not a Python environment; {fix}")
    probe = ("import sys, numpy, zmq; "
             "print(f'{sys.version_info[0]}.{sys.version_info[1]}', numpy.__version__)")
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    if done.returncode != 0:
        raise TritonEnvError(f"--stub-env {path} cannot import numpy and zmq "
                             f"({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'no output'}); {fix}")
    version, numpy_version = done.stdout.split()
    ours = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if version != ours:
        raise TritonEnvError(f"--stub-env {path} runs Python {version}, but the stub embeds this Python {ours}; {fix}")
    if not numpy_version.startswith("1."):
        raise TritonEnvError(f"--stub-env {path} has NumPy {numpy_version}; the Triton stub reads arrays with the "
                             f"NumPy 1 ABI and returns empty outputs under NumPy 2; {fix}")
    return numpy_version


def libpython_dir() -> str:
    """The directory of this interpreter's shared libpython, which the stub must link."""
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not libdir or not (Path(libdir) / soname).exists():
        raise TritonEnvError(f"this Python ({sys.executable}) has no shared libpython ({soname} in {libdir}); "
                             "Triton's Python stub embeds one: use a Python built with --enable-shared "
                             "(pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install 3.11)")
    return libdir


def server_environment(environ: dict[str, str]) -> dict[str, str]:
    """`environ` with this interpreter's libpython directory leading LD_LIBRARY_PATH."""
    libdir = libpython_dir()
    rest = [p for p in environ.get("LD_LIBRARY_PATH", "").split(":") if p and p != libdir]
    return {**environ, "LD_LIBRARY_PATH": ":".join([libdir, *rest])}


def prepare_pytriton(stub_env: Path) -> None:
    """Make the Triton server PyTriton starts from this process use `stub_env` for its stub and
    this interpreter's libpython. PyTriton builds the server's environment from os.environ and
    runs the stub in the Python environment its `get_triton_python_backend_python_env` names
    (this interpreter's, which has NumPy 2): both are set here, once, before Triton starts."""
    check_stub_env(stub_env)
    os.environ.update(server_environment(dict(os.environ)))
    import pytriton.server.triton_server as triton_server
    triton_server.get_triton_python_backend_python_env = lambda: stub_env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.triton_env", description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", type=Path, default=default_stub_env(),
                        help=f"where to create it (default {default_stub_env()}; serving.triton's --stub-env)")
    args = parser.parse_args(argv)
    create(args.path)
    print(f"Triton stub environment ready: {args.path} (NumPy {check_stub_env(args.path)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
