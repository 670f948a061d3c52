"""End-to-end runs: real processes (DeepSpeed launchers, mpiexec, several prep processes, the demo). All of them
are slow; `pytest -m "not slow"` (make test-quick) leaves them out."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/tests/e2e/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.slow)
