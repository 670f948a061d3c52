"""Torch extensions (DeepSpeed's JIT-built ops) build once per environment, however the command is called: with the
venv activated or not, whatever ninja the system has."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE_SOURCE = """#include <Python.h>
static struct PyModuleDef probe_module = {PyModuleDef_HEAD_INIT, "cogvx_ninja_probe", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit_cogvx_ninja_probe(void) { return PyModule_Create(&probe_module); }
"""

BUILD_SCRIPT = """
import sys
from cogvx_dist.train.engine import use_environment_extensions_dir
use_environment_extensions_dir()  # what every rank and `make ops` do before DeepSpeed builds an op
from torch.utils.cpp_extension import load
load(name="cogvx_ninja_probe", sources=[sys.argv[1]], build_directory=sys.argv[2])
"""


def build(source: Path, folder: Path, path: str) -> int:
    """Build the probe extension in a fresh process with this PATH; the built module's modification time."""
    env = {**os.environ, "PATH": path}
    subprocess.run([sys.executable, "-c", BUILD_SCRIPT, str(source), str(folder)], env=env, check=True,
                   capture_output=True, text=True, timeout=300)
    return (folder / "cogvx_ninja_probe.so").stat().st_mtime_ns


def test_a_torch_extension_builds_once_whichever_ninja_comes_first_on_path(tmp_path):
    """A plain C++ module (no torch headers, so it compiles in a second) through torch's own extension builder:
    built once from a shell where the system's folders come first (the venv not activated), then again from one
    where the venv's bin comes first. The second call must find it built. Before, the first used the system's ninja
    (or none) and the second the venv's, and each switch rebuilt everything."""
    venv_bin = Path(sys.prefix) / "bin"
    if not (venv_bin / "ninja").is_file():
        pytest.skip(f"this environment has no ninja of its own in {venv_bin} (pip's ninja package)")
    source = tmp_path / "probe.cpp"
    source.write_text(PROBE_SOURCE)
    folder = tmp_path / "build"
    folder.mkdir()
    system_first = os.pathsep.join(["/usr/local/bin", "/usr/bin", "/bin", str(venv_bin)])
    venv_first = os.pathsep.join([str(venv_bin), "/usr/local/bin", "/usr/bin", "/bin"])
    built = build(source, folder, system_first)
    assert build(source, folder, venv_first) == built, "rebuilt after PATH changed order"
    assert build(source, folder, system_first) == built, "rebuilt after PATH changed order back"
