"""The architecture the tree promises, checked on the source: which layer may import which, only the engine
imports deepspeed, and functions stay short enough to read. Each check reads the files as they are, so a change
that breaks a rule fails here with the file and line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO

LAYERS = {
    "cogvx_dist.core": {"cogvx_dist.core"},
    "data_prep": {"cogvx_dist.core", "data_prep"},
    "cogvx_dist.train": {"cogvx_dist.core", "cogvx_dist.train"},
    "cogvx_dist.results": {"cogvx_dist.core", "cogvx_dist.train", "cogvx_dist.results"},
    "cogvx_dist.launch": {"cogvx_dist.core", "cogvx_dist.train", "cogvx_dist.launch"},
    "cogvx_dist.cli": {"cogvx_dist", "data_prep"},
}
"""What each layer may import of ours: core <- prep, train; results <- core, train; cli <- all."""
TRAIN_GROUPS = ("cogvx_dist.train.step", "cogvx_dist.train.data", "cogvx_dist.train.memory", "cogvx_dist.train")
"""train/'s groups from the bottom up: the step's math, the data path, the memory planner, and the run's machinery
(the modules directly in train/). A group may import its own modules and those of the groups below it."""
TRAIN_SETTINGS = ("cogvx_dist.train.config", "cogvx_dist.train.ds_config")
"""The run config and the DeepSpeed config: settings every group may read."""
DEEPSPEED_MODULE = "cogvx_dist.train.engine"
MAX_FUNCTION_LINES = 60
LONGER_FUNCTIONS: dict[str, str] = {}
"""Functions allowed past MAX_FUNCTION_LINES, with the reason (none today)."""


def source_modules() -> dict[str, Path]:
    """Every module of the two packages, by dotted name."""
    modules = {}
    for package in ("cogvx_dist", "data_prep"):
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, including those inside functions (lazy imports count)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def layer_of(module: str) -> str | None:
    """The layer a module of ours belongs to (the longest matching prefix), or None for other packages."""
    matches = [layer for layer in LAYERS if module == layer or module.startswith(layer + ".")]
    if not matches and (module == "cogvx_dist" or module.startswith("cogvx_dist.")):
        return "cogvx_dist"
    return max(matches, key=len) if matches else None


def import_violations(modules: dict[str, Path]) -> list[str]:
    problems = []
    for name, path in modules.items():
        layer = layer_of(name)
        if layer is None or layer == "cogvx_dist":
            continue  # the package root (__init__, __main__) only starts the CLI
        for line, imported in imports_of(path):
            target = layer_of(imported)
            if target is None:
                continue
            allowed = LAYERS[layer]
            if not any(target == a or target.startswith(a + ".") for a in allowed):
                problems.append(f"{path.relative_to(REPO)}:{line}: {layer} imports {imported} ({target})")
    return problems


def train_group_of(module: str) -> int | None:
    """The position of a train/ module's group in TRAIN_GROUPS, or None outside train/."""
    for number, group in enumerate(TRAIN_GROUPS):
        if module == group or module.startswith(group + "."):
            return number
    return None


def train_group_violations(modules: dict[str, Path]) -> list[str]:
    problems = []
    for name, path in modules.items():
        group = train_group_of(name)
        if group is None:
            continue
        for line, imported in imports_of(path):
            target = train_group_of(imported)
            if target is not None and target > group and imported not in TRAIN_SETTINGS:
                problems.append(f"{path.relative_to(REPO)}:{line}: {TRAIN_GROUPS[group]} imports {imported} "
                                f"({TRAIN_GROUPS[target]}, a group above it)")
    return problems


def deepspeed_violations(modules: dict[str, Path]) -> list[str]:
    return [f"{path.relative_to(REPO)}:{line}: imports {imported}"
            for name, path in modules.items() if name != DEEPSPEED_MODULE
            for line, imported in imports_of(path) if imported.split(".")[0] == "deepspeed"]


def long_functions(modules: dict[str, Path]) -> list[str]:
    problems = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                where = f"{name}.{node.name}"
                if length > MAX_FUNCTION_LINES and where not in LONGER_FUNCTIONS:
                    problems.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.name} has {length} lines")
    return problems


def test_errors_keep_their_cause():
    """A one-line error chains the exception it came from (COGVX_DEBUG=1 prints both): no `raise ... from None`."""
    dropped = [f"{path.relative_to(REPO)}:{node.lineno}" for path in source_modules().values()
               for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Raise) and isinstance(node.cause, ast.Constant) and node.cause.value is None]
    assert dropped == []


def test_layers_import_only_what_they_may():
    assert import_violations(source_modules()) == []


def test_train_groups_import_only_their_own_and_lower_groups():
    modules = source_modules()
    assert all(any(name.startswith(group + ".") for name in modules) for group in TRAIN_GROUPS)
    assert train_group_violations(modules) == []


def test_only_the_engine_imports_deepspeed():
    modules = source_modules()
    assert DEEPSPEED_MODULE in modules
    assert deepspeed_violations(modules) == []


def test_functions_fit_on_a_screen():
    assert long_functions(source_modules()) == []


@pytest.mark.parametrize("layer, line, check", [
    ("core", "from cogvx_dist.train.loop import Trainer", import_violations),
    ("prep", "from cogvx_dist.train.data.reader import ShardIndex", import_violations),
    ("train", "import data_prep.shards", import_violations),
    ("results", "from data_prep.job import run_prep", import_violations),
    ("train", "from deepspeed.utils import safe_get_full_fp32_param", deepspeed_violations),
    ("core", "import deepspeed", deepspeed_violations),
    ("train.step", "from cogvx_dist.train.data.reader import collate", train_group_violations),
    ("train.data", "from cogvx_dist.train.memory.plan import MemoryPlan", train_group_violations),
    ("train.memory", "from cogvx_dist.train.metrics import StepMeter", train_group_violations),
])
def test_the_checks_catch_a_violation(tmp_path, monkeypatch, layer, line, check):
    """A module that breaks a rule is reported (the rules are not vacuous)."""
    package = {"core": "cogvx_dist.core", "prep": "data_prep", "train": "cogvx_dist.train",
               "results": "cogvx_dist.results", "train.step": "cogvx_dist.train.step",
               "train.data": "cogvx_dist.train.data", "train.memory": "cogvx_dist.train.memory"}[layer]
    offender = tmp_path / "offender.py"
    offender.write_text(f"def helper():\n    {line}\n")
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    reported = check({f"{package}.offender": offender})
    assert len(reported) == 1 and "offender.py:2" in reported[0]


def attributes_set_late(path: Path, class_name: str) -> list[str]:
    """`self.NAME = ...` assignments in a class's methods other than __init__ for names __init__ does not set."""
    tree = ast.parse(path.read_text())
    cls = next(node for node in ast.walk(tree) if isinstance(node, ast.ClassDef) and node.name == class_name)

    def assigned(function: ast.AST) -> dict[str, int]:
        names = {}
        for node in ast.walk(function):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
            for target in targets:
                for leaf in ast.walk(target):
                    if isinstance(leaf, ast.Attribute) and isinstance(leaf.value, ast.Name) and leaf.value.id == "self":
                        names.setdefault(leaf.attr, node.lineno)
        return names

    methods = [node for node in cls.body if isinstance(node, ast.FunctionDef)]
    in_init = next((assigned(m) for m in methods if m.name == "__init__"), {})
    return [f"{path.relative_to(REPO)}:{line}: {class_name}.{name} is first set outside __init__"
            for method in methods if method.name != "__init__"
            for name, line in assigned(method).items() if name not in in_init]


@pytest.mark.parametrize("module, class_name", [
    ("cogvx_dist/train/loop.py", "Trainer"),
    ("cogvx_dist/train/checkpointer.py", "Checkpointer"),
    ("cogvx_dist/train/guards.py", "RunGuards"),
])
def test_the_run_sets_every_attribute_in_init(module, class_name):
    """A reader learns what a run holds from its __init__ (`fit` once had to ask `hasattr(self, "preemption")`)."""
    assert attributes_set_late(REPO / module, class_name) == []


def test_a_late_attribute_is_reported(tmp_path, monkeypatch):
    source = tmp_path / "late.py"
    source.write_text("class Run:\n    def __init__(self):\n        self.a = 1\n\n    def go(self):\n"
                      "        self.a = 2\n        self.b = 3\n")
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    assert attributes_set_late(source, "Run") == ["late.py:7: Run.b is first set outside __init__"]
