"""Make the environment the MLflow tests run in: `python tests/mlflow_env.py ENV` (`make setup` runs it, ENV being
.venv/mlflow).

MLflow is kept out of the main test environment on purpose. DeepSpeed imports mlflow whenever it can (its
autotuner, at `import deepspeed`), and its launcher processes, which cogvx does not control, then spend ~2.3 s of CPU
each on it: measured, a 2-rank `cogvx train` took 25 s of CPU with mlflow installed and 20 s without, and the suite
starts over a hundred of them. ENV is a virtual environment layered on this one (a .pth file adds this
environment's site-packages, .pth files included, after its own), holding only the `mlflow` extra of
pyproject.toml; the tests that use MLflow run ENV's python, or add ENV's site-packages to their own process
(`tests.helpers.mlflow_importable`). Users install `cogvx-dist[trackers]` into one environment as usual.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def site_packages(python: Path) -> Path:
    """The purelib folder of the environment whose interpreter is `python`."""
    return Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())


def make(env: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(env)], check=True)
    python = env / "bin" / "python"
    here = sysconfig.get_path("purelib")
    (site_packages(python) / "main_environment.pth").write_text(f"import site; site.addsitedir({here!r})\n")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", *extras["mlflow"]],
                   check=True)


if __name__ == "__main__":
    make(Path(sys.argv[1]))
